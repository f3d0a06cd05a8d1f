"""The three models' input schemas, as Replicate publishes them (OpenAPI), and a validator.

Kept apart from the service's own parameter table on purpose: the emulator checks the
service's validation from the outside, so the two must not share code.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any
from urllib.parse import urlparse

FLUX_DEV_RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
KONTEXT_RATIOS = ["match_input_image", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3",
                  "4:5", "5:4", "21:9", "9:21", "2:1", "1:2"]
QWEN_RATIOS = ["16:9", "1:1", "9:16", "4:3", "3:4", "3:2", "2:3"]


def _uri(description: str) -> dict:
    return {"type": "string", "format": "uri", "description": description}


def _num(kind: str, minimum: float | None, maximum: float | None, default: Any) -> dict:
    out: dict = {"type": kind, "default": default}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


def _enum(values: list, default: Any) -> dict:
    return {"type": "string", "enum": values, "default": default}


MODELS: dict[str, dict] = {
    "black-forest-labs/flux-dev": {
        "output": "list",
        "properties": {
            "prompt": {"type": "string"},
            "aspect_ratio": _enum(FLUX_DEV_RATIOS, "1:1"),
            "image": _uri("Input image for image-to-image mode"),
            "prompt_strength": _num("number", 0, 1, 0.8),
            "num_outputs": _num("integer", 1, 4, 1),
            "num_inference_steps": _num("integer", 1, 50, 28),
            "guidance": _num("number", 0, 10, 3),
            "seed": {"type": "integer"},
            "output_format": _enum(["webp", "jpg", "png"], "webp"),
            "output_quality": _num("integer", 0, 100, 80),
            "disable_safety_checker": {"type": "boolean", "default": False},
            "go_fast": {"type": "boolean", "default": True},
            "megapixels": _enum(["1", "0.25"], "1"),
        },
    },
    "black-forest-labs/flux-kontext-max": {
        "output": "single",
        "properties": {
            "prompt": {"type": "string"},
            "input_image": _uri("Image to use as reference (jpeg, png, gif, webp)"),
            "aspect_ratio": _enum(KONTEXT_RATIOS, "match_input_image"),
            "output_format": _enum(["png", "jpg"], "png"),
            "seed": {"type": "integer"},
            "safety_tolerance": _num("integer", 0, 6, 2),
            "prompt_upsampling": {"type": "boolean", "default": False},
        },
    },
    "qwen/qwen-image": {
        "output": "list",
        "properties": {
            "prompt": {"type": "string"},
            "seed": {"type": "integer", "nullable": True},
            "image": _uri("Input image for image-to-image"),
            "go_fast": {"type": "boolean", "default": True},
            "guidance": _num("number", 0, 10, 3),
            "strength": _num("number", 0, 1, 0.9),
            "image_size": _enum(["optimize_for_quality", "optimize_for_speed"], "optimize_for_quality"),
            "lora_scale": _num("number", None, None, 1),
            "aspect_ratio": _enum(QWEN_RATIOS, "16:9"),
            "lora_weights": {"type": "string", "nullable": True},
            "extra_lora_weights": {"type": "string", "nullable": True},
            "extra_lora_scale": {"type": "number", "nullable": True},
            "output_format": _enum(["webp", "jpg", "png"], "webp"),
            "enhance_prompt": {"type": "boolean", "default": False},
            "output_quality": _num("integer", 0, 100, 80),
            "negative_prompt": {"type": "string", "default": " "},
            "num_inference_steps": _num("integer", 1, 50, 30),
            "disable_safety_checker": {"type": "boolean", "default": False},
        },
    },
}


def version_id(model: str) -> str:
    """A stable 64-hex version id per model, so `POST /v1/predictions` can name it."""
    return hashlib.sha256(model.encode()).hexdigest()


def openapi_schema(model: str) -> dict:
    props = MODELS[model]["properties"]
    output = {"type": "string", "format": "uri"}
    if MODELS[model]["output"] == "list":
        output = {"type": "array", "items": output}
    return {
        "openapi": "3.0.2",
        "components": {"schemas": {
            "Input": {"type": "object", "required": ["prompt"], "properties": props},
            "Output": output,
        }},
    }


def _type_error(spec: dict, value: Any) -> str | None:
    kind = spec["type"]
    if value is None:
        return None if spec.get("nullable") else f"Invalid type. Expected: {kind}, given: null"
    ok = {
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value),
    }[kind]
    return None if ok else f"Invalid type. Expected: {kind}, given: {type(value).__name__}"


def _field_errors(name: str, spec: dict, value: Any) -> list[dict]:
    field = f"input.{name}"
    problem = _type_error(spec, value)
    if problem:
        return [{"type": "invalid_type", "field": field, "description": problem}]
    if value is None:
        return []
    if "enum" in spec and value not in spec["enum"]:
        allowed = ", ".join(f'"{v}"' for v in spec["enum"])
        return [{"type": "enum", "field": field,
                 "description": f"{name} must be one of the following: {allowed}"}]
    if "minimum" in spec and value < spec["minimum"]:
        return [{"type": "number_gte", "field": field,
                 "description": f"Must be greater than or equal to {spec['minimum']}"}]
    if "maximum" in spec and value > spec["maximum"]:
        return [{"type": "number_lte", "field": field,
                 "description": f"Must be less than or equal to {spec['maximum']}"}]
    if spec.get("format") == "uri" and urlparse(value).scheme not in ("http", "https", "data"):
        return [{"type": "format", "field": field, "description": "Does not match format 'uri'"}]
    return []


def validate(model: str, data: Any) -> list[dict]:
    """Return Replicate-style `invalid_fields` for an input; empty when it is valid."""
    if not isinstance(data, dict):
        return [{"type": "invalid_type", "field": "input", "description": "Expected: object"}]
    props = MODELS[model]["properties"]
    errors: list[dict] = []
    if "prompt" not in data:
        errors.append({"type": "required", "field": "input",
                       "description": "prompt is required"})
    for name, value in data.items():
        if name not in props:
            errors.append({"type": "additional_property_not_allowed", "field": "input",
                           "description": f"Additional property {name} is not allowed"})
            continue
        errors.extend(_field_errors(name, props[name], value))
    tolerance = data.get("safety_tolerance")
    if (model.endswith("flux-kontext-max") and data.get("input_image")
            and isinstance(tolerance, int) and tolerance > 2):
        errors.append({"type": "number_lte", "field": "input.safety_tolerance",
                       "description": "safety_tolerance must be at most 2 when input_image is given"})
    return errors


def problem_detail(errors: list[dict]) -> str:
    return "".join(f"- {e['field']}: {e['description']}\n" for e in errors)
