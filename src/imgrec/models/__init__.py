"""Model registry: a name -> a builder, as timm does it.

Importing the model files registers their builders (`@register_model`), so importing this
package, or anything in it such as `imgrec.models.registry`, gives a filled `MODELS`.
"""

# the model files, in the order `imgrec models` lists them; importing registers them
from . import scratch  # noqa: F401, I001
from . import airbench  # noqa: F401
from . import pretrained  # noqa: F401
from .registry import (
    ALIASES,
    MODELS,
    ModelConfig,
    build_model,
    describe_models,
    model_config,
    register_model,
    resolve_model_name,
)

__all__ = ["ALIASES", "MODELS", "ModelConfig", "build_model", "describe_models", "model_config",
           "register_model", "resolve_model_name"]
