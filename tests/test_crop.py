"""Crop geometry of the detect -> crop -> embed pipeline: pure functions, no Spark, no model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sparkvision.data.images import RejectError
from sparkvision.detect.config import CropSpec
from sparkvision.detect.crop import (
    crop_pixels,
    crops_of,
    encode_png,
    image_rows,
    matched_box,
    pick_boxes,
)


def png(w: int, h: int, mode: str = "RGB") -> bytes:
    arr = np.arange(w * h * (1 if mode == "L" else 3), dtype=np.uint32).astype(np.uint8)
    img = Image.fromarray(arr.reshape(h, w) if mode == "L" else arr.reshape(h, w, 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def det(x1, y1, x2, y2, score=0.9):
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "label": 0, "label_name": "product"}


def test_the_best_box_or_every_box():
    dets = [det(0, 0, 5, 5, 0.9), det(5, 5, 9, 9, 0.6)]
    assert pick_boxes(dets, all_boxes=False) == dets[:1]
    assert pick_boxes(dets, all_boxes=True) == dets
    assert pick_boxes([], all_boxes=False) == []


def test_margin_grows_the_box_and_is_clipped_at_the_border():
    img = Image.new("RGB", (100, 80))
    crop, box = crop_pixels(img, det(20, 20, 40, 60), margin=0.1)  # 20 wide, 40 high: +2 / +4
    assert (box["x1"], box["y1"], box["x2"], box["y2"]) == (18.0, 16.0, 42.0, 64.0)
    assert crop.size == (24, 48) and box["score"] == 0.9
    crop, box = crop_pixels(img, det(90, 70, 100, 80), margin=0.5)  # would reach 105, 85
    assert (box["x1"], box["y1"], box["x2"], box["y2"]) == (85.0, 65.0, 100.0, 80.0)
    crop, box = crop_pixels(img, det(10.4, 10.6, 10.4, 10.6), margin=0.0)  # degenerate: one pixel
    assert crop.size == (1, 1)


def test_nothing_detected_falls_back_to_the_whole_image_marked():
    data = png(30, 20)
    [(crop, box, fallback)] = crops_of(data, 3, [], CropSpec())
    assert fallback and crop.size == (30, 20)
    assert box == {
        "x1": 0.0,
        "y1": 0.0,
        "x2": 30.0,
        "y2": 20.0,
        "score": None,
        "label": None,
        "label_name": None,
    }
    found = crops_of(
        data, 3, [det(2, 2, 12, 12), det(15, 5, 25, 15, 0.7)], CropSpec(margin=0, all_boxes=True)
    )
    assert [f for *_, f in found] == [False, False] and [c.size for c, *_ in found] == [(10, 10), (10, 10)]
    gray = crops_of(png(16, 16, "L"), 1, [det(0, 0, 8, 8)], CropSpec(margin=0))
    assert gray[0][0].mode == "L"


def test_crop_pixels_are_the_stored_pixels_and_png_shrinks_only_when_asked():
    data = png(40, 30)
    src = np.asarray(Image.open(io.BytesIO(data)))
    [(crop, _, _)] = crops_of(data, 3, [det(5, 6, 25, 16)], CropSpec(margin=0))
    assert np.array_equal(np.asarray(crop), src[6:16, 5:25])
    assert Image.open(io.BytesIO(encode_png(crop, None))).size == (20, 10)
    assert Image.open(io.BytesIO(encode_png(crop, 8))).size == (8, 4)


def test_undecodable_bytes_are_a_reject_and_a_query_batch_carries_sizes():
    with pytest.raises(RejectError):
        crops_of(b"not an image", 3, [], CropSpec())
    rows = image_rows([png(12, 7), png(5, 5, "L"), b"junk"])
    assert rows.column("width").to_pylist() == [12, 5, 1] and rows.column("height").to_pylist() == [7, 5, 1]
    assert rows.column("channels").to_pylist() == [3, 1, 3]


def test_a_crop_is_labelled_by_the_true_box_its_detection_overlaps():
    truth = [
        {"x1": 0.0, "y1": 0.0, "x2": 20.0, "y2": 20.0, "label": 3, "label_name": "bag"},
        {"x1": 40.0, "y1": 40.0, "x2": 80.0, "y2": 80.0, "label": 7, "label_name": "shoe"},
    ]
    assert matched_box(det(42, 41, 79, 82), truth)["label_name"] == "shoe"
    assert matched_box(det(1, 0, 19, 21), truth)["label"] == 3
    assert matched_box(det(10, 10, 50, 50), truth) is None  # overlaps both, neither by IoU 0.5
    assert matched_box(None, truth) is None and matched_box(det(0, 0, 5, 5), []) is None
