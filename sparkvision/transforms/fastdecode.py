"""A batch of encoded images from an Arrow column -> the model's input, with libpng for the rows
where that gives PIL's pixels exactly, and :func:`~sparkvision.transforms.preprocess.preprocess_batch`
for every other row.

Batch inference spends most of its decode time, for small images, in PIL's per-image Python
(opening the file, parsing chunks, building an Image), not in inflating pixels. An 8-bit PNG
that is already the model's size and stored in the model's colour type (gray for one channel,
RGB for three) decodes through libpng to the very bytes PIL gives (PNG is lossless and nothing is
converted or resized), so those rows take torchvision's C++ decoder (``torch.ops.image.decode_png``,
which releases the GIL: ``threads`` > 1 decodes in parallel). Which rows qualify is read from the
PNG headers of the whole batch at once, as numpy over the Arrow buffers; a row then qualifies only
when its chunks are the plain ones, each of the length the format gives it, with its checksum
right (:func:`plain_chunks`), so that PIL could not have turned it (an EXIF orientation), made
it transparent (tRNS) or refused it (a damaged chunk) where libpng would not.

Every other row (JPEG, palette, 16-bit, alpha, another size or colour type, any other chunk, a
failed decode) goes through the one implementation in :mod:`sparkvision.transforms.preprocess`,
unchanged: rejects and their reasons, resizing and colour conversion stay exactly as training and
the web see them. A float table's model (``pixel_dtype`` float32) and a torchvision without its
image ops send every row there.
"""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
import torchvision.io  # noqa: F401 - loads torchvision's image library: registers torch.ops.image

from sparkvision.models.modeldir import Preprocess
from sparkvision.transforms.preprocess import normalize, preprocess_batch, to_unit

PNG_SIGNATURE = np.frombuffer(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", np.uint8)  # + IHDR's length
HEADER = 26  # signature (8), IHDR length and type (8), width, height (8), bit depth, colour type
COLOUR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type stored: gray, RGB (no alpha, no palette)
# The chunks a qualifying PNG may hold, with their lengths (None: any). Neither reader changes a
# pixel for any of them (no gamma or colour management); PIL only parses them, which is why the
# lengths must be right. Anything else (tRNS, eXIf, iCCP, PLTE, private chunks) goes to PIL.
PLAIN_CHUNKS: dict[bytes, int | None] = {
    b"IHDR": 13,
    b"IDAT": None,
    b"IEND": 0,
    b"gAMA": 4,
    b"cHRM": 32,
    b"sRGB": 1,
    b"pHYs": 9,
    b"tIME": 7,
    b"tEXt": None,
}

_POOL: dict[int, ThreadPoolExecutor] = {}


def png_decoder_available() -> bool:
    """Whether this torchvision has its C++ PNG decoder."""
    try:
        return hasattr(torch.ops.image, "decode_png")
    except (AttributeError, RuntimeError):
        return False


def binary_parts(images: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(offsets (B + 1,), data bytes, valid (B,))`` of a binary or large_binary Arrow array, as numpy
    (the data copied once, so torch may use it without a read-only buffer warning)."""
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks()
    off_type = np.int64 if pa.types.is_large_binary(images.type) else np.int32
    bufs = images.buffers()
    n = len(images)
    offsets = np.frombuffer(bufs[1], off_type, count=n + 1, offset=images.offset * off_type().itemsize)
    data = np.frombuffer(bufs[2], np.uint8).copy() if bufs[2] is not None else np.zeros(0, np.uint8)
    valid = images.is_valid().to_numpy(zero_copy_only=False)
    return offsets.astype(np.int64), data, valid


def png_rows(
    offsets: np.ndarray, data: np.ndarray, valid: np.ndarray, channels: int, size: tuple[int, int]
) -> np.ndarray:
    """Indices of the rows whose header says: an 8-bit PNG of ``size`` (H, W) in the colour type
    of ``channels``, not interlaced."""
    start, length = offsets[:-1], np.diff(offsets)
    cand = np.flatnonzero(valid & (length > HEADER + 8))
    if cand.size == 0 or channels not in COLOUR_TYPE:
        return cand[:0]
    hdr = data[start[cand, None] + np.arange(HEADER + 3)]  # (m, 29): one gather for the batch
    be = hdr[:, 16:24].astype(np.uint32)
    width = (be[:, 0] << 24) | (be[:, 1] << 16) | (be[:, 2] << 8) | be[:, 3]
    height = (be[:, 4] << 24) | (be[:, 5] << 16) | (be[:, 6] << 8) | be[:, 7]
    ok = (
        (hdr[:, :16] == PNG_SIGNATURE).all(axis=1)
        & (height == size[0])
        & (width == size[1])
        & (hdr[:, 24] == 8)
        & (hdr[:, 25] == COLOUR_TYPE[channels])
        & (hdr[:, 28] == 0)  # interlace method: none
    )
    return cand[ok]


def plain_chunks(png: memoryview) -> bool:
    """Whether ``png`` (signature included) is IHDR, then :data:`PLAIN_CHUNKS` of their lengths,
    each but IDAT with its CRC right (libpng checks IDAT's), up to an IEND."""
    pos, end = 8, len(png)
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", png, pos)
        want = PLAIN_CHUNKS.get(kind, -1)
        if want == -1 or (want is not None and length != want) or pos + 12 + length > end:
            return False
        if kind != b"IDAT":
            (crc,) = struct.unpack_from(">I", png, pos + 8 + length)
            if zlib.crc32(png[pos + 4 : pos + 8 + length]) != crc:
                return False
        if kind == b"IEND":
            return True
        pos += 12 + length
    return False


def decode_png_rows(
    rows: np.ndarray, offsets: np.ndarray, data: np.ndarray, out: torch.Tensor, threads: int
) -> list[int]:
    """Decode ``rows`` into ``out`` (B, H, W, C) uint8; the rows not decoded here (other chunks,
    a failed decode, another shape), for PIL to read instead."""
    want = out.shape[1:]
    raw = memoryview(data.data)  # ndarray.data: the buffer itself
    tensor = torch.from_numpy(data)

    def run(chunk: np.ndarray) -> list[int]:
        failed = []
        for i in chunk.tolist():
            a, b = int(offsets[i]), int(offsets[i + 1])
            if not plain_chunks(raw[a:b]):
                failed.append(i)
                continue
            try:
                img = torch.ops.image.decode_png(tensor[a:b], 0, False)  # 0: as stored
            except RuntimeError:
                failed.append(i)
                continue
            if img.dtype != torch.uint8 or img.permute(1, 2, 0).shape != want:
                failed.append(i)
            else:
                out[i] = img.permute(1, 2, 0)
        return failed

    if threads <= 1 or len(rows) < 2 * threads:
        return run(rows)
    pool = _POOL.get(threads) or _POOL.setdefault(threads, ThreadPoolExecutor(threads, "sv-decode"))
    return [i for part in pool.map(run, np.array_split(rows, threads)) for i in part]


def preprocess_arrow(
    images: pa.Array, pre: Preprocess, threads: int = 1
) -> tuple[torch.Tensor, list[str | None]]:
    """What :func:`~sparkvision.transforms.preprocess.preprocess_batch` returns for
    ``images.to_pylist()``, the same numbers and errors, with the qualifying PNGs decoded by libpng."""
    n = len(images)
    rows = np.zeros(0, np.int64)
    if n and pre.pixel_dtype == "uint8" and png_decoder_available():
        offsets, data, valid = binary_parts(images)
        rows = png_rows(offsets, data, valid, pre.channels, pre.size)
    if rows.size == 0:
        return preprocess_batch(images.to_pylist(), pre)
    h, w = pre.size
    pixels = torch.zeros((n, h, w, pre.channels), dtype=torch.uint8)  # NHWC: channels_last for free
    failed = decode_png_rows(rows, offsets, data, pixels, threads)
    x = normalize(to_unit(pixels.permute(0, 3, 1, 2)), pre.mean, pre.std)
    errors: list[str | None] = [None] * n
    slow = np.setdiff1d(np.arange(n), np.setdiff1d(rows, failed))
    if slow.size:
        xs, errs = preprocess_batch(images.take(pa.array(slow)).to_pylist(), pre)
        x[torch.from_numpy(slow)] = xs
        for i, e in zip(slow.tolist(), errs, strict=True):
            errors[i] = e
    return x, errors
