"""The model registry, where the spec's file layout puts it.

The registry itself lives in `gateway.engine.models` (with the rest of the generation
engine); these names are re-exported so `model_functions.MODELS` and friends keep working.
"""
from gateway.engine.models import (
                                   BY_NAME,
                                   MODELS,
                                   ModelSpec,
                                   Param,
                                   build_input,
                                   check_param,
                                   describe_models,
                                   outputs_of,
                                   resolve_model,
                                   supported_models,
)

__all__ = ["BY_NAME", "MODELS", "ModelSpec", "Param", "build_input", "check_param", "describe_models",
           "outputs_of", "resolve_model", "supported_models"]
