"""The models, versions and deployments the emulator knows, as Replicate describes them.

Official models run by name (`POST /v1/models/{owner}/{name}/predictions`) and report
`version: "hidden"`; community models run only by version id; a deployment runs the version
of its current release. Adding a model is adding an entry to `MODELS`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from .schemas import NO_DEFAULT, Choice, cog_schema, field, resolved_properties, uri

URI = {"type": "string", "format": "uri"}
URI_LIST = {"type": "array", "items": URI}
SDXL_VERSION = "615c46b37e6279e91e0b091e934eb7ca4dc5192427780230f3316354c6544d94"
SDXL_OLD_VERSION = "6c52ecea25f0e50f47e8d06d058d1ecaf295ecdb285413b0a45bcf162c5af3b6"

FLUX_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
KONTEXT_RATIOS = ("match_input_image", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3",
                  "4:5", "5:4", "21:9", "9:21", "2:1", "1:2")
QWEN_RATIOS = ("16:9", "1:1", "9:16", "4:3", "3:4", "3:2", "2:3")
SDXL_SCHEDULERS = ("DDIM", "DPMSolverMultistep", "HeunDiscrete", "KarrasDPM", "K_EULER_ANCESTRAL",
                   "K_EULER", "PNDM")


@dataclasses.dataclass(frozen=True)
class Version:
    """One version of a model. `ext` is the file type of its outputs unless the input has an
    `output_format`; `main_input` is the input a stamp and the fault markers are read from."""
    id: str
    model: str
    created_at: str
    cog_version: str
    openapi_schema: dict
    ext: str = "png"
    main_input: str = "prompt"
    properties: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "properties", resolved_properties(self.openapi_schema))

    def default(self, name: str) -> Any:
        return self.properties.get(name, {}).get("default")

    def to_json(self) -> dict:
        return {"id": self.id, "created_at": self.created_at, "cog_version": self.cog_version,
                "openapi_schema": self.openapi_schema}


@dataclasses.dataclass(frozen=True)
class Model:
    owner: str
    name: str
    description: str
    official: bool
    versions: tuple[Version, ...]  # newest first

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def latest(self) -> Version:
        return self.versions[0]


@dataclasses.dataclass(frozen=True)
class Deployment:
    owner: str
    name: str
    number: int
    version: Version
    created_at: str
    hardware: str
    min_instances: int
    max_instances: int

    def to_json(self) -> dict:
        return {"owner": self.owner, "name": self.name, "current_release": {
            "number": self.number, "model": self.version.model, "version": self.version.id,
            "created_at": self.created_at,
            "created_by": {"type": "organization", "username": self.owner, "name": self.owner.title(),
                           "github_url": None},
            "configuration": {"hardware": self.hardware, "min_instances": self.min_instances,
                              "max_instances": self.max_instances}}}


def _official(ref: str, description: str, fields: dict, required: list[str], output: dict,
              inline_enums: bool = False, **version: Any) -> Model:
    """An official model: one version, whose id is stable (a hash of the name)."""
    owner, name = ref.split("/")
    only = Version(id=hashlib.sha256(ref.encode()).hexdigest(), model=ref,
                   created_at=version.pop("created_at", "2024-08-01T00:00:00.000000Z"),
                   cog_version=version.pop("cog_version", "0.9.0"),
                   openapi_schema=cog_schema(fields, required, output, inline_enums), **version)
    return Model(owner, name, description, True, (only,))


def _seed(nullable: bool = False) -> dict:
    return field("integer", "Random seed. Set for reproducible generation", nullable=nullable)


def _formats(default: str = "webp", values: tuple = ("webp", "jpg", "png")) -> Choice:
    return Choice(values, default, "Format of the output images")


def _flux_dev() -> Model:
    return _official("black-forest-labs/flux-dev", "A 12 billion parameter rectified flow transformer", {
        "prompt": field("string", "Prompt for generated image"),
        "aspect_ratio": Choice(FLUX_RATIOS, "1:1", "Aspect ratio for the generated image"),
        "image": uri("Input image for image to image mode. The aspect ratio of your output will match this image"),
        "prompt_strength": field("number", "Prompt strength when using img2img", 0.8, 0, 1),
        "num_outputs": field("integer", "Number of outputs to generate", 1, 1, 4),
        "num_inference_steps": field("integer", "Number of denoising steps", 28, 1, 50),
        "guidance": field("number", "Guidance for generated image", 3, 0, 10),
        "seed": _seed(),
        "output_format": _formats(),
        "output_quality": field("integer", "Quality when saving the output images", 80, 0, 100),
        "disable_safety_checker": field("boolean", "Disable safety checker for generated images.", False),
        "go_fast": field("boolean", "Run faster predictions with an optimized model", True),
        "megapixels": Choice(("1", "0.25"), "1", "Approximate number of megapixels for generated image"),
    }, ["prompt"], URI_LIST)


def _flux_schnell() -> Model:
    return _official("black-forest-labs/flux-schnell", "The fastest image generation model", {
        "prompt": field("string", "Prompt for generated image"),
        "aspect_ratio": Choice(FLUX_RATIOS, "1:1", "Aspect ratio for the generated image"),
        "num_outputs": field("integer", "Number of outputs to generate", 1, 1, 4),
        "num_inference_steps": field("integer", "Number of denoising steps. 4 is recommended", 4, 1, 4),
        "seed": _seed(),
        "output_format": _formats(),
        "output_quality": field("integer", "Quality when saving the output images", 80, 0, 100),
        "disable_safety_checker": field("boolean", "Disable safety checker for generated images.", False),
        "go_fast": field("boolean", "Run faster predictions with an optimized model", True),
        "megapixels": Choice(("1", "0.25"), "1", "Approximate number of megapixels for generated image"),
    }, ["prompt"], URI_LIST)


def _flux_kontext_max() -> Model:
    # A newer Cog (pydantic 2): enums inline on the property, no `allOf` references, so a
    # client must handle both shapes.
    return _official("black-forest-labs/flux-kontext-max", "Image editing with text prompts", {
        "prompt": field("string", "Text description of what you want to generate, or the instruction on how to edit"),
        "input_image": uri("Image to use as reference. Must be jpeg, png, gif, or webp."),
        "aspect_ratio": Choice(KONTEXT_RATIOS, "match_input_image", "Aspect ratio of the generated image"),
        "seed": _seed(),
        "output_format": Choice(("png", "jpg"), "png", "Output format for the generated image"),
        "safety_tolerance": field("integer", "Safety tolerance, 0 is most strict and 6 is most permissive. "
                                  "2 is currently the maximum allowed when input images are used.", 2, 0, 6),
        "prompt_upsampling": field("boolean", "Automatic prompt improvement", False),
    }, ["prompt"], URI, inline_enums=True, cog_version="0.16.8")


def _qwen_image() -> Model:
    nullable_str = lambda d: field("string", d, nullable=True)  # noqa: E731
    return _official("qwen/qwen-image", "An image generation foundation model in the Qwen series", {
        "prompt": field("string", "Prompt for generated image"),
        "enhance_prompt": field("boolean", "Enhance the prompt with positive magic.", False),
        "lora_weights": nullable_str("Load LoRA weights"),
        "lora_scale": field("number", "Determines how strongly the main LoRA should be applied.", 1),
        "extra_lora_weights": nullable_str("Load extra LoRA weights"),
        "extra_lora_scale": field("number", "Scale of the extra LoRA", nullable=True),
        "negative_prompt": field("string", "Negative prompt for generated image", " "),
        "aspect_ratio": Choice(QWEN_RATIOS, "16:9", "Aspect ratio for the generated image"),
        "image_size": Choice(("optimize_for_quality", "optimize_for_speed"), "optimize_for_quality",
                             "Image size for the generated image"),
        "image": uri("Input image for image2image generation"),
        "strength": field("number", "Strength for img2img pipeline", 0.9, 0, 1),
        "go_fast": field("boolean", "Run faster predictions with additional optimizations.", True),
        "num_inference_steps": field("integer", "Number of denoising steps.", 30, 1, 50),
        "guidance": field("number", "Guidance for generated image.", 3, 0, 10),
        "seed": _seed(nullable=True),
        "output_format": _formats(),
        "output_quality": field("integer", "Quality when saving the output images", 80, 0, 100),
        "disable_safety_checker": field("boolean", "Disable safety checker for generated images.", False),
    }, ["prompt"], URI_LIST)


def _sdxl_fields(newer: bool) -> dict:
    """SDXL's inputs; the older version lacks the refiner and LoRA inputs, stops at 1024 px
    and has no KarrasDPM, so pinning a version changes what validates."""
    side = 2048 if newer else 1024
    schedulers = SDXL_SCHEDULERS if newer else tuple(s for s in SDXL_SCHEDULERS if s != "KarrasDPM")
    fields = {
        "prompt": field("string", "Input prompt", "An astronaut riding a rainbow unicorn"),
        "negative_prompt": field("string", "Input Negative Prompt", ""),
        "image": uri("Input image for img2img or inpaint mode"),
        "mask": uri("Input mask for inpaint mode. Black areas will be preserved, white areas will be inpainted."),
        "width": field("integer", "Width of output image", 1024, 256, side),
        "height": field("integer", "Height of output image", 1024, 256, side),
        "num_outputs": field("integer", "Number of images to output.", 1, 1, 4),
        "scheduler": Choice(schedulers, "K_EULER", "scheduler"),
        "num_inference_steps": field("integer", "Number of denoising steps", 50, 1, 500),
        "guidance_scale": field("number", "Scale for classifier-free guidance", 7.5, 1, 50),
        "prompt_strength": field("number", "Prompt strength when using img2img / inpaint. 1.0 corresponds "
                                 "to full destruction of information in image", 0.8, 0, 1),
        "seed": field("integer", "Random seed. Leave blank to randomize the seed", nullable=True),
        "apply_watermark": field("boolean", "Applies a watermark to enable determining if an image is "
                                 "generated in downstream applications.", True),
    }
    if newer:
        fields |= {
            "refine": Choice(("no_refiner", "expert_ensemble_refiner", "base_image_refiner"), "no_refiner",
                             "Which refine style to use"),
            "high_noise_frac": field("number", "For expert_ensemble_refiner, the fraction of noise to use",
                                     0.8, 0, 1),
            "refine_steps": field("integer", "For base_image_refiner, the number of steps to refine",
                                  nullable=True),
            "lora_scale": field("number", "LoRA additive scale. Only applicable on trained models.", 0.6, 0, 1),
            "disable_safety_checker": field("boolean", "Disable safety checker for generated images.", False),
        }
    return fields


def _sdxl() -> Model:
    versions = tuple(
        Version(id=vid, model="stability-ai/sdxl", created_at=created, cog_version=cog,
                openapi_schema=cog_schema(_sdxl_fields(newer), [], URI_LIST))
        for vid, created, cog, newer in (
            (SDXL_VERSION, "2023-11-08T16:49:25.093562Z", "0.8.6", True),
            (SDXL_OLD_VERSION, "2023-07-26T17:53:09.882651Z", "0.8.1", False)))
    return Model("stability-ai", "sdxl", "A text-to-image generative AI model that creates beautiful images",
                 False, versions)


def _video_gen() -> Model:
    return _official("acme/video-gen", "Emulated text-to-video model: one mp4 per prediction", {
        "prompt": field("string", "Text prompt for the video"),
        "duration": field("integer", "Length of the video in seconds", 5, 1, 10),
        "fps": Choice((24, 30), 24, "Frames per second"),
        "aspect_ratio": Choice(("16:9", "9:16", "1:1"), "16:9", "Aspect ratio of the video"),
        "seed": _seed(nullable=True),
    }, ["prompt"], URI, ext="mp4")


def _background_remover() -> Model:
    output = {"type": "object", "required": ["cut_image", "mask"], "properties": {
        "cut_image": {**URI, "title": "Cut Image"}, "mask": {**URI, "title": "Mask"}}}
    return _official("acme/background-remover", "Emulated background removal: the cut-out and its mask", {
        "image": uri("Image to remove the background from"),
        "threshold": field("number", "Alpha threshold; 0 keeps a soft edge", 0, 0, 1),
    }, ["image"], output, ext="png", main_input="image")


def _tts() -> Model:
    return _official("acme/tts", "Emulated text-to-speech: one wav per prediction", {
        "text": field("string", "Text to speak"),
        "voice": Choice(("alloy", "echo", "nova"), "alloy", "Voice"),
        "speed": field("number", "Speaking rate", 1, 0.5, 2),
    }, ["text"], URI, ext="wav", main_input="text")


def _text_gen() -> Model:
    return _official("acme/text-gen", "Emulated language model: answers a string, no files", {
        "prompt": field("string", "Prompt"),
        "system_prompt": field("string", "System prompt", "You are a helpful assistant."),
        "max_tokens": field("integer", "Maximum number of tokens to generate", 512, 1, 4096),
        "temperature": field("number", "Sampling temperature", 0.7, 0, 2),
    }, ["prompt"], {"type": "string"}, ext="txt")


MODELS: dict[str, Model] = {m.ref: m for m in (
    _flux_dev(), _flux_schnell(), _flux_kontext_max(), _qwen_image(), _sdxl(),
    _video_gen(), _background_remover(), _tts(), _text_gen())}
VERSIONS: dict[str, Version] = {v.id: v for m in MODELS.values() for v in m.versions}
DEPLOYMENTS: dict[str, Deployment] = {d.owner + "/" + d.name: d for d in (
    Deployment("acme", "image-gen", 3, VERSIONS[SDXL_VERSION], "2024-09-02T10:00:00.000000Z",
               "gpu-l40s", 0, 2),)}


class InvalidVersion(LookupError):
    """`version` names nothing runnable: Replicate answers 422 "Invalid version or not permitted"."""


def version_for_ref(ref: str) -> Version | None:
    """The version a `POST /v1/predictions` `version` names: `<id>`, `owner/name:<id>`, or
    `owner/name` of an official model. None for an unknown `owner/name` (a 404);
    InvalidVersion for anything else that does not resolve."""
    name, colon, digest = ref.partition(":")
    if not colon and "/" in ref:
        model = MODELS.get(ref)
        if model is None:
            return None
        if not model.official:
            raise InvalidVersion(ref)
        return model.latest
    version = VERSIONS.get(digest if colon else name)
    if version is None or (colon and version.model != name):
        raise InvalidVersion(ref)
    return version


def version_of(model: str, version_id: str) -> Version | None:
    found = VERSIONS.get(version_id)
    return found if found is not None and found.model == model else None


__all__ = ["DEPLOYMENTS", "MODELS", "NO_DEFAULT", "VERSIONS", "Deployment", "InvalidVersion", "Model",
           "Version", "version_for_ref", "version_of"]
