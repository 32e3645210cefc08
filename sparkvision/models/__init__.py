"""Model registry: ``create_model(name)``, ``list_models()``, ``register_model`` for your own."""

from sparkvision.models.registry import (
    ImageModel,
    create_model,
    list_models,
    model_kwargs_for,
    register_model,
    unregister_model,
    wrap_module,
)

__all__ = [
    "ImageModel",
    "create_model",
    "list_models",
    "model_kwargs_for",
    "register_model",
    "unregister_model",
    "wrap_module",
]
