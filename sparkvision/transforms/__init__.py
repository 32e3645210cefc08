"""The model's input transform, shared by training, batch inference and the web server.

Its names load on first use (``preprocess`` imports torch): the raster ingest's executors import
``sparkvision.transforms.spectral`` (numpy only) without paying for torch.
"""

import importlib
from typing import Any

__all__ = ["decode_batch", "decode_image", "normalize", "preprocess_batch", "to_unit"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("sparkvision.transforms.preprocess"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
