"""Box geometry: clipping, margins, whole-pixel crops, the no-box fallback, rescaling, NMS."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sparkvision.detect.boxes import (
    area_fraction,
    boxes_or_whole_image,
    clip_boxes,
    crop_rect,
    expand_boxes,
    filter_detections,
    indices_above,
    overlap_of_smaller,
    rescale_boxes,
    top_index,
    whole_image_box,
)

SIZE = (100, 50)  # (width, height)


def test_clip_keeps_boxes_inside_width_and_height():
    b = torch.tensor([[-10.0, -5.0, 120.0, 70.0], [10.0, 10.0, 20.0, 20.0]])
    out = clip_boxes(b, SIZE)
    assert out.tolist() == [[0.0, 0.0, 100.0, 50.0], [10.0, 10.0, 20.0, 20.0]]


def test_expand_grows_by_the_boxs_own_size_and_stops_at_the_border():
    b = torch.tensor([[40.0, 20.0, 60.0, 30.0]])  # 20 x 10
    assert expand_boxes(b, 0.1, SIZE).tolist() == [[38.0, 19.0, 62.0, 31.0]]
    # Near the border the margin is cut, on that side only.
    edge = expand_boxes(torch.tensor([[0.0, 40.0, 20.0, 50.0]]), 0.5, SIZE)
    assert edge.tolist() == [[0.0, 35.0, 30.0, 50.0]]
    assert expand_boxes(b, 0.0, SIZE).tolist() == b.tolist()
    with pytest.raises(ValueError):
        expand_boxes(b, -0.1, SIZE)


def test_crop_rect_takes_every_touched_pixel_and_crops_with_pil():
    rect = crop_rect([10.2, 5.7, 30.1, 20.0], SIZE)
    assert rect == (10, 5, 31, 20)
    img = Image.new("RGB", SIZE)
    assert img.crop(rect).size == (21, 15)
    margin = crop_rect(expand_boxes(torch.tensor([[90.0, 40.0, 100.0, 50.0]]), 0.5, SIZE)[0], SIZE)
    assert margin == (85, 35, 100, 50)  # the margin stops at the right and bottom edges


@pytest.mark.parametrize(
    "box",
    [
        [20.0, 20.0, 20.0, 20.0],  # zero width and height
        [30.0, 10.0, 29.5, 12.0],  # x2 < x1
        [150.0, 60.0, 200.0, 80.0],  # wholly outside, beyond the far corner
        [-30.0, -30.0, -10.0, -10.0],  # wholly outside, before the origin
        [float("nan"), 0.0, 1.0, 1.0],
    ],
)
def test_crop_rect_is_never_empty_and_never_outside(box):
    left, top, right, bottom = crop_rect(box, SIZE)
    assert 0 <= left < right <= SIZE[0] and 0 <= top < bottom <= SIZE[1]
    assert Image.new("L", SIZE).crop((left, top, right, bottom)).size >= (1, 1)


def test_no_box_falls_back_to_the_whole_image_and_says_so():
    boxes, fell_back = boxes_or_whole_image(torch.zeros((0, 4)), SIZE)
    assert fell_back and boxes.tolist() == whole_image_box(SIZE).tolist() == [[0.0, 0.0, 100.0, 50.0]]
    assert crop_rect(boxes[0], SIZE) == (0, 0, 100, 50)
    found, fell_back = boxes_or_whole_image(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), SIZE)
    assert not fell_back and found.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert boxes_or_whole_image([], SIZE)[1]


def test_rescale_between_detector_input_and_stored_image_round_trips():
    stored = (640, 480)
    b = torch.tensor([[32.0, 64.0, 160.0, 320.0]])  # in the detector's 320 x 320 input
    on_image = rescale_boxes(b, (320, 320), stored)
    assert on_image.tolist() == [[64.0, 96.0, 320.0, 480.0]]  # x by 2, y by 1.5
    assert torch.allclose(rescale_boxes(on_image, stored, (320, 320)), b)


def test_top_index_and_indices_above():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.7])
    assert top_index(scores) == 1
    assert top_index(torch.tensor([])) is None
    assert indices_above(scores, 0.5).tolist() == [1, 3, 2]
    assert indices_above(scores, 0.95).numel() == 0


def test_nms_is_per_class_unless_class_agnostic():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # class 0, best
            [1.0, 1.0, 10.0, 10.0],  # class 0, overlaps box 0 heavily: suppressed
            [0.0, 0.0, 10.0, 10.5],  # class 1, overlaps box 0 but another class: kept per class
            [50.0, 20.0, 60.0, 30.0],  # class 0, elsewhere
            [70.0, 20.0, 80.0, 30.0],  # class 1, low score
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.85, 0.6, 0.1])
    labels = torch.tensor([0, 0, 1, 0, 1])
    assert filter_detections(boxes, scores, labels, iou_threshold=0.5).tolist() == [0, 2, 3, 4]
    agnostic = filter_detections(boxes, scores, labels, iou_threshold=0.5, class_agnostic=True)
    assert agnostic.tolist() == [0, 3, 4]
    assert filter_detections(boxes, scores, None).tolist() == [0, 3, 4]  # no labels: agnostic
    # Score filtering comes first, then the best-first cap.
    assert filter_detections(boxes, scores, labels, min_score=0.5).tolist() == [0, 2, 3]
    assert filter_detections(boxes, scores, labels, max_detections=2).tolist() == [0, 2]
    assert filter_detections(boxes, scores, labels, min_score=0.95).numel() == 0
    none = filter_detections(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert none.numel() == 0


def test_area_fraction_and_overlap_of_smaller():
    b = torch.tensor([[0.0, 0.0, 50.0, 25.0], [0.0, 0.0, 10.0, 10.0]])
    assert area_fraction(b, SIZE).tolist() == pytest.approx([0.25, 0.02])
    o = overlap_of_smaller(b, b)
    assert o[0, 1] == 1.0 and o[1, 0] == 1.0  # the small box lies wholly under the big one
    apart = overlap_of_smaller(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 0.0, 25.0, 10.0]]))
    assert apart.item() == pytest.approx(0.5)
