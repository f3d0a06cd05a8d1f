"""Which model a request names, whether it may run here, and its published schema.

`ModelCatalog.resolve` turns `model_name` into a ModelSpec: a curated alias (`flux-dev`), an
operator's alias (MODELS_FILE), or a reference (references.py). It checks ALLOWED_MODELS
before anything is read upstream, then reads what Replicate publishes about the model, once
per MODEL_SCHEMA_TTL (schemas.SchemaCache), with the caller's token and through the
account's read budget:

    owner/name              GET /v1/models/{o}/{n}; official or community is told by
                            GET /v1/models/{o}/{n}/versions (official models list none: 404)
    owner/name:<version>    GET /v1/models/{o}/{n}/versions/{version}
    deployments/o/n         GET /v1/deployments/{o}/{n} -> current_release, then its version

Cached documents (by key):
    "owner/name"             {"kind": "official" | "community", "model", "version", "description",
                              "openapi_schema" (official only)}
    "owner/name:<version>"   {"kind": "version", "model", "version", "openapi_schema"}
    "version:<id>"           {"kind": "version-of", "model"}: a bare version id, once seen
    "deployments/o/n@<acct>" {"kind": "deployment", "model", "version", "deployment",
                              "openapi_schema"}: a deployment is its account's own
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from gateway.accounts import Caller
from gateway.config import ConfigError
from gateway.engine.models import (
    BY_NAME,
    MODELS,
    ModelSpec,
    check_allowed,
    describe_models,
    describe_spec,
    remember,
    resolve_model,
    spec_of_reference,
)
from gateway.engine.references import BARE_VERSION, ModelRef, RunBy, parse_reference
from gateway.engine.schemas import CachedSchema, SchemaCache
from gateway.engine.upstream import SessionCache, UpstreamError
from gateway.errors import ServiceError

log = logging.getLogger(__name__)
ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALIAS_KEYS = {"model", "defaults", "description"}
MAX_READ_PAUSE = 30.0  # a schema read waits at most this for its turn in the read budget


@dataclasses.dataclass(frozen=True)
class Alias:
    """An operator's name for a model, with default parameters (MODELS_FILE)."""

    name: str
    model: str
    defaults: dict[str, Any]
    description: str = ""


def load_aliases(path: str) -> dict[str, Alias]:
    """The aliases of MODELS_FILE (JSON, or YAML), checked; ConfigError naming the alias and
    the problem. An empty path: none."""
    if not path:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"MODELS_FILE={path!r} cannot be read: {exc.__class__.__name__}: {exc}") from None
    data = _parse_file(path, text)
    if not isinstance(data, dict):
        raise ConfigError(f"MODELS_FILE={path!r}: expected an object of aliases, "
                          '{"alias": {"model": "owner/name", "defaults": {...}}}')
    return {name: _alias(path, name, entry) for name, entry in data.items()}


def _parse_file(path: str, text: str) -> Any:
    if path.lower().endswith((".yaml", ".yml")):
        import yaml  # only a YAML file needs it

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"MODELS_FILE={path!r} is not valid YAML: {exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"MODELS_FILE={path!r} is not valid JSON ({exc}); a YAML file must end in "
                          ".yaml or .yml") from None


def _alias(path: str, name: Any, entry: Any) -> Alias:
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"MODELS_FILE={path!r}: alias {str(name)[:80]!r}: {problem}")

    if not isinstance(name, str) or not ALIAS_NAME.fullmatch(name):
        raise bad("an alias is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if name in BY_NAME:
        raise bad("is already the name of a built-in model")
    if not isinstance(entry, dict):
        raise bad('expected an object such as {"model": "owner/name", "defaults": {...}}')
    extra = sorted(set(map(str, entry)) - ALIAS_KEYS)
    if extra:
        raise bad(f"unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(ALIAS_KEYS))}")
    model = entry.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad("'model' is required: 'owner/name', 'owner/name:<version>', 'deployments/owner/name' "
                  "or a built-in alias")
    try:
        if model.strip() not in BY_NAME and parse_reference(model) is None:
            raise bad(f"'model' {model!r} is neither a model reference nor a built-in alias")
    except ServiceError as exc:
        raise bad(f"'model' {model!r}: {exc.message}") from None
    defaults = entry.get("defaults", {})
    if not isinstance(defaults, dict) or not all(isinstance(k, str) for k in defaults):
        raise bad("'defaults' must be an object of parameter names and values")
    if "prompt" in defaults:
        raise bad("'defaults' cannot hold 'prompt': each request gives its own")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise bad("'description' must be text")
    return Alias(name, model.strip(), dict(defaults), description)


CallerSource = Callable[[], Caller]  # the caller, asked only when a read upstream is needed


class ModelCatalog:
    def __init__(self, cache: SchemaCache, sessions: SessionCache, pace: Callable[[str], float],
                 allowed: tuple[str, ...] = ("*",), aliases: dict[str, Alias] | None = None) -> None:
        self._cache, self._sessions, self._pace = cache, sessions, pace
        self._allowed = allowed
        self._aliases = aliases or {}

    # -- names ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The aliases a request may name: the built-in ones, then the operator's."""
        return [*MODELS, *self._aliases]

    def aliases(self) -> list[dict[str, Any]]:
        return [{"alias": a.name, "model": a.model, "defaults": a.defaults, "description": a.description}
                for a in self._aliases.values()]

    # -- resolving --------------------------------------------------------------------------
    def resolve(self, name: Any, caller: Caller) -> ModelSpec:
        """The spec `model_name` names, its schema fetched if needed; 400 for a name nobody
        knows, 403 for a model outside ALLOWED_MODELS (before any upstream call)."""
        return self._resolve(name, lambda: caller)

    def _resolve(self, name: Any, caller: CallerSource, depth: int = 0) -> ModelSpec:
        if not isinstance(name, str) or not name.strip():
            return resolve_model(name)  # the 400 asking for model_name
        text = name.strip()
        curated = BY_NAME.get(text)
        if curated is not None:
            self._allow(curated.run_target)
            return self._with_known_schema(curated)
        alias = self._aliases.get(text)
        if alias is not None and depth == 0:
            spec = self._resolve(alias.model, caller, depth + 1)
            return dataclasses.replace(spec, defaults={**spec.defaults, **alias.defaults},
                                       purpose=alias.description or spec.purpose)
        ref = parse_reference(text)
        if ref is None:
            if BARE_VERSION.fullmatch(text):
                ref = self._known_version(text)
            else:
                raise ServiceError(400, f"Model '{text[:200]}' not supported", supported_models=self.names())
        self._allow(ref)
        return self._spec(ref, caller)

    def _allow(self, ref: ModelRef) -> None:
        check_allowed(ref.allowlist_name, self._allowed)

    def _with_known_schema(self, curated: ModelSpec) -> ModelSpec:
        """A curated model validates with its own table; when its published schema is
        already at hand (never fetched for this: the three must not depend on the upstream's
        model endpoint), the table's rules apply on top of it."""
        if curated.target is not None or curated.schema is not None:
            return curated
        entry = self._cache.peek(curated.replicate_name, memory_only=True)
        if entry is None or entry.document.get("kind") != "official":
            return curated
        return dataclasses.replace(curated, schema=entry.schema)

    def _spec(self, ref: ModelRef, caller: CallerSource) -> ModelSpec:
        if ref.run_by is RunBy.MODEL:
            entry = self._model_entry(ref, caller)
            if entry.document["kind"] == "community":
                latest = entry.document.get("version")
                raise ServiceError(400, f"Model '{ref.model}' is a community model: name a version, as "
                                   f"'{ref.model}:<version>'; the latest is '{ref.model}:{latest}'",
                                   field="model_name", latest_version=f"{ref.model}:{latest}")
        elif ref.run_by is RunBy.VERSION:
            entry = self._version_entry(ref.model, ref.version, caller)
        else:
            entry = self._deployment_entry(ref, caller)
        return self._spec_of(ref, entry)

    @staticmethod
    def _spec_of(ref: ModelRef, entry: CachedSchema) -> ModelSpec:
        doc = entry.document
        return remember(spec_of_reference(ref, entry.schema, purpose=str(doc.get("description") or ""),
                                          replicate_name=doc.get("model"), output=entry.schema.output_kind))

    def _known_version(self, version: str) -> ModelRef:
        entry = self._cache.peek(f"version:{version}", stale=True)
        if entry is None:
            raise ServiceError(400, f"Version '{version}' is not known to this service yet: name it once as "
                               "'owner/name:<version>' (Replicate has no look-up of a schema by version id "
                               "alone)", field="model_name")
        owner, _, name = entry.document["model"].partition("/")
        return ModelRef(RunBy.VERSION, owner, name, version)

    # -- journaled jobs ------------------------------------------------------------------------
    def stored_spec(self, name: str) -> ModelSpec:
        """The spec a journaled job runs with (`jobs.model`), from the schema kept here: no
        read upstream, no allowlist (it was checked at submit). Unknown: the spec that only
        knows how to run the reference (models.resolve_model)."""
        spec = resolve_model(name)
        ref = spec.target
        if ref is None or spec.schema is not None or ref.run_by is RunBy.DEPLOYMENT:
            return spec  # a deployment's schema is kept per account: its caller is not known here
        entry = self._cache.peek(ref.canonical, stale=True)
        if entry is None or "openapi_schema" not in entry.document:
            return spec
        return self._spec_of(ref, entry)  # remembered: resolve_model(name) finds it from now on

    def prime(self, names: Iterable[str]) -> None:
        """Before unfinished jobs are resumed after a restart: their specs from the kept
        schemas, so a model whose prompt fills another input (`text`, `image`) runs as submitted."""
        for name in set(names):
            try:
                self.stored_spec(name)
            except ServiceError:
                log.warning("a journaled job names model %r, which cannot be resolved", name[:200])

    # -- reading upstream ---------------------------------------------------------------------
    def _model_entry(self, ref: ModelRef, caller: CallerSource) -> CachedSchema:
        def fetch() -> dict[str, Any]:
            model = self._read(caller, f"/v1/models/{ref.model}", f"model '{ref.model}'")
            latest = model.get("latest_version") if isinstance(model.get("latest_version"), dict) else {}
            try:
                self._read(caller, f"/v1/models/{ref.model}/versions", f"the versions of '{ref.model}'")
                kind = "community"
            except _NotFound:
                kind = "official"  # official models list no versions
            doc = {"kind": kind, "model": ref.model, "version": latest.get("id"),
                   "description": str(model.get("description") or "")[:500]}
            if kind == "official":
                doc["openapi_schema"] = _schema_of(latest, ref.model)
            return doc
        return self._cache.get(ref.model, self._or_unknown(fetch, f"Model '{ref.model}' is not known to "
                                                            "Replicate (check the owner and name)"))

    def _version_entry(self, model: str, version: str, caller: CallerSource) -> CachedSchema:
        fetch = self._or_unknown(lambda: self._fetch_version(model, version, caller),
                                 f"Replicate knows no version '{version}' of model '{model}'")
        return self._cache.get(f"{model}:{version}", fetch)

    def _fetch_version(self, model: str, version: str, caller: CallerSource) -> dict[str, Any]:
        found = self._read(caller, f"/v1/models/{model}/versions/{version}", f"version '{version}' of '{model}'")
        self._cache.put(f"version:{version}", {"kind": "version-of", "model": model})
        return {"kind": "version", "model": model, "version": version, "description": "",
                "openapi_schema": _schema_of(found, f"{model}:{version}")}

    def _deployment_entry(self, ref: ModelRef, caller: CallerSource) -> CachedSchema:
        def fetch() -> dict[str, Any]:
            found = self._read(caller, f"/v1/deployments/{ref.model}", f"deployment '{ref.model}'")
            release = found.get("current_release") if isinstance(found.get("current_release"), dict) else {}
            model, version = release.get("model"), release.get("version")
            if not isinstance(model, str) or not isinstance(version, str):
                raise ServiceError(400, f"Deployment '{ref.model}' has no current release to run",
                                   field="model_name")
            # Not through the cache's own lock for the version's key: a fetch never waits on
            # another key's lock, so two fetches can never wait on each other.
            known = self._cache.peek(f"{model}:{version}")
            doc = known.document if known is not None else self._fetch_version(model, version, caller)
            return {"kind": "deployment", "model": model, "version": version, "deployment": ref.model,
                    "description": f"deployment {ref.model} (release {release.get('number')})",
                    "openapi_schema": doc["openapi_schema"]}
        key = f"{ref.canonical}@{caller().account[:16]}"
        return self._cache.get(key, self._or_unknown(fetch, f"Deployment '{ref.model}' is not known to "
                                                     "Replicate for this token"))

    @staticmethod
    def _or_unknown(fetch: Callable[[], dict[str, Any]], message: str) -> Callable[[], dict[str, Any]]:
        """`fetch`, with Replicate's 404 turned into a 400 naming the reference."""
        def run() -> dict[str, Any]:
            try:
                return fetch()
            except _NotFound:
                raise ServiceError(400, message, field="model_name") from None
        return run

    def _read(self, caller: CallerSource, path: str, what: str) -> dict[str, Any]:
        """One paced GET with the caller's token; errors become answers a client can act on."""
        who = caller()
        pause = self._pace(who.account)
        if pause > MAX_READ_PAUSE:
            raise ServiceError(503, f"The account's read budget is exhausted; reading {what} would wait "
                               f"{pause:.0f} s", headers={"Retry-After": str(int(pause) + 1)})
        if pause > 0:
            time.sleep(pause)
        try:
            with self._sessions.using(who.token) as session:
                found = session.read_json(path)
        except UpstreamError as exc:
            if exc.status == 404:
                raise _NotFound from None
            if exc.status in (401, 402, 403):
                raise ServiceError(exc.status, f"Replicate refused to show {what}: {exc.detail}") from None
            if exc.status == 429:
                retry = int(exc.retry_after or 5) + 1
                raise ServiceError(503, f"Replicate is throttling reads of {what}; retry later",
                                   headers={"Retry-After": str(retry)}) from None
            raise ServiceError(502, f"Replicate answered {exc.status} reading {what}: {exc.detail}") from None
        except httpx.TransportError as exc:
            raise ServiceError(502, f"Replicate could not be reached to read {what} "
                               f"({type(exc).__name__})") from None
        if not isinstance(found, dict):
            raise ServiceError(502, f"Replicate answered something unexpected reading {what}")
        return found

    # -- discovery --------------------------------------------------------------------------
    def describe_known(self) -> list[dict[str, Any]]:
        """Every model with a fresh schema here (account-scoped deployments left out)."""
        shown = []
        for key, entry in self._cache.fresh_entries():
            kind = entry.document.get("kind")
            if kind not in ("official", "version"):
                continue
            ref = parse_reference(key)
            if ref is not None:  # a curated model's table shows on top of its schema
                shown.append(describe_spec(self._spec_of(ref, entry)))
        return shown

    def describe(self, name: str, caller: CallerSource) -> dict[str, Any]:
        """What `/models/<name>` shows: parameters with types, defaults, ranges and allowed
        values. `caller` is asked for only when the schema must be read upstream."""
        text = name.strip()
        curated = BY_NAME.get(text)
        if curated is not None:
            self._allow(curated.run_target)
            if text == curated.replicate_name and curated.target is None:
                # `owner/name` of a curated model: its published schema, the table's rules on top
                entry = self._model_entry(curated.run_target, caller)
                return describe_spec(dataclasses.replace(curated, schema=entry.schema))
            shown = [m for m in describe_models() if m["id"] == curated.id]  # an alias: as /models shows it
            return shown[0] if shown else describe_spec(curated)
        alias = self._aliases.get(text)
        if alias is not None:
            return {**self.describe(alias.model, caller), "alias": alias.name, "defaults": alias.defaults}
        ref = parse_reference(text)
        if ref is None and BARE_VERSION.fullmatch(text):
            ref = self._known_version(text)
        if ref is None:
            raise ServiceError(404, f"No model '{text[:200]}': name an alias or 'owner/name'",
                               supported_models=self.names())
        self._allow(ref)
        try:
            return describe_spec(self._spec(ref, caller))
        except ServiceError as exc:
            latest = exc.extra.get("latest_version")
            if not latest:
                raise
            described = describe_spec(self._spec(parse_reference(latest), caller))
            return {**described, "version_required": True, "latest_version": latest}


class _NotFound(Exception):
    """Replicate answered 404."""


def _schema_of(version: dict[str, Any], what: str) -> dict[str, Any]:
    schema = version.get("openapi_schema") if isinstance(version, dict) else None
    if not isinstance(schema, dict):
        raise ServiceError(502, f"Replicate publishes no input schema for '{what}'")
    return schema
