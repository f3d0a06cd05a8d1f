"""The web gallery at /ui: enter a key, list your jobs, submit a batch, watch a job's
thumbnails fill in, and look at one image with its provenance.

The pages are shells rendered from templates: the server puts no job data and no key into
them. The browser keeps the key in the tab's sessionStorage and the page scripts
(`static/js/`) call the JSON API with it as a header (`X-Admin-API-Key` or
`X-Replicate-API-Key`), so every owner check stays where it already is (`/jobs`,
`/files/...`). Images are fetched with that header into blob URLs, since an `<img>` cannot
send one; the key never appears in a URL, a cookie, local storage or the HTML.

Every response under /ui (pages, static files, errors) carries a strict
Content-Security-Policy: scripts, styles and connections only from this origin, no inline
code at all, images from here or blob URLs, no plugins, no framing, no `<base>`.
"""
from __future__ import annotations

from flask import Blueprint, Response, render_template, request

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")

PREFIX = "/ui"
CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
    "form-action 'self'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@bp.after_app_request
def lock_down(response: Response) -> Response:
    """Security headers on every /ui response, 404s and errors included (an app-wide hook:
    a blueprint's own `after_request` does not run when no /ui route matched). The JSON API
    outside /ui is left as it is."""
    if request.path == PREFIX or request.path.startswith(PREFIX + "/"):
        response.headers.update(SECURITY_HEADERS)
    return response


def _page(template: str, page: str, **context: str) -> str:
    return render_template(f"ui/{template}", page=page, **context)


@bp.get("")
@bp.get("/")
def key() -> str:
    """Enter the key once; the page's script keeps it in this tab's sessionStorage."""
    return _page("key.html", "key")


@bp.get("/jobs")
def jobs() -> str:
    return _page("jobs.html", "jobs")


@bp.get("/jobs/new")
def new_batch() -> str:
    return _page("new.html", "new")


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    # The id is only echoed (autoescaped) for the script; whether the caller may see the
    # job is decided by GET /jobs/<id> when the script asks with the key.
    return _page("job.html", "job", job_id=job_id)


@bp.get("/files/<folder>/<name>")
def image(folder: str, name: str) -> str:
    return _page("image.html", "image", folder=folder, name=name)
