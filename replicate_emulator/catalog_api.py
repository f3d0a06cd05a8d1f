"""Read-only catalog endpoints: models, their versions, deployments."""
from __future__ import annotations

from aiohttp import web

from . import catalog
from .emulator import ok_json, problem

routes = web.RouteTableDef()
NOT_FOUND = "The requested resource could not be found."
# Replicate's own words (seen in client bug reports) for listing an official model's versions.
OFFICIAL_HAS_NO_VERSIONS = "This model is an official model and does not expose a list of versions."


def _model(request: web.Request) -> catalog.Model | None:
    return catalog.MODELS.get(f"{request.match_info['owner']}/{request.match_info['name']}")


def model_json(model: catalog.Model) -> dict:
    return {
        "url": f"https://replicate.com/{model.ref}", "owner": model.owner, "name": model.name,
        "description": model.description, "visibility": "public", "github_url": None,
        "paper_url": None, "license_url": None, "run_count": 0, "cover_image_url": None,
        "default_example": None, "is_official": model.official,
        "latest_version": model.latest.to_json(),
    }


@routes.get("/v1/models/{owner}/{name}")
async def get_model(request: web.Request) -> web.Response:
    model = _model(request)
    return problem(404, NOT_FOUND) if model is None else ok_json(model_json(model))


@routes.get("/v1/models/{owner}/{name}/versions")
async def list_versions(request: web.Request) -> web.Response:
    model = _model(request)
    if model is None:
        return problem(404, NOT_FOUND)
    if model.official:
        return problem(404, OFFICIAL_HAS_NO_VERSIONS, title="Not found")
    return ok_json({"next": None, "previous": None, "results": [v.to_json() for v in model.versions]})


@routes.get("/v1/models/{owner}/{name}/versions/{id}")
async def get_version(request: web.Request) -> web.Response:
    """Any model's version by id, an official model's (its `latest_version.id`) included."""
    model = _model(request)
    version = model and catalog.version_of(model.ref, request.match_info["id"])
    return problem(404, NOT_FOUND) if not version else ok_json(version.to_json())


@routes.get("/v1/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    return ok_json({"next": None, "previous": None,
                    "results": [d.to_json() for d in catalog.DEPLOYMENTS.values()]})


@routes.get("/v1/deployments/{owner}/{name}")
async def get_deployment(request: web.Request) -> web.Response:
    found = catalog.DEPLOYMENTS.get(f"{request.match_info['owner']}/{request.match_info['name']}")
    return problem(404, NOT_FOUND) if found is None else ok_json(found.to_json())
