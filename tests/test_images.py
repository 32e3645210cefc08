"""The pure decode-and-validate rules in sparkvision.data.images: no Spark, a few bytes each."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from sparkvision.data.images import (
    MAX_PIXELS_DEFAULT,
    RejectError,
    content_id,
    encode_png,
    inspect_image,
    open_image,
)
from sparkvision.data.schema import REJECT_REASONS
from sparkvision.transforms.preprocess import decode_image


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(RejectError) as e:
        inspect_image(data, **kw)
    assert e.value.reason in REJECT_REASONS
    return e.value.reason


@pytest.mark.parametrize(
    ("mode", "fmt", "channels"),
    [
        ("L", "PNG", 1),
        ("RGB", "PNG", 3),
        ("RGBA", "PNG", 4),
        ("LA", "PNG", 2),
        ("P", "PNG", 3),
        ("1", "PNG", 1),
        ("L", "JPEG", 1),
        ("RGB", "JPEG", 3),
        ("RGB", "WEBP", 3),
        ("RGB", "BMP", 3),
        ("RGB", "GIF", 3),
    ],
)
def test_good_images_report_their_geometry(mode, fmt, channels):
    data = make_image(1, size=20, mode=mode, fmt=fmt)
    info = inspect_image(data)
    assert (info.height, info.width, info.channels) == (20, 20, channels)
    assert info.format == fmt


def test_non_square_geometry_is_height_then_width():
    data = _save(Image.new("RGB", (30, 10)), "PNG")
    info = inspect_image(data)
    assert (info.height, info.width) == (10, 30)


def test_zero_bytes_is_empty_file():
    assert _reason(b"") == "empty_file"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_cut_in_half_is_truncated(fmt):
    data = make_image(3, size=64, mode="RGB", fmt=fmt, noise=60)  # noise: enough bytes to cut
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_text_named_jpg_is_not_an_image():
    assert _reason(b"this is a text file, not a JPEG\n" * 4) == "not_an_image"


def test_header_only_is_not_an_image():
    assert _reason(b"\x89PNG\r\n\x1a\n") == "not_an_image"


def test_16_bit_png_is_read_as_gray():
    img = Image.fromarray(np.full((8, 8), 40_000, dtype=np.uint16))
    data = _save(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert inspect_image(data).channels == 1
    assert decode_image(data, 1)[0, 0, 0] == 40_000 >> 8  # scaled to 8 bits, not clipped to 255


def test_cmyk_jpeg_is_read_as_rgb():
    data = _save(Image.new("CMYK", (8, 8), (0, 50, 100, 0)), "JPEG")
    assert inspect_image(data).channels == 3


def test_float_tiff_is_read_as_gray():
    data = _save(Image.fromarray(np.zeros((4, 4), dtype=np.float32)), "TIFF")
    assert inspect_image(data).channels == 1


def test_lab_tiff_is_unsupported_mode():
    data = _save(Image.new("LAB", (8, 8)), "TIFF")
    assert _reason(data) == "unsupported_mode"


def test_pixel_limit_is_checked_from_the_header():
    bomb = _save(Image.new("L", (4000, 4000)), "PNG")  # 16 Mpx, a few kB on disk
    assert len(bomb) < 100_000
    assert _reason(bomb, max_pixels=1_000_000) == "too_many_pixels"
    assert inspect_image(bomb, max_pixels=16_000_000).width == 4000  # at the limit it is fine


def test_reject_error_carries_reason_and_detail():
    with pytest.raises(RejectError) as e:
        inspect_image(_save(Image.new("L", (100, 100)), "PNG"), max_pixels=10)
    assert e.value.detail.endswith("> max_pixels 10")
    assert str(e.value).startswith("too_many_pixels: ")


def test_content_id_is_sha256_of_the_bytes():
    data = make_image(0)
    assert content_id(data) == content_id(bytes(data))
    assert len(content_id(data)) == 64
    assert content_id(data) != content_id(make_image(0, seed=1))


def test_encode_png_is_lossless():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    png = encode_png(arr)
    assert inspect_image(png).channels == 1
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), arr)


def test_decode_image_converts_channels_and_size_to_chw():
    data = make_image(2, size=16, mode="RGB")
    assert decode_image(data, 1).shape == (1, 16, 16)
    assert decode_image(data, 3, size=(8, 12)).shape == (3, 8, 12)
    assert decode_image(data, 3).dtype == np.uint8
    with pytest.raises(RejectError):
        decode_image(b"", 3)


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` in its IHDR chunk, with a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "side", [9_000, 100_000]
)  # above our default; the second above PIL's own ceiling too
def test_too_large_header_is_rejected_before_decoding(side):
    data = png_header(side, side)
    assert side * side > MAX_PIXELS_DEFAULT
    for check in (open_image, inspect_image, lambda d: decode_image(d, 1, (8, 8))):
        with pytest.raises(RejectError) as e:
            check(data)
        assert e.value.reason == "too_many_pixels"
    assert open_image(png_header(4_000, 4_000)).size == (
        4_000,
        4_000,
    )  # under the limit: header only, no decode


def test_importing_leaves_pil_pixel_limit_alone():
    code = (
        "from PIL import Image; before = Image.MAX_IMAGE_PIXELS; "
        "import sparkvision.data.images, sparkvision.transforms.preprocess; "
        "assert Image.MAX_IMAGE_PIXELS == before, (before, Image.MAX_IMAGE_PIXELS)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
