"""Validating one encoded image and reading its header: pure functions, no Spark.

These run on the executors inside Arrow batches and in the web server's request threads; keeping
them free of Spark makes every reject rule testable on a laptop with a few bytes. Decoding pixels
for a model lives in :mod:`sparkvision.transforms.preprocess`, which opens images through
:func:`open_image` so the pixel limit is applied in one place.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# The one default pixel limit (ingest, decoding for a model; the web may pass a smaller one).
# 8k x 8k; a decompression bomb is orders of magnitude bigger. It sits below PIL's own warning
# threshold (``PIL.Image.MAX_IMAGE_PIXELS``, ~89 Mpx), which we leave untouched: a caller's larger
# limit is honoured up to PIL's hard ceiling (twice that), beyond which PIL refuses to open the
# image and we report ``too_many_pixels``.
MAX_PIXELS_DEFAULT = 64_000_000

# Modes we store; the value is the channel count after expansion (palette -> RGB, bilevel -> L).
SUPPORTED_MODES = {"1": 1, "L": 1, "LA": 2, "P": 3, "PA": 4, "RGB": 3, "RGBA": 4}


@dataclass(frozen=True)
class ImageInfo:
    format: str | None
    height: int
    width: int
    channels: int


class RejectError(ValueError):
    """An image that cannot go into the table, with a stable reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_image(data: bytes, max_pixels: int = MAX_PIXELS_DEFAULT) -> Image.Image:
    """Read only the header of ``data`` and enforce the pixel limit: the one pixel-limit check.

    The returned image is lazy (no pixel decoded yet), so a decompression bomb costs nothing.
    Raises :class:`RejectError` with reason ``empty_file``, ``not_an_image`` or ``too_many_pixels``.
    """
    if len(data) == 0:
        raise RejectError("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: our limit decides
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise RejectError("too_many_pixels", str(e)[:200]) from None
    except UnidentifiedImageError as e:
        raise RejectError("not_an_image", str(e)[:200]) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on the header means "not an image"
        raise RejectError("not_an_image", f"{type(e).__name__}: {e}"[:200]) from None
    width, height = img.size
    if width * height > max_pixels:
        raise RejectError("too_many_pixels", f"{width}x{height} = {width * height} > max_pixels {max_pixels}")
    return img


def inspect_image(data: bytes, max_pixels: int = MAX_PIXELS_DEFAULT) -> ImageInfo:
    """Fully decode ``data`` to prove it is a usable image; raise :class:`RejectError` if not.

    The pixel limit is checked from the header (:func:`open_image`) before any pixel is decoded.
    """
    img = open_image(data, max_pixels)
    width, height = img.size
    if img.mode not in SUPPORTED_MODES:
        raise RejectError("unsupported_mode", f"mode {img.mode}; supported: {', '.join(SUPPORTED_MODES)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad data
        raise RejectError("truncated", f"{type(e).__name__}: {e}"[:200]) from None
    if width <= 0 or height <= 0:
        raise RejectError("truncated", f"size {width}x{height}")
    return ImageInfo(format=img.format, height=height, width=width, channels=SUPPORTED_MODES[img.mode])


def encode_png(pixels: np.ndarray) -> bytes:
    """Losslessly encode a ``(H, W)`` or ``(H, W, C)`` uint8 array (used for IDX records)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
