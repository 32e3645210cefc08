"""One input transform for every path that feeds a model: training, batch inference and the web.

Two steps, because training augments in between (on [0, 1] floats, on the GPU):

1. :func:`decode_image` / :func:`decode_batch`: encoded bytes -> uint8 ``(C, H, W)`` at the model's
   size and channel count (PIL, with JPEG draft decoding at reduced scale, then a bilinear resize
   by the model directory's resize policy, :func:`fit_size`: stretched, or centre-cropped);
2. :func:`to_unit` then :func:`normalize`: uint8 -> [0, 1] -> ``(x - mean) / std`` with the
   model directory's ``preprocess.json`` values, optionally in channels_last memory format.

:func:`preprocess_batch` chains both for a batch of encoded images. Keeping one implementation is
what guarantees that a model sees at inference exactly the numbers it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from sparkvision.data.images import (
    MAX_PIXELS_DEFAULT,
    PixelDtype,
    RejectError,
    float_pixels,
    mode_channels,
    open_image,
    to_8bit,
)
from sparkvision.models.modeldir import Preprocess, Resize


def decode_image(
    data: bytes,
    channels: int,
    size: tuple[int, int] | None = None,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    pixel_dtype: PixelDtype = "uint8",
    resize: Resize = "stretch",
) -> np.ndarray:
    """Encoded image -> uint8 ``(C, H, W)`` with ``channels`` 1 (grayscale) or 3 (RGB), brought to
    ``size = (H, W)`` when given, by the ``resize`` policy (:func:`fit_size`). Any stored mode (16-bit, float, CMYK, palette...) becomes 8 bits
    through :func:`sparkvision.data.images.to_8bit`.

    Raises :class:`sparkvision.data.images.RejectError` (``empty_file``, ``not_an_image``,
    ``too_many_pixels`` from the header, ``unsupported_mode``, ``truncated`` for a body that fails
    to decode), so a batch can write an error row instead of failing.

    ``pixel_dtype="float32"`` (a float table's rows, see :func:`image_pixels`) gives float32.
    """
    img = open_image(data, max_pixels)
    mode_channels(img)  # the modes ingest accepts, no other
    try:
        if size is not None and img.format == "JPEG":
            # decode at reduced scale, never below size on either side (so also enough for a crop)
            img.draft("L" if channels == 1 else "RGB", (size[1], size[0]))
        return image_pixels(img, channels, size, pixel_dtype, resize)
    except RejectError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad data
        raise RejectError("truncated", f"{type(e).__name__}: {e}"[:200]) from None


def fit_size(img: Image.Image, size: tuple[int, int], resize: Resize = "stretch") -> Image.Image:
    """``img`` at ``size = (H, W)`` by the resize policy (bilinear both ways); itself if already so.

    ``"stretch"``: resized straight to (W, H), changing the aspect ratio of any other shape.
    ``"crop"``: the largest centred box of the target's aspect ratio, resized to (W, H), which is
    torchvision's ``Resize(shorter side)`` then ``CenterCrop`` (for a non-square target too: the
    image is scaled to cover it) done by PIL's ``ImageOps.fit`` in one resize of the box, so no
    pixel outside the crop is ever resampled. An image of the target's aspect ratio is only resized.
    """
    h, w = size
    if img.size == (w, h):
        return img
    if resize == "crop":
        return ImageOps.fit(img, (w, h), Image.Resampling.BILINEAR)
    return img.resize((w, h), Image.Resampling.BILINEAR)


def image_pixels(
    img: Image.Image,
    channels: int,
    size: tuple[int, int] | None = None,
    pixel_dtype: PixelDtype = "uint8",
    resize: Resize = "stretch",
) -> np.ndarray:
    """A PIL image -> uint8 ``(C, H, W)``: 8 bits, ``channels``, brought to ``size = (H, W)`` by
    :func:`fit_size` with the ``resize`` policy.

    The decoded half of :func:`decode_image`, for pixels that never were bytes (a crop cut from a
    decoded image is embedded through this, so it sees the same resize as a stored image).
    ``pixel_dtype="float32"``: a mode-F image's values as float32, unscaled (a float table's
    feature vectors, :func:`~sparkvision.data.images.float_pixels`), repeated over 3 channels.
    """
    if pixel_dtype == "float32":
        if size is not None:
            img = fit_size(img, size, resize)
        return np.repeat(float_pixels(img)[None], channels, axis=0)
    img = to_8bit(img, "L" if channels == 1 else "RGB")
    if size is not None:
        img = fit_size(img, size, resize)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_batch(
    images: Sequence[bytes | None],
    channels: int,
    size: tuple[int, int],
    pixel_dtype: PixelDtype = "uint8",
    resize: Resize = "stretch",
) -> tuple[torch.Tensor, list[str | None]]:
    """A batch of encoded images -> uint8 (float32 for ``pixel_dtype="float32"``) ``(B, C, H, W)``
    (channels_last strides) and one error string per row; a row that does not decode is zeros
    with its ``reason: detail``."""
    h, w = size
    out = np.zeros((len(images), h, w, channels), dtype=pixel_dtype)  # NHWC: channels_last for free
    errors: list[str | None] = [None] * len(images)
    for i, data in enumerate(images):
        try:
            out[i] = decode_image(
                data or b"", channels, size, pixel_dtype=pixel_dtype, resize=resize
            ).transpose(1, 2, 0)
        except RejectError as e:
            errors[i] = f"{e.reason}: {e.detail}" if e.detail else e.reason
    return torch.from_numpy(out).permute(0, 3, 1, 2), errors


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float input (a float table's feature values) as it is, copied
    like uint8 input is (callers may change the result in place).

    Divides by 255 rather than using ``TF.to_dtype(scale=True)``, which multiplies by 1/255 and
    can differ in the last bit: existing models were trained on these exact numbers.
    """
    return x.to(torch.float32, copy=True) if x.is_floating_point() else x.float().div_(255)


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    channels_last: bool = True,
) -> torch.Tensor:
    """``(x - mean) / std`` per channel on float ``(B, C, H, W)``; channels_last is the layout the
    frozen CPU models and the training loop run fastest on."""
    x = TF.normalize(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def preprocess_batch(
    images: Sequence[bytes | None], pre: Preprocess
) -> tuple[torch.Tensor, list[str | None]]:
    """Encoded images -> the model's normalised float input ``(B, C, H, W)`` and per-row errors
    (a failed row is a zero image normalised like any other, and its output is discarded).
    The one path of predict, embed, evaluate and search: the model directory's ``resize`` policy
    applies here (the web's per-image classify path calls :func:`decode_image` with it)."""
    x, errors = decode_batch(images, pre.channels, pre.size, pre.pixel_dtype, pre.resize)
    return normalize(to_unit(x), pre.mean, pre.std), errors
