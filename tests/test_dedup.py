"""Dedup: union-find and keep rule as pure functions; planted copies found, no false groups."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from sparkvision.retrieval.dedup import keeper, pairs_above, pixel_descriptor, union_find


def test_union_find_is_transitive():
    labels = union_find(7, [(0, 1), (1, 2), (5, 4), (2, 2)])
    assert labels.tolist() == [0, 0, 0, 3, 4, 4, 6]
    assert union_find(3, []).tolist() == [0, 1, 2]
    assert union_find(4, [(3, 2), (2, 1), (1, 0)]).tolist() == [0, 0, 0, 0]  # a chain joins end to end
    with pytest.raises(ValueError, match="out of range"):
        union_find(2, [(0, 5)])


def test_keep_rule():
    members = [
        {"path": "b.png", "height": 10, "width": 10},
        {"path": "a.png", "height": 8, "width": 8},
        {"path": "c.png", "height": 10, "width": 10},
    ]
    assert keeper(members, "largest") == 0  # most pixels, then earliest path
    assert keeper(members, "earliest") == 1
    with pytest.raises(ValueError, match="keep rule"):
        keeper(members, "newest")


def test_pairs_above_threshold():
    scores = np.array([[1.0, 0.97, 0.5], [1.0, 0.97, 0.2]], np.float32)
    rows = np.array([[10, 11, 3], [11, 10, -1]])
    assert pairs_above(scores, rows, 10, 0.95) == [
        (10, 11, pytest.approx(0.97)),
        (10, 11, pytest.approx(0.97)),
    ]


def test_pixel_descriptor_invariances():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 200, (16, 16)).astype(np.uint8)
    d = pixel_descriptor(a)
    assert abs(np.linalg.norm(d) - 1) < 1e-5
    assert np.allclose(d, pixel_descriptor(a[:, ::-1]), atol=1e-4)  # mirror
    assert np.allclose(d, pixel_descriptor(a * 0.5 + 40), atol=1e-4)  # brightness and contrast


def distinct_image(seed: int, size: int = 48) -> Image.Image:
    """A random scene: a gradient background and a few shapes, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    bg = 60 + 80 * (np.cos(angle) * xx + np.sin(angle) * yy)
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8), "L")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 12, 2)
        w, h = rng.integers(8, 24, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        fill = int(rng.integers(0, 256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


COPIES = {
    "flipped": lambda im: encode(im.transpose(Image.FLIP_LEFT_RIGHT)),
    "cropped": lambda im: encode(im.crop((2, 2, im.width - 2, im.height - 2))),
    "jpeg": lambda im: encode(im, "JPEG", quality=60),
    "brightened": lambda im: encode(ImageEnhance.Brightness(im).enhance(1.3)),
}


@pytest.fixture(scope="module")
def planted_table(spark, tmp_path_factory):
    """30 distinct images, copies of four of them (one per edit), and one exact duplicate row."""
    from sparkvision.images import content_id
    from sparkvision.schema import IMAGE_SCHEMA
    from sparkvision.table import TableMeta, write_meta

    rows = []

    def add(data: bytes, path: str) -> None:
        im = Image.open(io.BytesIO(data))
        rows.append(
            (content_id(data), path, data, im.format, im.height, im.width, 1, None, None, "unlabeled")
        )

    originals = [distinct_image(s) for s in range(30)]
    for i, im in enumerate(originals):
        add(encode(im), f"/orig/{i:02d}.png")
    for i, (name, edit) in enumerate(COPIES.items()):
        add(edit(originals[i]), f"/copy/{name}_{i:02d}")
    add(encode(originals[10]), "/dup/10_again.png")  # same bytes as /orig/10.png
    table = str(tmp_path_factory.mktemp("dedup") / "planted")
    spark.createDataFrame(rows, IMAGE_SCHEMA).repartition(3).write.parquet(table)
    write_meta(spark, table, TableMeta())
    return table


def test_dedup_finds_planted_copies_and_no_false_groups(spark, planted_table, tmp_path):
    import pyarrow.parquet as pq

    from sparkvision.retrieval.dedup import dedup_table

    s = dedup_table(spark, planted_table, str(tmp_path / "out"), keep="largest")
    groups = pq.read_table(str(tmp_path / "out" / "groups.parquet")).to_pylist()
    by_group: dict[int, set[str]] = {}
    for g in groups:
        by_group.setdefault(g["group_id"], set()).add(g["path"])
    expected = [{f"/orig/{i:02d}.png", f"/copy/{name}_{i:02d}"} for i, name in enumerate(COPIES)]
    expected.append({"/orig/10.png", "/dup/10_again.png"})
    assert sorted(map(sorted, by_group.values())) == sorted(map(sorted, expected))
    assert s["exact_groups"] == 1 and s["near_groups"] == 4 and s["rows_to_remove"] == 5
    # one keeper per group; for the crop the full-size original wins under "largest"
    keepers = {g["path"] for g in groups if g["keep"]}
    assert len(keepers) == 5 and "/orig/01.png" in keepers
    exact = [g for g in groups if g["kind"] == "exact"]
    assert {g["path"] for g in exact} == {"/orig/10.png", "/dup/10_again.png"}
    with open(tmp_path / "out" / "_dedup.json") as f:
        assert json.load(f)["rows"] == 35


def test_dedup_exact_only_and_bad_options(spark, planted_table, tmp_path):
    from sparkvision.retrieval.dedup import dedup_table

    s = dedup_table(spark, planted_table, str(tmp_path / "exact"), exact_only=True, keep="earliest")
    assert s["exact_groups"] == 1 and s["near_groups"] == 0 and s["rows_to_remove"] == 1
    with pytest.raises(ValueError, match="keep"):
        dedup_table(spark, planted_table, str(tmp_path / "x"), keep="biggest")
    with pytest.raises(ValueError, match="threshold"):
        dedup_table(spark, planted_table, str(tmp_path / "x"), threshold=2.0)
    assert not os.path.exists(tmp_path / "x" / "groups.parquet")


def test_cli_dedup(planted_table, spark, tmp_path):
    from typer.testing import CliRunner

    from sparkvision.cli import app

    r = CliRunner().invoke(app, ["dedup", planted_table, str(tmp_path / "d"), "--exact-only", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output.strip().splitlines()[-1])
    assert s["exact_groups"] == 1 and s["rows_to_remove"] == 1
    r = CliRunner().invoke(app, ["dedup", planted_table, str(tmp_path / "e"), "--keep", "newest", "--json"])
    assert r.exit_code == 2 and "keep" in r.output
