"""The HTTP API: the spec's endpoints, the job API, the web gallery (/ui) and the
OpenAI-compatible API (/v1), as Flask blueprints."""
from gateway.api.job_routes import bp as jobs_bp
from gateway.api.openai import bp as openai_bp
from gateway.api.operations import bp as operations_bp
from gateway.api.routes import bp as api_bp
from gateway.api.ui import bp as ui_bp

BLUEPRINTS = (operations_bp, api_bp, jobs_bp, ui_bp, openai_bp)  # operations first: request ids

__all__ = ["BLUEPRINTS"]
