"""How a client names a Replicate model, and how each kind of name is run.

    owner/name                   an official model: POST /v1/models/{owner}/{name}/predictions
    owner/name:<64 hex>          a version of any model: POST /v1/predictions with `version`
    <64 hex>                     a version whose model the service already knows
    deployments/owner/name       a deployment: POST /v1/deployments/{owner}/{name}/predictions

Anything else is an alias (`flux-dev`, or one from MODELS_FILE). Parsing is pure: whether
Replicate knows the model is asked later, by the schema cache.
"""
from __future__ import annotations

import dataclasses
import re
from enum import StrEnum
from typing import Any

from gateway.errors import ServiceError

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9_])?"
_VERSION = r"[0-9a-f]{64}"
_MODEL = re.compile(rf"({_PART})/({_PART})")
_WITH_VERSION = re.compile(rf"({_PART})/({_PART}):({_VERSION})")
_DEPLOYMENT = re.compile(rf"deployments/({_PART})/({_PART})")
BARE_VERSION = re.compile(_VERSION)
FORMS = ("an alias such as 'flux-dev', 'owner/name' (an official model), 'owner/name:<64-hex version>', "
         "or 'deployments/owner/name'")


class RunBy(StrEnum):
    MODEL = "model"            # an official model, by name
    VERSION = "version"        # a model version, by id
    DEPLOYMENT = "deployment"  # a deployment's current release


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """What to run upstream: the create target a spec carries."""

    run_by: RunBy
    owner: str
    name: str
    version: str | None = None

    @property
    def model(self) -> str:
        """`owner/name` (of the deployment itself, for a deployment)."""
        return f"{self.owner}/{self.name}"

    @property
    def canonical(self) -> str:
        """The reference as the client writes it, and as jobs journal it."""
        if self.run_by is RunBy.DEPLOYMENT:
            return f"deployments/{self.model}"
        if self.run_by is RunBy.VERSION:
            return f"{self.model}:{self.version}"
        return self.model

    @property
    def allowlist_name(self) -> str:
        """What ALLOWED_MODELS globs are matched against: the version is not part of it."""
        return f"deployments/{self.model}" if self.run_by is RunBy.DEPLOYMENT else self.model

    def __str__(self) -> str:
        return self.canonical


def official(name: str) -> ModelRef:
    owner, _, model = name.partition("/")
    return ModelRef(RunBy.MODEL, owner, model)


def parse_reference(text: Any) -> ModelRef | None:
    """The reference `text` spells, or None when it is not in a reference form (an alias, or
    a bare version id: see BARE_VERSION). A string that looks like a reference but is
    malformed (`a/b/c`, `owner/name:xyz`) is a 400 listing the accepted forms."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if found := _DEPLOYMENT.fullmatch(text):
        return ModelRef(RunBy.DEPLOYMENT, found[1], found[2])
    if found := _WITH_VERSION.fullmatch(text):
        return ModelRef(RunBy.VERSION, found[1], found[2], found[3])
    if found := _MODEL.fullmatch(text):
        return ModelRef(RunBy.MODEL, found[1], found[2])
    if "/" in text or ":" in text:
        raise ServiceError(400, f"Invalid value for 'model_name': {text[:200]!r} is not a model reference; "
                           f"allowed: {FORMS}", field="model_name", allowed=FORMS)
    return None
