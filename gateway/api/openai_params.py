"""OpenAI's image request fields, read and turned into a Replicate model's parameters.

One reader serves `/v1/images/generations` (a JSON body) and `/v1/images/edits` (a form,
whose values arrive as text and are turned into numbers and booleans first). What maps:

- `size` `WxH`: the model's `aspect_ratio` within 2% of W/H, else `width`/`height` where the
  model takes them and the sides are in range; anything else is a 400 listing what the model
  can make. `auto` (or no size) leaves the model's default.
- `output_format` (`jpeg` is the model's `jpg`), `output_compression` -> `output_quality`,
  `quality` -> the model's `quality`, or qwen's `image_size`; `style` -> the model's `style`.
  Where the model has no such parameter, `quality` and `style` are accepted and ignored, as
  OpenAI does for its models that lack them.
- `replicate_input`: any other model parameter, as the model names it.

Model parameters are validated by `build_input`, as for `/generate`; a 400 names the field
as the client sent it (`size`, `replicate_input.guidance`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from gateway.config import Settings
from gateway.engine.models import ModelSpec, Param, build_input, check_prompt, param_of
from gateway.errors import ServiceError

MAX_IMAGES = 10
EDIT_IMAGE_PARAMS = ("input_image", "image", "init_image")  # where an edit's image goes, first found
RATIO_TOLERANCE = 0.02
QUALITIES = ("auto", "standard", "hd", "low", "medium", "high")
STYLES = ("vivid", "natural")
RESPONSE_FORMATS = ("url", "b64_json")
OUTPUT_FORMATS = {"jpeg": "jpg"}  # OpenAI's spelling -> the models'
# quality -> a model parameter of another name, where its values mean the same thing
QUALITY_PARAMS = {"image_size": {"hd": "optimize_for_quality", "high": "optimize_for_quality",
                                 "low": "optimize_for_speed"}}
# OpenAI fields with no Replicate counterpart: checked, then ignored
IGNORED_CHOICES = {"background": ("transparent", "opaque", "auto"), "moderation": ("low", "auto"),
                   "input_fidelity": ("high", "low")}
COMMON_FIELDS = frozenset({"model", "prompt", "n", "size", "response_format", "output_format",
                           "output_compression", "quality", "user", "background", "stream",
                           "partial_images", "replicate_input"})
GENERATION_FIELDS = COMMON_FIELDS | {"style", "moderation"}
EDIT_FIELDS = COMMON_FIELDS | {"input_fidelity"}
Resolver = Callable[[str], ModelSpec]
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
_RATIO = re.compile(r"([1-9][0-9]{0,2}):([1-9][0-9]{0,2})")


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    spec: ModelSpec
    prompt: str
    n: int
    response_format: str
    params: dict[str, Any]          # the model's parameters, validated


def bad(param: str, message: str) -> ServiceError:
    return ServiceError(400, message, field=param)


def read_request(body: Mapping[str, Any], allowed: frozenset[str], settings: Settings, resolve: Resolver,
                 uploads: Callable[[ModelSpec], Mapping[str, tuple[str, str]]] | None = None,
                 form: bool = False) -> ImageRequest:
    """An OpenAI image request. `resolve` finds the model (the model catalog, for the caller);
    `uploads(spec)` gives the model parameters made from uploaded files (parameter -> (the
    upload's field, a data URI)); `form`: the values came as form text (see `form_values`).
    ServiceError 400/403/404 naming the OpenAI field."""
    unknown = sorted(str(k)[:60] for k in body if k not in allowed)
    if unknown:
        raise bad(unknown[0], f"Unrecognized request argument(s): {', '.join(unknown[:5])}; "
                  f"allowed: {', '.join(sorted(allowed))}")
    spec = model_of(body.get("model"), resolve)
    prompt = _prompt(spec, body.get("prompt"), settings)
    n = _whole(body.get("n", 1), "n", 1, min(MAX_IMAGES, settings.max_batch_size), default=1)
    response_format = _choice(body.get("response_format"), "response_format", RESPONSE_FORMATS) or "url"
    _check_ignored(body)
    mapped: dict[str, tuple[str, Any]] = {}  # model parameter -> (OpenAI field, value)
    for field, values in _mapped_fields(spec, body).items():
        mapped.update({name: (field, value) for name, value in values.items()})
    if uploads is not None:
        mapped.update(uploads(spec))
    extra = body.get("replicate_input")
    if form and isinstance(extra, dict):
        extra = typed_form_input(spec, extra)
    return ImageRequest(spec, prompt, n, response_format, model_input(spec, mapped, extra))


def model_of(name: Any, resolve: Resolver) -> ModelSpec:
    """The model `name` names, if this gateway runs it: 400 missing or malformed, 404 unknown,
    403 outside ALLOWED_MODELS (all before anything is created upstream)."""
    if not isinstance(name, str) or not name.strip():
        raise bad("model", "Missing required argument 'model': a model id (such as flux-dev) or Replicate name")
    try:
        return resolve(name)
    except ServiceError as exc:
        if exc.status == 400 and "supported_models" in exc.extra:  # a name nobody knows
            raise ServiceError(404, f"The model '{name[:200]}' does not exist on this gateway; see GET /v1/models",
                               field="model", code="model_not_found") from None
        code = "model_not_allowed" if exc.status == 403 else None
        message = exc.message.replace("'model_name'", "'model'")  # the field as this API names it
        raise ServiceError(exc.status, message, exc.headers, **{**exc.extra, "field": "model", "code": code}) \
            from None


def _prompt(spec: ModelSpec, value: Any, settings: Settings) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad("prompt", "Invalid value for 'prompt': a non-empty string is required")
    if len(value) > settings.max_prompt_length:
        raise bad("prompt", f"Invalid value for 'prompt': longer than the {settings.max_prompt_length}-character "
                  "limit (MAX_PROMPT_LENGTH)")
    return check_prompt(spec, "prompt", value)  # a model whose prompt fills another input checks it too


def param(spec: ModelSpec, name: str) -> Param | None:
    """The rule of the model's input `name` (curated, or from its published schema); None if
    the model does not take it."""
    return param_of(spec, name) if name in spec.accepted else None


def _whole(value: Any, field: str, low: int, high: int, default: int | None = None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(field, f"Invalid value for '{field}': {str(value)[:40]!r}; allowed: a whole number "
                  f"from {low} to {high}")
    return value


def _choice(value: Any, field: str, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise bad(field, f"Invalid value for '{field}': {str(value)[:60]!r}; allowed: {', '.join(choices)}")
    return value


def _check_ignored(body: Mapping[str, Any]) -> None:
    for field, choices in IGNORED_CHOICES.items():
        _choice(body.get(field), field, choices)
    _whole(body.get("partial_images"), "partial_images", 0, 3)
    if body.get("stream") not in (None, False):
        raise bad("stream", "Invalid value for 'stream': streaming is not supported; allowed: false")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "Invalid value for 'user': a string is required")


def _mapped_fields(spec: ModelSpec, body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """OpenAI field -> the model parameters it becomes."""
    return {"size": size_params(spec, body.get("size")),
            "output_format": _format_params(spec, body.get("output_format")),
            "output_compression": _compression_params(spec, body.get("output_compression")),
            "quality": _quality_params(spec, body.get("quality")),
            "style": _style_params(spec, body.get("style"))}


# -- size ------------------------------------------------------------------------------------
def _ratios(spec: ModelSpec) -> dict[str, float]:
    """The model's `aspect_ratio` choices that are ratios (not `match_input_image`, `custom`)."""
    rule = param(spec, "aspect_ratio")
    found = {}
    for choice in rule.choices if rule else ():
        match = _RATIO.fullmatch(str(choice))
        if match:
            found[choice] = int(match[1]) / int(match[2])
    return found


def _side_range(rule: Param | None) -> tuple[float, float] | None:
    if rule is None or rule.kind not in ("integer", "number"):
        return None
    return (rule.minimum if rule.minimum is not None else 1, rule.maximum if rule.maximum is not None else 1e9)


def size_params(spec: ModelSpec, size: Any) -> dict[str, Any]:
    """`WxH` as the model's parameters; 400 listing the sizes it can make otherwise."""
    if size is None or size == "auto":
        return {}
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match:
        width, height = int(match[1]), int(match[2])
        ratios = _ratios(spec)
        near = min(ratios, key=lambda c: abs(width / height / ratios[c] - 1), default=None)
        if near is not None and abs(width / height / ratios[near] - 1) <= RATIO_TOLERANCE:
            return {"aspect_ratio": near}
        sides = _side_range(param(spec, "width")), _side_range(param(spec, "height"))
        if sides[0] and sides[1] and sides[0][0] <= width <= sides[0][1] and sides[1][0] <= height <= sides[1][1]:
            custom = "custom" in getattr(param(spec, "aspect_ratio"), "choices", ())
            return {"width": width, "height": height, **({"aspect_ratio": "custom"} if custom else {})}
    raise bad("size", f"Invalid value for 'size': {str(size)[:40]!r}; allowed for model '{spec.id}': "
              f"{', '.join(allowed_sizes(spec))}")


def allowed_sizes(spec: ModelSpec) -> list[str]:
    """What `size` may be for this model, for error messages and the README."""
    shown = ["auto"]
    for choice, ratio in _ratios(spec).items():
        width, height = (1024, round(1024 / ratio)) if ratio >= 1 else (round(1024 * ratio), 1024)
        shown.append(f"{width}x{height} ({choice})")
    if len(shown) > 1:
        shown.append(f"or any WxH within {RATIO_TOLERANCE:.0%} of one of those aspect ratios")
    sides = _side_range(param(spec, "width")), _side_range(param(spec, "height"))
    if sides[0] and sides[1]:
        shown.append(f"any WxH with a width from {sides[0][0]:g} to {sides[0][1]:g} "
                     f"and a height from {sides[1][0]:g} to {sides[1][1]:g}")
    return shown


# -- the other mapped fields -----------------------------------------------------------------
def _format_params(spec: ModelSpec, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if param(spec, "output_format") is None:
        raise bad("output_format", f"Invalid value for 'output_format': model '{spec.id}' has no output format "
                  "to choose; leave it out")
    return {"output_format": OUTPUT_FORMATS.get(value, value) if isinstance(value, str) else value}


def _compression_params(spec: ModelSpec, value: Any) -> dict[str, Any]:
    _whole(value, "output_compression", 0, 100)
    return {"output_quality": value} if value is not None and param(spec, "output_quality") else {}


def _quality_params(spec: ModelSpec, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if param(spec, "quality"):
        return {"quality": value}
    _choice(value, "quality", QUALITIES)
    for name, table in QUALITY_PARAMS.items():
        rule = param(spec, name)
        if rule and table.get(value) in rule.choices:
            return {name: table[value]}
    return {}  # accepted and ignored, as OpenAI does for models without it


def _style_params(spec: ModelSpec, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if param(spec, "style"):
        return {"style": value}
    _choice(value, "style", STYLES)
    return {}


# -- everything, validated by the model -----------------------------------------------------
def model_input(spec: ModelSpec, mapped: dict[str, tuple[str, Any]], extra: Any) -> dict[str, Any]:
    """The model's input from the mapped OpenAI fields (parameter -> (field, value)) and
    `replicate_input`; validated by the model's table, errors naming the client's field."""
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise bad("replicate_input", "Invalid value for 'replicate_input': an object of model parameters "
                  "is required")
    allowed = [name for name in spec.accepted if name not in (spec.prompt_input, "prompt")]
    for name in extra:
        if name not in allowed:
            raise bad(f"replicate_input.{str(name)[:60]}", f"Unknown field {str(name)[:60]!r} in 'replicate_input' "
                      f"for model '{spec.id}'; allowed: {', '.join(allowed)}")
        if name in mapped:
            raise bad(f"replicate_input.{name}", f"'replicate_input.{name}' conflicts with '{mapped[name][0]}'; "
                      "give one of them")
    origin = {name: field for name, (field, _) in mapped.items()}
    try:
        return build_input(spec, {**{name: value for name, (_, value) in mapped.items()}, **extra})
    except ServiceError as exc:
        name = exc.extra.get("field")
        field = origin.get(name) or (f"replicate_input.{name}" if name in extra else name)
        message = exc.message
        if name in EDIT_IMAGE_PARAMS and name not in mapped and message.startswith("Missing required"):
            message += "; send the image to POST /v1/images/edits"
        raise ServiceError(exc.status, message, exc.headers, **{**exc.extra, "field": field}) from None


def form_values(form: Mapping[str, str]) -> dict[str, Any]:
    """A multipart form as the JSON body it stands for: numbers and booleans from their text,
    `replicate_input` from JSON text or from `replicate_input[name]` fields (the OpenAI SDKs
    send nested objects that way), each value read as its parameter's kind."""
    body: dict[str, Any] = {}
    nested: dict[str, str] = {}
    for key, value in form.items():
        inner = re.fullmatch(r"replicate_input\[([^\[\]]{1,200})\]", key)
        if inner:
            nested[inner[1]] = value
        elif key in ("n", "output_compression", "partial_images"):
            body[key] = int(value) if re.fullmatch(r"[0-9]{1,6}", value) else value
        elif key == "stream":
            body[key] = {"true": True, "false": False}.get(value.lower(), value)
        elif key == "replicate_input":
            body[key] = _json_text(value)
        else:
            body[key] = value
    if nested:
        if "replicate_input" in body:
            raise bad("replicate_input", "Give 'replicate_input' as one JSON object or as replicate_input[name] "
                      "fields, not both")
        body["replicate_input"] = dict(nested)
    return body


def _json_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise bad("replicate_input", "Invalid value for 'replicate_input': a JSON object of model parameters "
                  "is required") from None


def typed_form_input(spec: ModelSpec, values: dict[str, Any]) -> dict[str, Any]:
    """`replicate_input[name]` form text as the parameter's kind: `3.5` a number, `true` a
    boolean, a string parameter's text as it is."""
    typed = {}
    for name, value in values.items():
        rule = param(spec, name)
        if isinstance(value, str) and rule is not None and rule.kind in ("integer", "number", "boolean"):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # left as text: the model's check names it
        typed[name] = value
    return typed
