"""The model registry (one table) and the code that turns a request into an upstream input.

Each model is an entry of MODELS: its Replicate name, what it answers (a list of files or a
single file) and its parameter table. Adding a model is adding an entry. Where the service
spec and the real model schema differ, the real schema decides: wider choices are accepted,
stricter bounds are enforced here, so a client gets a 400 instead of a paid-for failure.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
from typing import Any
from urllib.parse import urlparse

from gateway.errors import ServiceError

MAX_URI_LENGTH = 20 * 1024 * 1024  # a data URI carries the whole image


@dataclasses.dataclass(frozen=True)
class Param:
    kind: str                         # string | integer | number | boolean | image
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
        noun = {"integer": "a whole number", "number": "a number", "boolean": "true or false",
                "string": "a string"}[self.kind]
        return noun + bounds + (" or null" if self.nullable else "")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    id: str
    replicate_name: str
    purpose: str
    output: str                                   # "list" or "single"
    params: dict[str, Param]
    required: tuple[str, ...] = ()


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
    """The spec of a short id (`flux-dev`) or full Replicate name; 400 otherwise."""
    if not isinstance(name, str) or not name:
        raise ServiceError(400, "Missing required field 'model_name' (a model id or Replicate name)",
                           field="model_name", supported_models=supported_models())
    spec = BY_NAME.get(name.strip())
    if spec is None:
        raise ServiceError(400, f"Model '{name[:200]}' not supported",
                           supported_models=supported_models())
    return spec


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
        "boolean": isinstance(value, bool),
        "integer": number and isinstance(value, int),
        # an int is finite, and math.isfinite() of a huge one raises OverflowError
        "number": number and (isinstance(value, int) or math.isfinite(value)),
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
    return value


def build_input(spec: ModelSpec, fields: dict[str, Any]) -> dict[str, Any]:
    """Validate the model parameters of a request; return them as the upstream input.

    Only parameters the client gave are sent: the model applies its own defaults.
    """
    values = {name: check_param(name, spec.params[name], value) for name, value in fields.items()}
    for name in spec.required:
        if values.get(name) is None:
            raise ServiceError(400, f"Missing required field '{name}' for model '{spec.id}'; "
                               f"allowed: {spec.params[name].describe()}", field=name)
    return values


def outputs_of(spec: ModelSpec, output: Any) -> list[str]:
    """The output URLs of a prediction. A single-file model answers one string: it must not
    be iterated (that yields characters, or bytes of a file object)."""
    if output is None:
        return []
    if isinstance(output, (str, bytes)) or not isinstance(output, (list, tuple)):
        return [str(output)]
    return [str(item) for item in output if item]


def describe_models() -> list[dict[str, Any]]:
    """The registry as `/models` shows it."""
    return [{
        "id": spec.id, "replicate_model": spec.replicate_name, "purpose": spec.purpose,
        "output": "one file" if spec.output == "single" else "a list of files",
        "required": ["prompt", *spec.required],
        "parameters": {name: {"type": p.kind, "default": p.default, "allowed": p.describe()}
                       for name, p in spec.params.items()},
    } for spec in MODELS.values()]
