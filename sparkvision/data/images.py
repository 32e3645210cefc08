"""Decoding and validating one encoded image: pure functions, no Spark.

These run on the executors inside Arrow batches; keeping them free of Spark makes every reject
rule testable on a laptop with a few bytes.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# We apply our own, configurable pixel limit; PIL's global one would raise a warning or error that
# reads as a crash instead of a reject row.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 64_000_000  # 8k x 8k; a decompression bomb is orders of magnitude bigger

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


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode ``data`` to prove it is a usable image; raise :class:`RejectError` if not.

    The pixel limit is checked from the header, before any pixel is decoded, so a bomb costs
    nothing.
    """
    if len(data) == 0:
        raise RejectError("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise RejectError("not_an_image", str(e)[:200]) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on the header means "not an image"
        raise RejectError("not_an_image", f"{type(e).__name__}: {e}"[:200]) from None
    width, height = img.size
    if width * height > max_pixels:
        raise RejectError("too_many_pixels", f"{width}x{height} = {width * height} > max_pixels {max_pixels}")
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


def decode_to_array(data: bytes, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to ``(H, W, C)`` uint8 with the requested channel count (1 or 3), optionally resized.

    Raises :class:`RejectError` on bad bytes so batch inference can write an error row.
    """
    if len(data) == 0:
        raise RejectError("empty_file", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
        if size is not None and img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (size[1], size[0]))  # decode at reduced scale
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError as e:
        raise RejectError("not_an_image", str(e)[:200]) from None
    except Exception as e:  # noqa: BLE001
        raise RejectError("truncated", f"{type(e).__name__}: {e}"[:200]) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def encode_png(pixels: np.ndarray) -> bytes:
    """Losslessly encode a ``(H, W)`` or ``(H, W, C)`` uint8 array (used for IDX records)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
