"""Model registry: a name -> a builder, as timm does it."""

from .registry import MODELS, build_model, describe_models, resolve_model_name

__all__ = ["MODELS", "build_model", "describe_models", "resolve_model_name"]
