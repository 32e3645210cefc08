"""Valid images from print and photo pipelines are kept and read upright, in the right colours.

EXIF-rotated photos stand up (the table records the upright size, every reader turns them),
transparency is composited on white (RGBA, LA, a palette's transparent colour), CMYK and 16-bit
images are read, not rejected. Pure decoding first, then one ingest through Spark.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sparkvision.data.images import content_id, inspect_image, load_image, shrink
from sparkvision.transforms.preprocess import decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sideways_jpeg() -> bytes:
    """Stored 30 wide x 10 tall, a red block at the left end; EXIF orientation 6 (turn 90 degrees
    clockwise to view): upright it is 10 wide x 30 tall with the red block at the top."""
    a = np.full((10, 30, 3), 255, np.uint8)
    a[:, :6] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())


def transparent(mode: str) -> bytes:
    """Left half opaque black, right half fully transparent (its hidden colour black too)."""
    if mode == "RGBA":
        a = np.zeros((8, 8, 4), np.uint8)
        a[:, :4, 3] = 255
        return encode(Image.fromarray(a, "RGBA"), "PNG")
    if mode == "LA":
        a = np.zeros((8, 8, 2), np.uint8)
        a[:, :4, 1] = 255
        return encode(Image.fromarray(a, "LA"), "PNG")
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)  # colours 0 and 1 both black
    p.paste(1, (4, 0, 8, 8))
    return encode(p, "PNG", transparency=1)


def test_an_exif_rotated_photo_is_read_upright():
    data = sideways_jpeg()
    info = inspect_image(data)
    assert (info.height, info.width) == (30, 10)
    px = decode_image(data, 3)
    assert px.shape == (3, 30, 10)
    assert px[0, :5].mean() > 200 and px[1, :5].mean() < 60  # red on top
    assert px[1, -10:].mean() > 200  # white below
    assert decode_image(data, 1, (15, 5)).shape == (1, 15, 5)  # JPEG draft decoding too


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    data = transparent(mode)
    for channels in (1, 3):
        px = decode_image(data, channels)
        assert px[:, :, :4].max() < 10 and px[:, :, 4:].min() > 245, (mode, channels)


def test_cmyk_and_16_bit_images_are_kept():
    cmyk = encode(Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "JPEG")  # red in print inks
    assert inspect_image(cmyk).channels == 3
    px = decode_image(cmyk, 3)
    assert px[0].mean() > 200 and px[1].mean() < 60
    wide = np.full((4, 6), 40_000, np.uint16)
    png16 = encode(Image.fromarray(wide), "PNG")
    assert inspect_image(png16).channels == 1
    assert decode_image(png16, 1).max() == 40_000 >> 8  # the high byte, not clipped at 255


def halves(width: int = 300, height: int = 100) -> np.ndarray:
    """Red left half, blue right half."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = (255, 0, 0)
    a[:, width // 2 :] = (0, 0, 255)
    return a


def test_shrink_keeps_the_aspect_the_colours_and_the_encoding_kind():
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 95})):
        img, info = load_image(encode(Image.fromarray(halves()), fmt, **kw), max_side=60)
        small = shrink(img, info, 60)
        assert small is not None
        data, got = small
        assert (got.width, got.height, got.format, got.mode) == (60, 20, fmt, "RGB")
        px = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        assert px.shape == (20, 60, 3)
        assert px[:, :25, 0].min() > 200 and px[:, 35:, 2].min() > 200  # red left, blue right
    img, info = load_image(encode(Image.fromarray(np.full((50, 200), 40_000, np.uint16)), "PNG"))
    small = shrink(img, info, 60)
    assert small is not None and (small[1].width, small[1].height, small[1].channels) == (60, 15, 1)
    assert small[1].mode == "I;16" and np.asarray(Image.open(io.BytesIO(small[0]))).max() == 40_000 >> 8
    img, info = load_image(encode(Image.fromarray(halves(40, 20)), "PNG"))
    assert shrink(img, info, 40) is None  # fits: the file is stored as it came


def test_ingest_keeps_them_all_upright_with_their_original_mode(spark, tmp_path):
    from sparkvision.api import ingest

    src = tmp_path / "photos" / "a"
    src.mkdir(parents=True)
    (src / "sideways.jpg").write_bytes(sideways_jpeg())
    for mode in ("RGBA", "LA", "P"):
        (src / f"clear-{mode}.png").write_bytes(transparent(mode))
    (src / "cmyk.jpg").write_bytes(encode(Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "JPEG"))
    (src / "deep.png").write_bytes(encode(Image.fromarray(np.full((4, 6), 999, np.uint16)), "PNG"))
    big = encode(Image.fromarray(halves()), "PNG")
    (src / "big.png").write_bytes(big)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 300 wide, 100 tall: upright 100 x 300
    (src / "big-sideways.jpg").write_bytes(encode(Image.fromarray(halves()), "JPEG", exif=exif.tobytes()))
    table = str(tmp_path / "table")
    res = ingest(spark, source=str(tmp_path / "photos"), table=table, max_side=60)
    assert res["rows_written"] == 8 and res["rejects_by_reason"] == {}, res
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in pq.read_table(table).to_pylist()}
    assert (rows["sideways.jpg"]["height"], rows["sideways.jpg"]["width"]) == (30, 10)
    assert rows["cmyk.jpg"]["channels"] == 3 and rows["deep.png"]["channels"] == 1
    modes = {name: r["original_mode"] for name, r in rows.items()}
    assert modes["cmyk.jpg"] == "CMYK" and modes["deep.png"] == "I;16" and modes["clear-RGBA.png"] == "RGBA"
    assert modes["clear-P.png"] == "P" and modes["sideways.jpg"] == "RGB"
    # --max-side 60: the 300x100 photo is stored at 60x20, its content id still the file's
    assert (rows["big.png"]["width"], rows["big.png"]["height"], rows["big.png"]["format"]) == (60, 20, "PNG")
    assert Image.open(io.BytesIO(rows["big.png"]["image"])).size == (60, 20)
    assert rows["big.png"]["content_id"] == content_id(big)
    turned = rows["big-sideways.jpg"]
    assert (turned["width"], turned["height"], turned["format"]) == (20, 60, "JPEG")
    assert Image.open(io.BytesIO(turned["image"])).size == (20, 60)  # stored upright
    assert rows["sideways.jpg"]["image"] == sideways_jpeg()  # small images untouched
