"""A model's published input schema, and the cache that keeps schemas for MODEL_SCHEMA_TTL.

Replicate publishes each version's `openapi_schema` (OpenAPI 3.0, as Cog writes it): the
inputs are `components.schemas.Input`, enums are `allOf: [{"$ref": ...}]` to a component
(or inline, in newer Cog), `nullable` marks inputs that take null, `x-order` is the display
order. `InputSchema` validates with openapi-schema-validator's OAS30Validator, which
resolves those references and honours `nullable`; the service adds only what the schema
cannot say (a URI input is never a server path, whole numbers fit 64 bits).

`SchemaCache` keeps the documents in memory and in a `SchemaStore` (the job journal's
database) so a restart within the TTL reads nothing upstream, and fetches each key once
however many requests ask for it at the same moment (one lock per key).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from openapi_schema_validator import OAS30Validator

from gateway.engine.models import MAX_WHOLE, Param, check_param, invalid, is_uri_ref
from gateway.errors import ServiceError

KINDS = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean",
         "array": "array", "object": "object"}


class SchemaError(ValueError):
    """A published document the service cannot read as an input schema."""


def _resolve(prop: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """A property with its `allOf` references merged in (for messages; the validator
    resolves references itself)."""
    merged: dict[str, Any] = {}
    for part in prop.get("allOf", []):
        ref = part.get("$ref", "") if isinstance(part, dict) else ""
        target = components.get(ref.rsplit("/", 1)[-1]) if ref.startswith("#/components/schemas/") else part
        if isinstance(target, dict):
            merged.update(target)
    merged.update({k: v for k, v in prop.items() if k != "allOf"})
    return merged


def param_of_property(prop: dict[str, Any]) -> Param:
    """The Param a schema property amounts to: its type, default, choices and bounds."""
    kind = KINDS.get(prop.get("type"), "any")
    if kind == "string" and prop.get("format") == "uri":
        kind = "uri"
    choices = tuple(prop["enum"]) if isinstance(prop.get("enum"), list) else ()
    bound = lambda key: prop[key] if isinstance(prop.get(key), (int, float)) and not isinstance(  # noqa: E731
        prop.get(key), bool) else None
    return Param(kind, prop.get("default"), choices=choices, minimum=bound("minimum"), maximum=bound("maximum"),
                 nullable=bool(prop.get("nullable")))


class InputSchema:
    """The inputs of one model version: names in display order, required ones, each one's
    rule, and a validator of values. Implements models.SchemaRules."""

    def __init__(self, document: dict[str, Any]) -> None:
        try:
            components = document["components"]["schemas"]
            raw = components["Input"]
            props = raw["properties"]
        except (KeyError, TypeError):
            raise SchemaError("the document has no components.schemas.Input.properties") from None
        if not isinstance(props, dict) or not isinstance(components, dict):
            raise SchemaError("components.schemas.Input.properties is not an object")
        order = sorted(props, key=lambda n: (props[n].get("x-order", 1 << 30) if isinstance(props[n], dict)
                                             else 1 << 30, n))
        self._properties = {name: _resolve(props[name], components) for name in order
                            if isinstance(props[name], dict)}
        self._names = list(self._properties)
        required = raw.get("required") or []
        self._required = tuple(n for n in required if n in self._properties)
        # Required inputs and unknown names are the service's own checks (with its own
        # messages): the validator sees one property at a time, its rule alone.
        self._validators = {name: OAS30Validator({
            "type": "object", "properties": {name: props[name]}, "components": document["components"]})
            for name in self._names}
        self._params = {name: param_of_property(prop) for name, prop in self._properties.items()}
        output = components.get("Output")
        self.output_kind = _output_kind(_resolve(output, components) if isinstance(output, dict) else {})

    @property
    def names(self) -> list[str]:
        return self._names

    @property
    def required(self) -> tuple[str, ...]:
        return self._required

    def param(self, name: str) -> Param:
        return self._params[name]

    def description(self, name: str) -> str:
        return str(self._properties[name].get("description") or "")

    def check(self, name: str, value: Any) -> Any:
        """`value` as it is sent; a 400 naming the field, the value and what is allowed."""
        param = self._params[name]
        if value is None and param.nullable:
            return None  # `nullable` beside an `allOf` enum reference: the validator would see only the enum
        if next(iter(self._validators[name].iter_errors({name: value})), None) is not None:
            raise invalid(name, value, param.describe())
        if value is None:
            return None
        if param.kind in ("integer", "number", "uri"):  # what the schema cannot say
            return check_param(name, dataclasses.replace(param, choices=()), value)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_WHOLE:
            raise invalid(name, value, f"{param.describe()}, at most {MAX_WHOLE} in magnitude")
        items = self._properties[name].get("items")
        if isinstance(value, list) and isinstance(items, dict) and items.get("format") == "uri" and \
                not all(isinstance(v, str) and is_uri_ref(v) for v in value):
            raise invalid(name, value, "a list of http(s) URLs or data: URIs (never a path on the server)")
        return value


def _output_kind(output: dict[str, Any]) -> str:
    kind = output.get("type")
    if kind == "array":
        return "list"
    if kind == "object":
        return "object"
    if kind == "string":
        return "single" if output.get("format") == "uri" else "text"
    return "any"


class SchemaStore(Protocol):
    """Where schemas outlive the process (the job journal's database)."""

    def load_schema(self, key: str) -> tuple[float, dict[str, Any]] | None: ...

    def save_schema(self, key: str, fetched_at: float, document: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class CachedSchema:
    """What the cache holds for a key: the document as fetched (see registry.py for its
    fields) and when; the parsed input schema is built once, on first use."""

    document: dict[str, Any]
    fetched_at: float
    _parsed: InputSchema | None = None

    @property
    def schema(self) -> InputSchema:
        if self._parsed is None:
            self._parsed = InputSchema(self.document["openapi_schema"])
        return self._parsed


class SchemaCache:
    """Documents by key (`owner/name`, `owner/name:<version>`, a deployment), fresh for `ttl`
    seconds. `get` fetches a missing or stale key once, whoever else asks meanwhile: they
    wait for that fetch (a lock per key, striped so made-up keys cannot pile up locks)."""

    STRIPES = 64

    def __init__(self, store: SchemaStore | None, ttl: float, capacity: int = 2048,
                 clock: Callable[[], float] = time.time) -> None:
        self._store, self._ttl, self._capacity, self._clock = store, ttl, capacity, clock
        self._memory: collections.OrderedDict[str, CachedSchema] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(self.STRIPES)]

    def _fresh(self, entry: CachedSchema | None) -> bool:
        return entry is not None and self._clock() - entry.fetched_at < self._ttl

    def _remember(self, key: str, entry: CachedSchema) -> None:
        with self._lock:
            self._memory[key] = entry
            self._memory.move_to_end(key)
            while len(self._memory) > self._capacity:
                self._memory.popitem(last=False)

    def peek(self, key: str, stale: bool = False, memory_only: bool = False) -> CachedSchema | None:
        """The key's entry without fetching: fresh only, unless `stale`."""
        with self._lock:
            entry = self._memory.get(key)
        if entry is None and not memory_only and self._store is not None:
            stored = self._store.load_schema(key)
            if stored is not None:
                entry = CachedSchema(stored[1], stored[0])
                if self._fresh(entry):
                    self._remember(key, entry)
        return entry if entry is not None and (stale or self._fresh(entry)) else None

    def get(self, key: str, fetch: Callable[[], dict[str, Any]]) -> CachedSchema:
        """The key's fresh entry, fetched (once) if needed. `fetch` raises to refuse."""
        entry = self.peek(key, memory_only=True)
        if entry is not None:
            return entry
        with self._stripes[_stripe(key, self.STRIPES)]:
            entry = self.peek(key)  # whoever held the lock before may have fetched it
            if entry is not None:
                return entry
            return self.put(key, fetch())

    def put(self, key: str, document: dict[str, Any]) -> CachedSchema:
        entry = CachedSchema(document, self._clock())
        if "openapi_schema" in document:
            try:
                entry.schema  # noqa: B018  (parsed now: a document that cannot be read is not kept)
            except (SchemaError, KeyError, TypeError, ValueError) as exc:
                raise ServiceError(502, f"Replicate published a schema the service cannot read ({exc})") from None
        self._remember(key, entry)
        if self._store is not None:
            self._store.save_schema(key, entry.fetched_at, document)
        return entry

    def fresh_entries(self) -> list[tuple[str, CachedSchema]]:
        """Every entry in memory still fresh (what `/models` lists)."""
        with self._lock:
            entries = list(self._memory.items())
        return [(key, entry) for key, entry in entries if self._fresh(entry)]


@functools.lru_cache(maxsize=4096)
def _stripe(key: str, stripes: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % stripes
