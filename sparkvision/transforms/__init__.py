"""The model's input transform, shared by training, batch inference and the web server."""

from sparkvision.transforms.preprocess import (
    decode_batch,
    decode_image,
    normalize,
    preprocess_batch,
    to_unit,
)

__all__ = ["decode_batch", "decode_image", "normalize", "preprocess_batch", "to_unit"]
