"""The HTTP API: the spec's endpoints and the job API, as Flask blueprints."""
from gateway.api.job_routes import bp as jobs_bp
from gateway.api.routes import bp as api_bp

BLUEPRINTS = (api_bp, jobs_bp)

__all__ = ["BLUEPRINTS"]
