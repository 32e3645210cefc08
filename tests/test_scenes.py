"""Synthetic scenes: the compositor's invariants, the grouping of rows, and `datasets scenes` on Spark."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sparkvision import api
from sparkvision.cli import app
from sparkvision.data.detection import DETECTION_SCHEMA, is_detection_table, read_detection_table
from sparkvision.data.table import is_image_table, read_meta, read_table
from sparkvision.detect.boxes import area_fraction, overlap_of_smaller
from sparkvision.detect.scene_table import scene_groups
from sparkvision.detect.scenes import SceneConfig, SceneItem, compose_scene, cut_item
from sparkvision.ops import ParamError

COLOURS = [(255, 0, 255), (0, 255, 255), (255, 255, 0)]


def solid(colour, size=(20, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def test_scenes_hold_their_items_inside_good_boxes_over_many_seeds():
    cfg = SceneConfig()
    counts = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        n = 1 + seed % 3
        items = [SceneItem(solid(COLOURS[i]), i, f"c{i}", f"id{i}") for i in range(n)]
        scene, boxes = compose_scene(items, rng, cfg)
        assert scene.mode == "RGB" and scene.size == (128, 128)
        assert len(boxes) == n
        counts.add(n)
        assert sorted((b.label, b.label_name, b.content_id) for b in boxes) == [
            (i, f"c{i}", f"id{i}") for i in range(n)
        ]
        xyxy = torch.tensor([b.xyxy for b in boxes])
        assert (xyxy[:, :2] >= 0).all() and (xyxy[:, 2] <= 128).all() and (xyxy[:, 3] <= 128).all()
        cover = area_fraction(xyxy, cfg.size)
        assert ((cover >= 0.05) & (cover <= 0.60)).all(), cover
        if n > 1:
            overlap = overlap_of_smaller(xyxy, xyxy).fill_diagonal_(0)
            assert overlap.max() <= cfg.max_overlap
        # Each item's colour fills its box, except where a later item was pasted over it.
        pixels = np.asarray(scene, np.int16)
        for k, b in enumerate(boxes):
            x1, y1, x2, y2 = (int(v) for v in b.xyxy)
            visible = np.zeros((128, 128), bool)
            visible[y1:y2, x1:x2] = True
            for later in boxes[k + 1 :]:
                lx1, ly1, lx2, ly2 = (int(v) for v in later.xyxy)
                visible[ly1:ly2, lx1:lx2] = False
            diff = np.abs(pixels[visible] - np.array(COLOURS[b.label])).max(axis=1)
            assert visible.sum() > 0 and np.percentile(diff, 99) <= 20, (seed, k)
    assert counts == {1, 2, 3}


def test_a_grayscale_item_is_pasted_through_its_mask_with_a_tight_box():
    arr = np.zeros((28, 28), np.uint8)  # Fashion-MNIST style: the object on black
    arr[6:18, 9:15] = 200
    item = Image.fromarray(arr, "L")
    cut, mask = cut_item(item, "mask")
    assert cut.mode == "RGB" and cut.size == (6, 12) and mask is not None
    assert cut_item(item, "rect")[0].size == (28, 28) and cut_item(item, "rect")[1] is None
    scene, (box,) = compose_scene([SceneItem(item, 0)], np.random.default_rng(3))
    x1, y1, x2, y2 = (int(v) for v in box.xyxy)
    assert abs((x2 - x1) / (y2 - y1) - 0.5) < 0.1  # the object's shape, not the 28x28 square's
    inside = np.asarray(scene, np.int16)[y1:y2, x1:x2]
    assert np.percentile(np.abs(inside - 200).max(axis=2), 90) <= 20  # gray object, no black square


def test_the_same_generator_state_gives_the_same_scene():
    items = [SceneItem(solid((10, 200, 30), mode="RGB"), 0), SceneItem(solid(90, (12, 12), "L"), 1)]
    a, ba = compose_scene(items, np.random.default_rng(7))
    b, bb = compose_scene(items, np.random.default_rng(7))
    c, _ = compose_scene(items, np.random.default_rng(8))
    assert a.tobytes() == b.tobytes() and ba == bb
    assert a.tobytes() != c.tobytes()
    with pytest.raises(ValueError):
        compose_scene([], np.random.default_rng(0))


def test_scene_groups_cut_runs_into_min_max_groups_and_drop_nothing():
    rows = [("train", i) for i in range(20)] + [("test", i) for i in range(7)] + [("val", 0)]
    groups = list(
        scene_groups(rows, lambda r: r[0], lambda r: np.random.default_rng(r[1]), min_items=2, max_items=3)
    )
    for g in groups:
        assert len({r[0] for r in g}) == 1  # never across splits
        assert len(g) == len(set(g))  # an item at most once per scene
        assert 2 <= len(g) <= 3 or g == [("val", 0)]  # a one-row run cannot make two
    used = [r for g in groups for r in g]
    assert set(used) == set(rows)
    assert len(used) - len(rows) <= 2  # only a run's short tail is topped up from its first rows
    with pytest.raises(ValueError):
        list(scene_groups(rows, lambda r: r[0], lambda r: np.random.default_rng(0), 3, 2))


def test_datasets_scenes_writes_a_detection_table_that_is_still_an_image_table(spark, tiny_table, tmp_path):
    out = str(tmp_path / "scenes")
    s = api.scenes(spark, source=tiny_table, out=out, seed=1, size=64)
    source = read_table(spark, tiny_table)
    assert s["source_rows"] == 96 and s["items_used"] == 96  # min_items 1: every row once
    assert s["rows_by_split"].keys() == {"train", "test"}
    assert set(s["scenes_by_items"]) <= {"1", "2", "3"} and len(s["scenes_by_items"]) > 1

    assert is_image_table(spark, out) and is_detection_table(spark, out)
    assert not is_detection_table(spark, tiny_table)
    assert read_meta(spark, out).class_names == read_meta(spark, tiny_table).class_names
    assert read_table(spark, out).count() == s["scenes"]  # read as a plain image table
    det = read_detection_table(spark, out)
    assert det.schema.fieldNames() == DETECTION_SCHEMA.fieldNames()

    # Every box is one source item, of the scene's own split, with its label.
    split_of = {
        r.content_id: (r.split, r.label) for r in source.select("content_id", "split", "label").collect()
    }
    rows = det.collect()
    n_boxes = 0
    for r in rows:
        assert 1 <= len(r.boxes) <= 3 and r.width == r.height == 64 and r.format == "PNG"
        assert Image.open(io.BytesIO(r.image)).size == (64, 64)
        for b in r.boxes:
            assert split_of[b.item_content_id] == (r.split, b.label)
            assert 0 <= b.x1 < b.x2 <= 64 and 0 <= b.y1 < b.y2 <= 64
        largest = max(r.boxes, key=lambda b: (b.x2 - b.x1) * (b.y2 - b.y1))
        assert r.label == largest.label
        n_boxes += len(r.boxes)
    assert n_boxes == 96

    # Repeatable: the same seed writes the same scenes (other seeds: the compositor's test).
    again = str(tmp_path / "again")
    api.scenes(spark, source=tiny_table, out=again, seed=1, size=64)
    assert sorted(r.content_id for r in read_table(spark, again).collect()) == sorted(
        r.content_id for r in rows
    )


def test_scenes_per_item_and_min_items_on_one_split(spark, tiny_table, tmp_path):
    out = str(tmp_path / "test_scenes")
    s = api.scenes(
        spark, source=tiny_table, out=out, split="test", scenes_per_item=2, min_items=2, seed=5, format="JPEG"
    )
    det = read_detection_table(spark, out).collect()
    assert s["rows_by_split"] == {"test": len(det)}
    assert all(2 <= len(r.boxes) <= 3 and r.format == "JPEG" for r in det)
    used = [b.item_content_id for r in det for b in r.boxes]
    assert len(set(used)) == 32 and len(used) >= 64  # each test item in two scenes (or a topped-up third)


def test_bad_parameters_are_one_line(spark, tiny_table, tmp_path):
    with pytest.raises(ParamError, match="max_items"):
        api.scenes(spark, source=tiny_table, out=str(tmp_path / "x"), min_items=3, max_items=2)
    with pytest.raises(ParamError, match="not a sparkvision image table"):
        (tmp_path / "plain").mkdir()
        api.scenes(spark, source=str(tmp_path / "plain"), out=str(tmp_path / "y"))
    with pytest.raises(ParamError, match="no rows"):
        api.scenes(spark, source=tiny_table, out=str(tmp_path / "z"), split="val")
    r = CliRunner().invoke(
        app, ["datasets", "scenes", tiny_table, str(tmp_path / "w"), "--min-items", "3", "--max-items", "1"]
    )
    assert r.exit_code == 2 and "--min-items" in r.output and "Traceback" not in r.output
