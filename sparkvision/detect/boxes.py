"""Box geometry shared by scenes, detection and cropping: pure functions on tensors, no Spark.

Conventions, the same everywhere in sparkvision:

* A box is ``(x1, y1, x2, y2)`` in pixels of the image it belongs to, x to the right and y down,
  with ``x2``/``y2`` the far *edges* (a box covering pixel columns 3..5 is ``x1=3, x2=6``), as in
  torchvision's detection models and COCO-style ``xyxy``. Boxes are ``(N, 4)`` float tensors.
* An image size is ``(width, height)``, PIL's order. torchvision's
  :func:`~torchvision.ops.clip_boxes_to_image` takes ``(height, width)``; only this module calls it.

The detector sees a resized copy of each image (e.g. 320x320) while stored boxes are in pixels of
the stored image, so boxes are rescaled on the way out (:func:`rescale_boxes`); a crop needs whole
pixels and must never be empty, whatever a model returns (:func:`crop_rect`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_area, clip_boxes_to_image, nms

Size = tuple[int, int]  # (width, height)


def as_boxes(boxes: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """``boxes`` as an ``(N, 4)`` float tensor (an empty list becomes ``(0, 4)``)."""
    t = torch.as_tensor(boxes, dtype=torch.float32)
    return t.reshape(-1, 4)


def clip_boxes(boxes: Tensor, size: Size) -> Tensor:
    """Boxes cut to the image: a detector's boxes may reach past the border."""
    width, height = size
    return clip_boxes_to_image(as_boxes(boxes), (height, width))


def expand_boxes(boxes: Tensor, margin: float, size: Size) -> Tensor:
    """Each box grown by ``margin`` of its own width/height on every side, then clipped.

    A tight box cuts off the product's edge; a relative margin keeps some context whatever the
    object's size. ``margin=0.1`` makes a 100-px-wide box 120 px wide (where the image allows).
    """
    b = as_boxes(boxes)
    if margin < 0:
        raise ValueError(f"margin {margin} must be >= 0")
    w = (b[:, 2] - b[:, 0]).clamp(min=0)
    h = (b[:, 3] - b[:, 1]).clamp(min=0)
    grow = torch.stack([-w, -h, w, h], dim=1) * margin  # (N, 4)
    return clip_boxes(b + grow, size)


def crop_rect(box: Sequence[float] | Tensor, size: Size) -> tuple[int, int, int, int]:
    """Whole-pixel ``(left, top, right, bottom)`` for ``PIL.Image.crop``: never empty, inside the image.

    The float box is widened to the pixels it touches (floor/ceil), clipped to the image, and a
    degenerate box (zero or negative width, or wholly outside) still yields at least one pixel, at
    the nearest place inside the image: a crop that fails on a bad box would fail a whole batch.
    """
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image size {size} has no pixels")
    x1, y1, x2, y2 = (float(v) for v in (box.tolist() if isinstance(box, Tensor) else box))
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return (0, 0, width, height)
    left = min(max(math.floor(min(x1, x2)), 0), width - 1)
    top = min(max(math.floor(min(y1, y2)), 0), height - 1)
    right = max(min(math.ceil(max(x1, x2)), width), left + 1)
    bottom = max(min(math.ceil(max(y1, y2)), height), top + 1)
    return (left, top, right, bottom)


def whole_image_box(size: Size) -> Tensor:
    """The box of the whole image, ``(1, 4)``: the fallback where nothing was detected."""
    width, height = size
    return torch.tensor([[0.0, 0.0, float(width), float(height)]])


def boxes_or_whole_image(boxes: Tensor, size: Size) -> tuple[Tensor, bool]:
    """``(boxes, False)``, or ``(whole_image_box, True)`` when there is none.

    The flag travels with the crop so a row that fell back is marked as such, not silently
    passed off as a detection.
    """
    b = as_boxes(boxes)
    if len(b) == 0:
        return whole_image_box(size), True
    return b, False


def rescale_boxes(boxes: Tensor, from_size: Size, to_size: Size) -> Tensor:
    """Boxes in pixels of an image of ``from_size`` mapped onto the same image at ``to_size``.

    E.g. from the detector's 320x320 input back to the stored 640x480 picture: x scales by the
    width ratio, y by the height ratio (the resize need not keep the aspect ratio).
    """
    fw, fh = from_size
    tw, th = to_size
    scale = torch.tensor([tw / fw, th / fh, tw / fw, th / fh], dtype=torch.float32)
    return as_boxes(boxes) * scale


def top_index(scores: Tensor) -> int | None:
    """Index of the best-scoring box, or None when there is none (JD's "keep the highest box")."""
    if scores.numel() == 0:
        return None
    return int(torch.argmax(scores).item())


def indices_above(scores: Tensor, min_score: float) -> Tensor:
    """Indices of every box scoring at least ``min_score``, best first (``--all-boxes``)."""
    idx = torch.nonzero(scores >= min_score).flatten()
    order = torch.argsort(scores[idx], descending=True, stable=True)
    return idx[order]


def filter_detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor | None = None,
    *,
    min_score: float = 0.0,
    iou_threshold: float = 0.5,
    class_agnostic: bool = False,
    max_detections: int | None = None,
) -> Tensor:
    """Indices kept after score filtering and non-maximum suppression, best first.

    Per class (``batched_nms``), a box suppresses only boxes of its own label: a shirt on a bag
    keeps both. ``class_agnostic`` (or no labels) suppresses across labels (``nms``), for a
    single "product" detector or when one box per object is wanted whatever its class.
    """
    b = as_boxes(boxes)
    candidates = torch.nonzero(scores >= min_score).flatten()
    if candidates.numel() == 0:
        return candidates
    cb, cs = b[candidates], scores[candidates].float()
    if class_agnostic or labels is None:
        keep = nms(cb, cs, iou_threshold)
    else:
        keep = batched_nms(cb, cs, labels[candidates], iou_threshold)
    kept = candidates[keep]  # both nms variants return indices sorted by decreasing score
    return kept if max_detections is None else kept[:max_detections]


def area_fraction(boxes: Tensor, size: Size) -> Tensor:
    """Each box's share of the image area (its coverage), ``(N,)``."""
    width, height = size
    return box_area(as_boxes(boxes)) / float(width * height)


def overlap_of_smaller(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over the smaller box's area, ``(N, M)``.

    Unlike IoU, this is high when a small box sits mostly under a large one, which is what makes
    a pasted item's box a bad label; torchvision has IoU variants but not this one.
    """
    a, b = as_boxes(a), as_boxes(b)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # (N, M)
    smaller = torch.minimum(box_area(a)[:, None], box_area(b)[None, :])
    return inter / smaller.clamp(min=1e-9)
