"""The model registry (one table) and the code that turns a request into an upstream input.

Each curated model is an entry of MODELS: its Replicate name, what it answers (a list of
files or a single file) and its parameter table. Adding a model is adding an entry. Where
the service spec and the real model schema differ, the real schema decides: wider choices
are accepted, stricter bounds are enforced here, so a client gets a 400 instead of a
paid-for failure.

Any other Replicate model gets a ModelSpec built from its published schema (registry.py):
its rules come from the schema (`schema`), and a curated table, where there is one, adds
its stricter rules on top (`params`). `build_input` is the one validation of both.
"""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
import math
import reprlib
import threading
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlparse

from gateway.engine.references import ModelRef, RunBy, official, parse_reference
from gateway.errors import ServiceError

MAX_URI_LENGTH = 20 * 1024 * 1024  # a data URI carries the whole image


@dataclasses.dataclass(frozen=True)
class Param:
    kind: str                         # string | integer | number | boolean | image | uri | array | object | any
    default: Any = None
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False
    aliases: dict = dataclasses.field(default_factory=dict)  # accepted spellings -> value

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "image":
            return "an http(s) URL or a data: URI of an image"
        bounds = ""
        if self.minimum is not None and self.maximum is not None:
            bounds = f" from {self.minimum:g} to {self.maximum:g}"
        elif self.minimum is not None:
            bounds = f" of at least {self.minimum:g}"
        elif self.maximum is not None:
            bounds = f" of at most {self.maximum:g}"
        noun = {"integer": "a whole number", "number": "a number", "boolean": "true or false",
                "string": "a string", "uri": "an http(s) URL or a data: URI", "array": "a list",
                "object": "a JSON object", "any": "any JSON value"}[self.kind]
        return noun + bounds + (" or null" if self.nullable else "")


class SchemaRules(Protocol):
    """A model's published input schema, as `build_input` uses it (schemas.InputSchema)."""

    @property
    def names(self) -> list[str]: ...      # the inputs, in the schema's display order (`x-order`)

    @property
    def required(self) -> tuple[str, ...]: ...

    def param(self, name: str) -> Param: ...   # an input's rule, for messages and /models

    def check(self, name: str, value: Any) -> Any: ...  # the value to send; 400 if invalid


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    id: str                                       # what jobs journal; resolve_model(id) finds it again
    replicate_name: str
    purpose: str
    output: str                                   # "list", "single", "object", "text" or "any"
    params: dict[str, Param]                      # the curated table: rules on top of the schema
    required: tuple[str, ...] = ()
    target: ModelRef | None = None                # how to run it; None: the official model replicate_name
    schema: SchemaRules | None = None             # the published input schema, when known
    closed: bool = True                           # only `params` are accepted (the curated models)
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # an operator alias's
    stem: str = ""                                # default file name base; "" means `id`
    prompt_input: str = "prompt"                  # the input a request's prompt fills

    @property
    def run_target(self) -> ModelRef:
        return self.target or official(self.replicate_name)

    @property
    def accepted(self) -> list[str]:
        """The model parameters a request may give (besides the prompt)."""
        names = list(self.params)
        if self.schema is not None and not self.closed:
            names += [n for n in self.schema.names if n not in self.params]
        return [n for n in names if n != self.prompt_input or n == "prompt"]

    @property
    def file_stem(self) -> str:
        return self.stem or self.id

    def upstream_input(self, data: dict[str, Any]) -> dict[str, Any]:
        """An item's data (`prompt` + parameters) as the model takes it: a model without a
        `prompt` input gets the prompt in its own prompt input (`text`, `image`)."""
        if self.prompt_input == "prompt" or "prompt" not in data:
            return data
        rest = {k: v for k, v in data.items() if k != "prompt"}
        return {self.prompt_input: data["prompt"], **rest}


def _ratio(*values: str, default: str) -> Param:
    return Param("string", default, choices=values)


_COMMON = {
    "seed": Param("integer", None, nullable=True),
    "output_quality": Param("integer", 80, minimum=0, maximum=100),
    "go_fast": Param("boolean", True),
    "disable_safety_checker": Param("boolean", False),
}

MODELS: dict[str, ModelSpec] = {spec.id: spec for spec in [
    ModelSpec("flux-dev", "black-forest-labs/flux-dev", "Fast text-to-image", "list", {
        "aspect_ratio": _ratio("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3",
                               "9:16", "9:21", default="1:1"),
        "image": Param("image"),
        "prompt_strength": Param("number", 0.8, minimum=0, maximum=1),
        "num_outputs": Param("integer", 1, minimum=1, maximum=4),
        "num_inference_steps": Param("integer", 28, minimum=1, maximum=50),
        "guidance": Param("number", 3, minimum=0, maximum=10),
        "output_format": Param("string", "webp", choices=("webp", "jpg", "png")),
        "megapixels": Param("string", "1", choices=("1", "0.25"), aliases={1: "1", 0.25: "0.25"}),
        **_COMMON,
    }),
    ModelSpec("flux-kontext-max", "black-forest-labs/flux-kontext-max",
              "Image editing with context", "single", {
        "input_image": Param("image"),
        "aspect_ratio": _ratio("match_input_image", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2",
                               "2:3", "4:5", "5:4", "21:9", "9:21", "2:1", "1:2",
                               default="match_input_image"),
        "output_format": Param("string", "png", choices=("png", "jpg")),
        "seed": Param("integer", None, nullable=True),
        # The model takes 0..6, but at most 2 with an input image, and this service always
        # requires input_image: so 0..2 is the real range, and /models shows it.
        "safety_tolerance": Param("integer", 2, minimum=0, maximum=2),
        "prompt_upsampling": Param("boolean", False),
    }, required=("input_image",)),
    ModelSpec("qwen-image", "qwen/qwen-image", "Chinese-optimized generation", "list", {
        "aspect_ratio": _ratio("16:9", "1:1", "9:16", "4:3", "3:4", "3:2", "2:3", default="16:9"),
        "image": Param("image"),
        "image_size": Param("string", "optimize_for_quality",
                            choices=("optimize_for_quality", "optimize_for_speed")),
        "guidance": Param("number", 3, minimum=0, maximum=10),
        "strength": Param("number", 0.9, minimum=0, maximum=1),
        "num_inference_steps": Param("integer", 30, minimum=1, maximum=50),
        "lora_scale": Param("number", 1),
        "lora_weights": Param("string", None, nullable=True),
        "extra_lora_weights": Param("string", None, nullable=True),
        "extra_lora_scale": Param("number", None, nullable=True),
        "enhance_prompt": Param("boolean", False),
        "negative_prompt": Param("string", " "),
        "output_format": Param("string", "webp", choices=("webp", "jpg", "png")),
        **_COMMON,
    }),
]}

BY_NAME = {**MODELS, **{spec.replicate_name: spec for spec in MODELS.values()}}


def supported_models() -> list[str]:
    return list(MODELS)


def resolve_model(name: Any) -> ModelSpec:
    """The spec of a short id (`flux-dev`) or full Replicate name; 400 otherwise.

    A reference (`owner/name[:version]`, `deployments/owner/name`) gives the spec that runs
    it without reading anything upstream: what a journaled job needs to run again. Requests
    are resolved by registry.ModelCatalog, which also checks the allowlist and validates."""
    if not isinstance(name, str) or not name:
        raise ServiceError(400, "Missing required field 'model_name' (a model id or Replicate name)",
                           field="model_name", supported_models=supported_models())
    spec = BY_NAME.get(name.strip())
    if spec is None:
        ref = parse_reference(name)
        if ref is None:
            raise ServiceError(400, f"Model '{name[:200]}' not supported",
                               supported_models=supported_models())
        spec = _RESOLVED.get(ref.canonical) or spec_of_reference(ref)
    return spec


# The specs the catalog (registry.py) built from published schemas, by id, so a journaled job
# launched or resumed in this process runs with the same spec (its prompt input, its
# target) as the request that submitted it. Bounded: least recently resolved first out.
_RESOLVED: collections.OrderedDict[str, ModelSpec] = collections.OrderedDict()
_RESOLVED_LOCK = threading.Lock()
RESOLVED_KEPT = 1024


def remember(spec: ModelSpec) -> ModelSpec:
    with _RESOLVED_LOCK:
        _RESOLVED[spec.id] = spec
        _RESOLVED.move_to_end(spec.id)
        while len(_RESOLVED) > RESOLVED_KEPT:
            _RESOLVED.popitem(last=False)
    return spec


def spec_of_reference(ref: ModelRef, schema: SchemaRules | None = None, purpose: str = "",
                      replicate_name: str | None = None, output: str = "any") -> ModelSpec:
    """The spec that runs `ref`. Without a schema it only knows how to run it (a journaled
    job resumed: its parameters were validated when it was submitted). A curated model
    named by version keeps its stricter rules on top of the version's schema."""
    curated = BY_NAME.get(ref.model) if ref.run_by is not RunBy.DEPLOYMENT else None
    prompt_input = "prompt"
    if schema is not None and "prompt" not in schema.names:
        texts = [n for n in schema.required if schema.param(n).kind in ("string", "uri")]
        prompt_input = texts[0] if texts else "prompt"
    return ModelSpec(ref.canonical, replicate_name or ref.model, purpose, output,
                     dict(curated.params) if curated else {}, curated.required if curated else (),
                     target=ref, schema=schema, closed=False, stem=ref.name, prompt_input=prompt_input)


def check_allowed(reference: str, patterns: Sequence[str]) -> None:
    """Return if the Replicate name `reference` matches one of `patterns` (ALLOWED_MODELS,
    fnmatch globs such as `black-forest-labs/*`); ServiceError 403 otherwise."""
    if not any(fnmatch.fnmatchcase(reference, pattern) for pattern in patterns):
        raise ServiceError(403, f"Model '{reference[:200]}' is not allowed on this gateway; allowed "
                           f"(ALLOWED_MODELS): {', '.join(patterns) or 'none'}",
                           field="model_name", allowed_models=list(patterns))


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()  # cuts a long value as it goes: no 16 MB repr of a 16 MB string
    short.maxstring = short.maxother = short.maxlong = 80
    short.maxlist = short.maxdict = short.maxtuple = 4
    return short


_SHORT = _short_repr()


def invalid(field: str, value: Any, allowed: str) -> ServiceError:
    if isinstance(value, int) and value.bit_length() > 1024:  # repr() refuses ints past 4300 digits
        shown = f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    else:
        shown = _SHORT.repr(value)
    return ServiceError(400, f"Invalid value for '{field}': {shown}; allowed: {allowed}",
                        field=field, allowed=allowed)


def _is_image_ref(value: str) -> bool:
    if len(value) > MAX_URI_LENGTH:
        return False
    if value.startswith("data:"):
        head = value[5:value.find(",")] if "," in value else ""
        return head.startswith("image/")
    try:
        parsed = urlparse(value)
        _ = parsed.port  # raises ValueError for a port that is not a number 0-65535
    except ValueError:  # "http://[x" (a broken IPv6 host) or "http://h:xx/": not a URL
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.hostname) and not parsed.username


MAX_WHOLE = 2**63 - 1  # no model takes more, and sqlite's INTEGER holds no more


def check_param(name: str, param: Param, value: Any) -> Any:
    """Return the value to send upstream, or raise a 400 naming field, value and rule.

    `value` is any JSON value: a list or object, a bool, a whole number of 300 digits."""
    if value is None and param.nullable:
        return None
    if param.aliases and isinstance(value, (str, int, float)) and not isinstance(value, bool) \
            and value in param.aliases:  # only scalars: a list or object is unhashable
        value = param.aliases[value]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    kind_ok = {
        "string": isinstance(value, str),
        "image": isinstance(value, str),
        "uri": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": number and isinstance(value, int),
        # an int is finite, and math.isfinite() of a huge one raises OverflowError
        "number": number and (isinstance(value, int) or math.isfinite(value)),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
        "any": True,
    }[param.kind]
    if not kind_ok or (param.choices and value not in param.choices):
        raise invalid(name, value, param.describe())
    if param.minimum is not None and value < param.minimum or \
            param.maximum is not None and value > param.maximum:
        raise invalid(name, value, param.describe())
    if number and abs(value) > MAX_WHOLE:  # an unbounded one, as `seed`
        raise invalid(name, value, f"{param.describe()}, at most {MAX_WHOLE} in magnitude")
    if isinstance(value, float):
        value += 0.0  # -0.0 becomes 0.0: the sign of zero means nothing to a model
    if param.kind == "image" and not _is_image_ref(value):
        raise invalid(name, value, param.describe() + " (never a path on the server)")
    if param.kind == "uri" and not is_uri_ref(value):
        raise invalid(name, value, param.describe() + " (never a path on the server)")
    return value


def is_uri_ref(value: str) -> bool:
    """An http(s) URL or a data: URI of any type (audio, video, ...): never a server path."""
    if value.startswith("data:"):
        return len(value) <= MAX_URI_LENGTH and "," in value
    return _is_image_ref(value)


def build_input(spec: ModelSpec, fields: dict[str, Any]) -> dict[str, Any]:
    """Validate the model parameters of a request; return them as the upstream input.

    One path for every model: each parameter is checked against the curated table where
    it has an entry (the stricter rule, which may also convert a value, e.g. megapixels 1 to
    "1"), then against the published schema when the spec has one. An operator alias's
    defaults are checked the same way. Only parameters the client (or the alias) gave are
    sent: the model applies its own defaults.
    """
    values = {**spec.defaults, **fields}
    unknown = [name for name in fields if name not in spec.accepted]
    if unknown:
        raise ServiceError(400, f"Unknown field(s) {', '.join(repr(u[:60]) for u in unknown[:5])} for "
                           f"model '{spec.id}'; allowed: {', '.join(spec.accepted)}",
                           allowed_fields=spec.accepted)
    for name in spec.defaults:
        if name not in fields and name not in spec.accepted:
            raise ServiceError(400, f"The alias of model '{spec.id}' sets '{name}', which the model "
                               f"does not take (see MODELS_FILE); allowed: {', '.join(spec.accepted)}",
                               field=name)
    checked = {}
    for name in _in_order(spec, values):
        value = values[name]
        if name in spec.params:
            value = check_param(name, spec.params[name], value)
        if spec.schema is not None and name in spec.schema.names:
            value = spec.schema.check(name, value)
        checked[name] = value
    for name in _required(spec):
        if checked.get(name) is None:
            raise ServiceError(400, f"Missing required field '{name}' for model '{spec.id}'; "
                               f"allowed: {param_of(spec, name).describe()}", field=name)
    return checked


def _in_order(spec: ModelSpec, values: dict[str, Any]) -> list[str]:
    """The given names in the schema's display order (so the first error is the first field
    a client reads in /models), the others after them as given."""
    order = spec.schema.names if spec.schema is not None else []
    return [n for n in order if n in values] + [n for n in values if n not in order]


def _required(spec: ModelSpec) -> list[str]:
    schema_required = spec.schema.required if spec.schema is not None else ()
    wanted = [*spec.required, *(n for n in schema_required if n not in spec.required)]
    return [n for n in wanted if n != spec.prompt_input]  # the prompt is checked as a prompt


def param_of(spec: ModelSpec, name: str) -> Param:
    """An input's rule as a client should read it: the curated one where there is one."""
    if name in spec.params:
        return spec.params[name]
    if spec.schema is not None and name in spec.schema.names:
        return spec.schema.param(name)
    return Param("any")


def check_prompt(spec: ModelSpec, field: str, value: str) -> str:
    """A prompt that fills a model input other than `prompt` (an image URL for a background
    remover) must pass that input's rule too; 400 naming the request's field."""
    if spec.prompt_input == "prompt" or spec.schema is None or spec.prompt_input not in spec.schema.names:
        return value
    try:
        spec.schema.check(spec.prompt_input, value)
    except ServiceError:
        raise invalid(field, value, f"{spec.schema.param(spec.prompt_input).describe()} (this model's "
                                    f"'{spec.prompt_input}' input)") from None
    return value


def outputs_of(spec: ModelSpec, output: Any) -> list[str]:
    """The output URLs of a prediction. A single-file model answers one string: it must not
    be iterated (that yields characters, or bytes of a file object)."""
    if output is None:
        return []
    if isinstance(output, (str, bytes)) or not isinstance(output, (list, tuple)):
        return [str(output)]
    return [str(item) for item in output if item]


def is_file_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://", "data:"))


def output_files(output: Any) -> list[tuple[str | None, str]]:
    """The files of an output of any shape, as (key, URL): one URL, a list of URLs (key
    None: numbered by position), an object holding URLs or lists of them (keyed by its
    keys). Text and other values hold no file."""
    if is_file_url(output):
        return [(None, output)]
    if isinstance(output, list):
        return [(None, item) for item in output if is_file_url(item)]
    if isinstance(output, dict):
        found: list[tuple[str | None, str]] = []
        for key, value in output.items():
            urls = [value] if is_file_url(value) else [v for v in value if is_file_url(v)] \
                if isinstance(value, list) else []
            found += [(str(key) if len(urls) == 1 else f"{key}_{n}", url) for n, url in enumerate(urls, 1)]
        return found
    return []


def has_data(output: Any) -> bool:
    """Whether an output holds anything besides file URLs (text, numbers, JSON)."""
    if isinstance(output, list):
        return any(has_data(item) for item in output)
    if isinstance(output, dict):
        return any(has_data(value) for value in output.values())
    return output is not None and not is_file_url(output)


OUTPUT_WORDS = {"single": "one file", "list": "a list of files", "object": "an object of named files",
                "text": "text (no file)", "any": "files or data, as the model answers"}


def describe_models() -> list[dict[str, Any]]:
    """The registry as `/models` shows it."""
    return [{
        "id": spec.id, "replicate_model": spec.replicate_name, "purpose": spec.purpose,
        "output": "one file" if spec.output == "single" else "a list of files",
        "required": ["prompt", *spec.required],
        "parameters": {name: {"type": p.kind, "default": p.default, "allowed": p.describe()}
                       for name, p in spec.params.items()},
    } for spec in MODELS.values()]


def describe_spec(spec: ModelSpec) -> dict[str, Any]:
    """Any model as `/models/<reference>` shows it: each parameter with its type, default,
    range and allowed values, the curated rule where there is one."""
    target = spec.run_target
    shown = {}
    for name in spec.accepted:
        param = param_of(spec, name)
        entry = {"type": param.kind, "default": param.default, "allowed": param.describe()}
        entry.update({k: v for k, v in (("minimum", param.minimum), ("maximum", param.maximum)) if v is not None})
        if param.choices:
            entry["choices"] = list(param.choices)
        shown[name] = entry
    return {
        "id": spec.id, "replicate_model": spec.replicate_name, "purpose": spec.purpose,
        "run_by": str(target.run_by), "version": target.version,
        "output": OUTPUT_WORDS.get(spec.output, spec.output),
        "prompt_input": spec.prompt_input, "required": ["prompt", *_required(spec)],
        "defaults": dict(spec.defaults), "parameters": shown,
    }
