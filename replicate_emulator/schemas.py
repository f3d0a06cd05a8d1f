"""OpenAPI 3.0.2 documents as Cog writes them, and a validator that reads them.

Kept apart from the service's own parameter table on purpose: the emulator checks the
service's validation from the outside, so the two must not share code. The validator works
from the published document itself (resolving `allOf: [{"$ref": ...}]` enums and honouring
`nullable`), so what a client can read from `GET /v1/models/...` is exactly what is enforced.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any
from urllib.parse import urlparse

NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Choice:
    """An enum parameter; Cog writes it as a named component referenced through `allOf`."""
    values: tuple
    default: Any = NO_DEFAULT
    description: str = ""


def field(kind: str, description: str, default: Any = NO_DEFAULT, minimum: float | None = None,
          maximum: float | None = None, nullable: bool = False, fmt: str | None = None) -> dict:
    """One Input property in Cog's shape (`title` and `x-order` are added by `cog_schema`)."""
    spec: dict[str, Any] = {"type": kind, "description": description}
    if fmt:
        spec["format"] = fmt
    if default is not NO_DEFAULT:
        spec["default"] = default
    if minimum is not None:
        spec["minimum"] = minimum
    if maximum is not None:
        spec["maximum"] = maximum
    if nullable:
        spec["nullable"] = True
    return spec


def uri(description: str) -> dict:
    return field("string", description, fmt="uri")


def _title(name: str) -> str:
    return name.replace("_", " ").title()


def _enum_schema(name: str, choice: Choice) -> dict:
    kind = "integer" if all(isinstance(v, int) and not isinstance(v, bool) for v in choice.values) else "string"
    return {"title": name, "type": kind, "enum": list(choice.values), "description": "An enumeration."}


def _property(name: str, spec: dict | Choice, inline_enums: bool) -> tuple[dict, dict | None]:
    """The property and, for a referenced enum, the component it points at."""
    if not isinstance(spec, Choice):
        return {**spec, "title": _title(name)}, None
    enum = _enum_schema(name, spec)
    if inline_enums:  # newer Cog (pydantic 2) writes the enum on the property itself
        prop = {**enum, "description": spec.description}
    else:
        prop = {"allOf": [{"$ref": f"#/components/schemas/{name}"}], "description": spec.description}
    if spec.default is not NO_DEFAULT:
        prop["default"] = spec.default
    return prop, None if inline_enums else enum


def cog_schema(fields: dict[str, dict | Choice], required: list[str], output: dict,
               inline_enums: bool = False) -> dict:
    """A whole version's `openapi_schema`: Input in `fields` order (`x-order`), Output,
    the enum components and the prediction envelope Cog always publishes."""
    properties, components = {}, {}
    for order, (name, spec) in enumerate(fields.items()):
        prop, enum = _property(name, spec, inline_enums)
        properties[name] = {**prop, "x-order": order}
        if enum:
            components[name] = enum
    input_schema = {"type": "object", "title": "Input", "properties": properties}
    if required:
        input_schema["required"] = list(required)
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {"/predictions": {"post": {
            "summary": "Predict", "operationId": "predict_predictions_post",
            "requestBody": {"content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/PredictionRequest"}}}},
            "responses": {"200": {"description": "Successful Response", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}}}}}},
        "components": {"schemas": {
            "Input": input_schema,
            "Output": {**output, "title": "Output"},
            **components,
            "Status": {"title": "Status", "type": "string", "description": "An enumeration.",
                       "enum": ["starting", "processing", "succeeded", "canceled", "failed"]},
            "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": "#/components/schemas/Input"}}},
            "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"},
                "status": {"$ref": "#/components/schemas/Status"}}},
        }},
    }


def resolved_properties(schema: dict) -> dict[str, dict]:
    """Input properties with their `allOf` references merged in, as a validator sees them."""
    components = schema["components"]["schemas"]
    resolved = {}
    for name, prop in components["Input"]["properties"].items():
        merged: dict[str, Any] = {}
        for part in prop.get("allOf", []):
            merged.update(components[part["$ref"].rsplit("/", 1)[-1]])
        merged.update({k: v for k, v in prop.items() if k != "allOf"})
        resolved[name] = merged
    return resolved


def _type_error(spec: dict, value: Any) -> str | None:
    kind = spec.get("type")
    if value is None:
        return None if spec.get("nullable") else f"Invalid type. Expected: {kind}, given: null"
    ok = {
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value),
    }.get(kind, True)
    given = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
             "list": "array", "dict": "object"}.get(type(value).__name__, type(value).__name__)
    return None if ok else f"Invalid type. Expected: {kind}, given: {given}"


def _field_errors(name: str, spec: dict, value: Any) -> list[dict]:
    field_name = f"input.{name}"
    problem = _type_error(spec, value)
    if problem:
        return [{"type": "invalid_type", "field": field_name, "description": problem}]
    if value is None:
        return []
    if "enum" in spec and value not in spec["enum"]:
        allowed = ", ".join(json.dumps(v) for v in spec["enum"])
        return [{"type": "enum", "field": field_name,
                 "description": f"{name} must be one of the following: {allowed}"}]
    if "minimum" in spec and value < spec["minimum"]:
        return [{"type": "number_gte", "field": field_name,
                 "description": f"Must be greater than or equal to {spec['minimum']}"}]
    if "maximum" in spec and value > spec["maximum"]:
        return [{"type": "number_lte", "field": field_name,
                 "description": f"Must be less than or equal to {spec['maximum']}"}]
    if spec.get("format") == "uri" and urlparse(value).scheme not in ("http", "https", "data"):
        return [{"type": "format", "field": field_name, "description": "Does not match format 'uri'"}]
    return []


def _kontext_rule(data: dict) -> list[dict]:
    # Not expressible in the schema: Replicate's flux-kontext-max refuses it at run time.
    tolerance = data.get("safety_tolerance")
    if data.get("input_image") and isinstance(tolerance, int) and not isinstance(tolerance, bool) \
            and tolerance > 2:
        return [{"type": "number_lte", "field": "input.safety_tolerance",
                 "description": "safety_tolerance must be at most 2 when input_image is given"}]
    return []


CROSS_FIELD_RULES = {"black-forest-labs/flux-kontext-max": _kontext_rule}


def validate(schema: dict, properties: dict[str, dict], data: Any, model: str = "") -> list[dict]:
    """Replicate-style `invalid_fields` for an input against a version's schema; empty when valid.

    `properties` is `resolved_properties(schema)`, computed once per version."""
    if not isinstance(data, dict):
        return [{"type": "invalid_type", "field": "input", "description": "Expected: object"}]
    errors: list[dict] = []
    for name in schema["components"]["schemas"]["Input"].get("required", []):
        if name not in data:
            errors.append({"type": "required", "field": "input", "description": f"{name} is required"})
    for name, value in data.items():
        if name not in properties:
            errors.append({"type": "additional_property_not_allowed", "field": "input",
                           "description": f"Additional property {name} is not allowed"})
            continue
        errors.extend(_field_errors(name, properties[name], value))
    rule = CROSS_FIELD_RULES.get(model)
    return errors + (rule(data) if rule else [])


def problem_detail(errors: list[dict]) -> str:
    return "".join(f"- {e['field']}: {e['description']}\n" for e in errors)
