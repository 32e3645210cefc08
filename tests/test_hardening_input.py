"""Bad input loses nothing (issue 15, items 6-8): symlink loops, names that are not UTF-8, and
16-bit or other odd pixel modes, through the walk, ingest, the one decoder and the web."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from conftest import make_image, write_image_folder, write_tiny_model
from fastapi.testclient import TestClient
from PIL import Image

from sparkvision.data.images import RejectError, inspect_image, to_8bit
from sparkvision.data.ingest import ingest
from sparkvision.data.listing import escape_glob, list_local_folder
from sparkvision.data.schema import REJECT_REASONS
from sparkvision.data.sources import detect_source_kind
from sparkvision.data.table import read_table
from sparkvision.transforms.preprocess import decode_image
from sparkvision.web.app import create_app
from sparkvision.web.browse import thumbnail
from sparkvision.web.security import Settings

BAD_NAME = b"\xff\xfe.png"  # not UTF-8: Java decodes it to U+FFFD and then cannot open it


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write_bytes_path(path: bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _pair_16_and_8_bit(seed: int = 0, size: int = 16) -> tuple[bytes, bytes]:
    """A 16-bit gray PNG with values ``v * 257`` and its 8-bit copy with values ``v``."""
    v = np.random.default_rng(seed).integers(0, 256, (size, size)).astype(np.uint8)
    return _save(Image.fromarray(v.astype(np.uint16) * 257), "PNG"), _save(Image.fromarray(v), "PNG")


# --------------------------------------------------------------------------- one decoder (no Spark)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [None, (8, 8)])
def test_16_bit_png_decodes_like_its_8_bit_copy(channels, size):
    wide, narrow = _pair_16_and_8_bit()
    assert Image.open(io.BytesIO(wide)).mode == "I;16"
    got = decode_image(wide, channels, size)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, decode_image(narrow, channels, size))
    assert (got < 250).mean() > 0.5  # clipping would make nearly every pixel 255


@pytest.mark.parametrize(
    "img",
    [
        Image.fromarray(np.arange(-1, 63, dtype=np.int32).reshape(8, 8) * 1100),
        Image.new("I;16B", (8, 8), 40_000),
    ],
    ids=["I", "I;16B"],
)
def test_wide_integer_gray_keeps_its_16_bit_scale(img):
    data = _save(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == img.mode
    expected = (np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(data, 1)[0], expected)


@pytest.mark.parametrize(
    ("img", "fmt", "channels"),
    [
        (Image.new("I;16", (8, 8), 40_000), "PNG", 1),
        (Image.fromarray(np.linspace(0, 255, 64, dtype=np.float32).reshape(8, 8)), "TIFF", 1),
        (Image.new("CMYK", (8, 8), (0, 50, 100, 0)), "JPEG", 3),
        (Image.new("CMYK", (8, 8), (0, 50, 100, 0)), "TIFF", 3),
        (Image.new("YCbCr", (8, 8), (100, 128, 128)), "TIFF", 3),
        (Image.new("P", (8, 8), 3), "PNG", 3),
        (Image.new("LA", (8, 8), (90, 10)), "PNG", 2),
        (Image.new("RGBA", (8, 8), (1, 2, 3, 0)), "PNG", 4),
    ],
    ids=["I;16", "F", "CMYK-jpeg", "CMYK-tiff", "YCbCr", "P", "LA", "RGBA"],
)
def test_every_stored_mode_is_inspected_and_decoded(img, fmt, channels):
    data = _save(img, fmt)
    assert inspect_image(data).channels == channels
    for c in (1, 3):
        out = decode_image(data, c, (4, 4))
        assert out.shape == (c, 4, 4) and out.dtype == np.uint8


def test_float_keeps_pil_scale_and_alpha_is_composited_on_white():
    f = Image.fromarray(np.array([[-5.0, 0.4, 128.0, 300.0]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(to_8bit(f, "L")), [[0, 0, 128, 255]])
    clear = Image.new("RGBA", (2, 2), (10, 20, 30, 0))  # invisible: its hidden colour must not show
    assert to_8bit(clear, "RGB").getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (2, 2), (10, 20, 30, 128))
    assert to_8bit(half, "RGB").getpixel((0, 0)) == pytest.approx((132, 137, 142), abs=1)


@pytest.mark.parametrize(
    "read", [inspect_image, lambda d: decode_image(d, 3, (4, 4))], ids=["ingest", "decoder"]
)
def test_mode_without_an_8_bit_reading_is_unsupported_for_ingest_and_decoder_alike(read):
    data = _save(Image.new("LAB", (8, 8)), "TIFF")
    with pytest.raises(RejectError) as e:
        read(data)
    assert e.value.reason == "unsupported_mode" and "LAB" in e.value.detail


# --------------------------------------------------------------------------- the walk (no Spark)


def test_walk_keeps_directory_symlinks_and_bad_names_from_spark(tmp_path):
    write_image_folder(tmp_path, {"a": 2, "b": 1})
    assert list_local_folder(str(tmp_path)).paths == [str(tmp_path)]  # nothing to avoid: Spark lists the root
    os.symlink("..", tmp_path / "a" / "up")
    os.symlink(str(tmp_path.parent), tmp_path / "out")
    os.symlink("/nonexistent", tmp_path / "b" / "broken.png")
    _write_bytes_path(bytes(tmp_path / "b") + b"/" + BAD_NAME, make_image(0))
    listing = list_local_folder(str(tmp_path))
    assert listing.paths == sorted(
        [str(tmp_path / "a" / "0.png"), str(tmp_path / "a" / "1.png"), str(tmp_path / "b")]
    )
    reasons = {r[0].rsplit("/", 1)[-1]: r[1:3] for r in listing.rejects}
    assert reasons["up"][0] == reasons["out"][0] == "symlinked_dir"
    assert "back into the source" in reasons["up"][1] and "outside the source" in reasons["out"][1]
    assert reasons["broken.png"][0] == "unreadable"
    assert reasons["\\xff\\xfe.png"][0] == "bad_name"
    assert {r[1] for r in listing.rejects} <= set(REJECT_REASONS)
    only_jpg = list_local_folder(str(tmp_path), wanted=lambda name: name.endswith(".jpg"))
    assert {r[1] for r in only_jpg.rejects} == {"symlinked_dir"}  # the filter applies to files only


def test_glob_characters_in_names_are_escaped_for_hadoop():
    assert escape_glob("/d/x[1]{a,b}*?\\.png") == "/d/x\\[1\\]\\{a,b\\}\\*\\?\\\\.png"


# --------------------------------------------------------------------------- ingest (Spark)


def _ingest(spark, root, tmp_path, **kw):
    table = str(tmp_path / "table")
    t0 = time.monotonic()
    summary = ingest(spark, str(root), table, mode="overwrite", **kw)
    rows = read_table(spark, table).select("path", "label_name").collect()
    rejects = spark.read.parquet(summary.rejects_table).collect()
    return summary, rows, rejects, time.monotonic() - t0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("links", [1, 2])
def test_symlinks_to_the_parent_are_not_followed(spark, tmp_path, links):
    root = write_image_folder(tmp_path / "src", {"a": 3, "b": 2})
    os.symlink("..", root / "a" / "up")
    if links == 2:
        os.symlink("..", root / "b" / "up")
    os.symlink(str(root / "a"), root / "a_again")  # a link elsewhere in the tree is not followed either
    summary, rows, rejects, elapsed = _ingest(spark, root, tmp_path)
    paths = sorted(r.path.split("/src/", 1)[1] for r in rows)
    assert paths == ["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png"]  # each file once
    assert {(r.label_name, r.path.rsplit("/", 2)[-2]) for r in rows} == {("a", "a"), ("b", "b")}
    assert sorted(r.path.split("/src/", 1)[1] for r in rejects) == (
        ["a/up", "a_again"] + ["b/up"] * (links == 2)
    )
    assert {r.reason for r in rejects} == {"symlinked_dir"}
    assert summary.rows_by_class == {"a": 3, "b": 2}
    assert elapsed < 60


def test_every_file_is_a_row_or_a_reject(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    _write_bytes_path(bytes(root / "b") + b"/" + BAD_NAME, make_image(1, seed=7))
    os.mkdir(bytes(root) + b"/\xffdir")
    _write_bytes_path(bytes(root) + b"/\xffdir/in.png", make_image(1, seed=8))
    os.symlink("/nonexistent/x.png", root / "a" / "broken.png")
    wide, narrow = _pair_16_and_8_bit(seed=3)
    (root / "a" / "wide16.png").write_bytes(wide)
    (root / "b" / "cmyk.jpg").write_bytes(_save(Image.new("CMYK", (8, 8), (0, 50, 100, 0)), "JPEG"))
    (root / "b" / "lab.tif").write_bytes(_save(Image.new("LAB", (8, 8)), "TIFF"))
    summary, rows, rejects, _ = _ingest(spark, root, tmp_path)

    files_on_disk = sum(len(names) for _, _, names in os.walk(root))
    assert files_on_disk == 10
    assert (
        summary.rows_written + sum(summary.rejects_by_reason.values())
        == files_on_disk
        == len(rows) + len(rejects)
    )
    assert sorted(r.path.rsplit("/", 1)[-1] for r in rows) == [
        "0.png",
        "0.png",
        "1.png",
        "1.png",
        "cmyk.jpg",
        "wide16.png",
    ]
    by_name = {r.path.split("/src/", 1)[1]: (r.reason, r.detail) for r in rejects}
    assert by_name["b/\\xff\\xfe.png"][0] == by_name["\\xffdir/in.png"][0] == "bad_name"
    assert "UTF-8" in by_name["b/\\xff\\xfe.png"][1]
    assert by_name["a/broken.png"] == ("unreadable", "broken symlink")
    assert by_name["b/lab.tif"][0] == "unsupported_mode"
    assert summary.rejects_by_reason == {"bad_name": 2, "unreadable": 1, "unsupported_mode": 1}
    table = {r.path.rsplit("/", 1)[-1]: r for r in read_table(spark, str(tmp_path / "table")).collect()}
    assert table["wide16.png"].image == wide and table["wide16.png"].channels == 1  # stored as it came
    assert table["cmyk.jpg"].channels == 3


def test_glob_filter_also_decides_which_bad_names_are_rejects(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"a": 2})
    _write_bytes_path(bytes(root / "a") + b"/\xff.png", make_image(0, seed=5))
    _write_bytes_path(bytes(root / "a") + b"/\xff.txt", b"notes")
    summary, rows, rejects, _ = _ingest(spark, root, tmp_path, glob="*.{png,jpg}")
    assert len(rows) == 2
    assert [(r.path.rsplit("/", 1)[-1], r.reason) for r in rejects] == [("\\xff.png", "bad_name")]


@pytest.mark.timeout(120)
def test_detecting_the_source_kind_survives_a_loop(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"a": 1})
    os.symlink("..", root / "a" / "up")
    os.symlink("..", root / "a" / "up2")
    assert detect_source_kind(spark, str(root)) == "folder"


# --------------------------------------------------------------------------- the web


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening_web")
    write_tiny_model(root / "cnn", ["a", "b", "c"], mean=0.5, std=0.25)
    settings = Settings(
        data_roots=[str(root)], db_url="sqlite://", model_dir=str(root / "cnn"), start_runner=False
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_classify_16_bit_png_matches_its_8_bit_copy(client):
    wide, narrow = _pair_16_and_8_bit(seed=1)
    probs = []
    for data in (wide, narrow):
        r = client.post("/api/classify?top_k=3", content=data, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        probs.append({t["label"]: t["prob"] for t in r.json()["results"][0]["top_k"]})
    assert probs[0].keys() == {"a", "b", "c"}
    assert probs[0] == pytest.approx(probs[1], abs=1e-6)


def test_thumbnail_of_16_bit_png_matches_its_8_bit_copy():
    wide, narrow = _pair_16_and_8_bit(seed=2)
    assert thumbnail(wide) == thumbnail(narrow) is not None
