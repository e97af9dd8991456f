"""`imgrec serve`: a web page and a JSON API over ONNX Runtime. Nothing here imports torch."""

from .app import ServeConfig, create_app, create_app_from_env

__all__ = ["ServeConfig", "create_app", "create_app_from_env"]
