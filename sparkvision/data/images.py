"""Validating one encoded image and reading its header: pure functions, no Spark.

These run on the executors inside Arrow batches and in the web server's request threads; keeping
them free of Spark makes every reject rule testable on a laptop with a few bytes. Decoding pixels
for a model lives in :mod:`sparkvision.transforms.preprocess`, which opens images through
:func:`open_image` so the pixel limit is applied in one place, and turns every mode into 8 bits
through :func:`to_8bit`, so 16-bit and float images mean the same to ingest, training, batch
inference and the web.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Literal, cast, get_args

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The one default pixel limit (ingest, decoding for a model; the web may pass a smaller one).
# 8k x 8k; a decompression bomb is orders of magnitude bigger. It sits below PIL's own warning
# threshold (``PIL.Image.MAX_IMAGE_PIXELS``, ~89 Mpx), which we leave untouched: a caller's larger
# limit is honoured up to PIL's hard ceiling (twice that), beyond which PIL refuses to open the
# image and we report ``too_many_pixels``.
MAX_PIXELS_DEFAULT = 64_000_000

# Integer gray modes wider than 8 bits, as PIL opens 16-bit PNG/TIFF/PGM and 32-bit TIFF gray.
WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# Modes with transparency, composited on white by :func:`to_8bit`.
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
EXIF_ORIENTATION = 0x0112  # the TIFF/EXIF tag
TRANSPOSED = frozenset({5, 6, 7, 8})  # orientations that swap width and height

# Modes we store; the value is the channel count after :func:`to_8bit` (palette -> RGB, bilevel,
# 16-bit, 32-bit and float gray -> L, CMYK/YCbCr/HSV -> RGB). Anything else (LAB, ...) is
# ``unsupported_mode``.
SUPPORTED_MODES = {
    "1": 1,
    "L": 1,
    "LA": 2,
    "P": 3,
    "PA": 4,
    "RGB": 3,
    "RGBA": 4,
    "RGBa": 4,
    "RGBX": 3,
    **dict.fromkeys(WIDE_GRAY_MODES, 1),
    "F": 1,
    "CMYK": 3,
    "YCbCr": 3,
    "HSV": 3,
}


# How a table's rows decode for a model (``TableMeta.pixel_dtype``, ``Preprocess.pixel_dtype``):
# "uint8" images through :func:`to_8bit`; "float32" feature vectors (mode-F TIFFs written by
# ``ingest-raster``) as their values, through :func:`float_pixels`.
PixelDtype = Literal["uint8", "float32"]
PIXEL_DTYPES: tuple[str, ...] = get_args(PixelDtype)


def pixel_dtype(value: str) -> PixelDtype:
    """``value`` checked as a :data:`PixelDtype` (it comes from JSON files beside tables and models)."""
    if value not in PIXEL_DTYPES:
        raise ValueError(f"pixel_dtype {value!r} is not one of {', '.join(PIXEL_DTYPES)}")
    return cast(PixelDtype, value)


@dataclass(frozen=True)
class ImageInfo:
    """What the table records of an image: its encoding, upright size, channels once read as 8
    bits, and the mode PIL opened it in before any conversion (``original_mode``)."""

    format: str | None
    height: int
    width: int
    channels: int
    mode: str | None = None


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


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 = as stored), 1 when there is none or it is unreadable.

    Read only when the header carried an EXIF block (``info["exif"]``; TIFF keeps its tags in
    the IFD): PIL's ``getexif`` on a PNG without one loads the image to look for a late eXIf
    chunk, which tripled the cost of opening a small PNG on the decode path."""
    if "exif" not in img.info and img.format not in ("TIFF", "MPO"):
        return 1
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not reject a readable image
        return 1
    return value if 1 <= value <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (a phone photo taken sideways stands up), by
    PIL's ``ImageOps.exif_transpose``; the image itself when no turn is needed (no copy)."""
    return ImageOps.exif_transpose(img) if orientation(img) != 1 else img


def mode_channels(img: Image.Image) -> int:
    """Channels ``img`` has once read as 8 bits; ``unsupported_mode`` if it has no such reading.

    The one mode check, so ingest and the decoder for models accept and refuse the same images.
    """
    if img.mode not in SUPPORTED_MODES:
        raise RejectError("unsupported_mode", f"mode {img.mode}; supported: {', '.join(SUPPORTED_MODES)}")
    return SUPPORTED_MODES[img.mode]


def to_8bit(img: Image.Image, mode: Literal["L", "RGB"]) -> Image.Image:
    """``img`` as 8-bit ``mode``: the one conversion of pixels every reader uses.

    PIL's own ``convert`` clips wider integer gray at 255, which turns a 16-bit scan nearly white.
    Here 0..65535 keeps its scale: the high byte (``>> 8``), which is also how PIL reads 16-bit
    RGB(A), so a 16-bit image with values ``v * 257`` gives exactly the pixels of its 8-bit copy
    ``v``. 32-bit ``I`` is read on the same 16-bit scale (PIL's convention for 16-bit data),
    clipped to it. Float ``F`` keeps PIL's convention, the 0..255 scale of ``L``, clipped.
    Transparency (an alpha channel, or a palette's transparent colour) is composited on white, as
    a catalogue shows a cut-out product; ``convert`` alone would keep whatever colour the
    invisible pixels happen to hold. The EXIF orientation is applied first (:func:`upright`).
    """
    img = upright(img)
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if img.mode in WIDE_GRAY_MODES:
        a = np.asarray(img)
        if a.dtype.kind == "i":
            a = np.clip(a, 0, 65535)
        img = Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), mode="L")
    return img if img.mode == mode else img.convert(mode)


def float_pixels(img: Image.Image) -> np.ndarray:
    """A mode-F image's values as float32 ``(H, W)``, unscaled: the reading of a float table's rows
    (``pixel_dtype`` "float32"), where :func:`to_8bit` would squeeze real numbers into 0..255.
    Other modes are ``unsupported_mode``: a float table holds feature vectors, not pictures."""
    if img.mode != "F":
        raise RejectError("unsupported_mode", f"mode {img.mode} in a float32 table (its rows are mode F)")
    return np.asarray(img, dtype=np.float32)


def load_image(
    data: bytes, max_pixels: int = MAX_PIXELS_DEFAULT, max_side: int | None = None
) -> tuple[Image.Image, ImageInfo]:
    """Fully decode ``data`` to prove it is a usable image: the loaded image and what the table
    records of it (the full upright size, whatever ``max_side`` says). Raises :class:`RejectError`.

    The pixel limit is checked from the header (:func:`open_image`) before any pixel is decoded.
    With ``max_side`` a JPEG larger than that is decoded by libjpeg at 1/2, 1/4 or 1/8 scale
    (PIL's ``draft``), never below what :func:`shrink` needs: a 24-megapixel photo going into a
    512-pixel table costs a fraction of its full decode. The whole stream is still read, so a
    truncated file is still caught.
    """
    img = open_image(data, max_pixels)
    width, height = img.size
    channels = mode_channels(img)
    mode = img.mode
    if max_side is not None and img.format == "JPEG" and max(width, height) > max_side:
        scale = max_side / max(width, height)
        img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad data
        raise RejectError("truncated", f"{type(e).__name__}: {e}"[:200]) from None
    if width <= 0 or height <= 0:
        raise RejectError("truncated", f"size {width}x{height}")
    if orientation(img) in TRANSPOSED:  # stored sideways: the table records the upright size
        width, height = height, width
    return img, ImageInfo(format=img.format, height=height, width=width, channels=channels, mode=mode)


def inspect_image(data: bytes, max_pixels: int = MAX_PIXELS_DEFAULT) -> ImageInfo:
    """Fully decode ``data`` to prove it is a usable image; raise :class:`RejectError` if not."""
    return load_image(data, max_pixels)[1]


def shrink(img: Image.Image, info: ImageInfo, max_side: int) -> tuple[bytes, ImageInfo] | None:
    """``img`` (from :func:`load_image`) downscaled so that its longer side is ``max_side``,
    re-encoded, with its new info; ``None`` when it already fits (the file is stored as it came).

    The copy holds the pixels every reader would see (:func:`to_8bit`: upright, transparency on
    white, 16-bit to its high byte) as L or RGB, so ``channels`` becomes 1 or 3 while ``mode``
    keeps the source's. The aspect ratio is kept (each side rounded, at least 1). Lanczos with
    ``reducing_gap=3``: PIL first box-reduces by an integer factor, then resamples the last
    factor of at most 3 with Lanczos, which its docs call indistinguishable from a full Lanczos
    and is several times faster on multi-megapixel inputs.

    The encoding: JPEG sources are stored as JPEG at quality 95, since their losses are already
    baked in: as PNG a photo grows 5-10x for no gain, and a quality-95 pass adds errors well
    below what the downscale itself changes. Every other source (PNG, GIF, TIFF, BMP, WEBP, ...)
    is stored as PNG, lossless, so ingest adds no artefacts of its own.
    """
    if max(info.width, info.height) <= max_side:
        return None
    scale = max_side / max(info.width, info.height)
    size = (max(1, round(info.width * scale)), max(1, round(info.height * scale)))
    pixels = to_8bit(img, "RGB" if info.channels >= 3 else "L")
    small = pixels.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    fmt = "JPEG" if info.format in ("JPEG", "MPO") else "PNG"
    if fmt == "JPEG":
        small.save(buf, format="JPEG", quality=95)
    else:
        small.save(buf, format="PNG")
    channels = 3 if small.mode == "RGB" else 1
    return buf.getvalue(), ImageInfo(fmt, size[1], size[0], channels, info.mode)


def encode_png(pixels: np.ndarray) -> bytes:
    """Losslessly encode a ``(H, W)`` or ``(H, W, C)`` uint8 array (used for IDX records)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
