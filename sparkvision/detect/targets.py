"""A detection table's boxes as training targets: pure functions on Arrow and tensors, no Spark.

A rank keeps its shard's ``boxes`` column as one Arrow array (``train.data.Shard.extra``);
:class:`BoxRows` turns it once into flat tensors with per-row offsets (a few bytes per box, no
Python object per row), from which each step takes its rows' targets in the detector's input
pixels. The horizontal flip moves the boxes with the pixels through torchvision's
``transforms.v2`` (``tv_tensors.BoundingBoxes``), so the geometry is torchvision's, not ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

Target = dict[str, torch.Tensor]  # torchvision's detection target: boxes (N, 4) xyxy, labels (N,)


@dataclass
class BoxRows:
    """Every row's boxes, scaled to the detector's input: row ``i`` has ``xyxy[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray  # (N + 1,) int64
    xyxy: torch.Tensor  # (M, 4) float32, pixels of the detector's input
    labels: torch.Tensor  # (M,) int64: the table's label, -1 when null

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def targets(self, rows: torch.Tensor | list[int], class_agnostic: bool) -> list[Target]:
        """torchvision targets of ``rows``: label 1 ("product") when class-agnostic, else the
        table's label + 1 (0 is the background); a box without a label is kept as class 1 only
        when class-agnostic, and dropped otherwise."""
        out = []
        for i in (int(r) for r in rows):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            boxes, labels = self.xyxy[lo:hi], self.labels[lo:hi]
            if class_agnostic:
                labels = torch.ones_like(labels)
            else:
                keep = labels >= 0
                boxes, labels = boxes[keep], labels[keep] + 1
            out.append({"boxes": boxes, "labels": labels})
        return out


def box_rows(boxes: pa.Array, widths: pa.Array, heights: pa.Array, size: tuple[int, int]) -> BoxRows:
    """The ``boxes`` column (``list<struct<x1, y1, x2, y2, label, ...>>``, pixels of each stored
    image of ``widths`` x ``heights``) mapped onto the ``size = (H, W)`` input each image is resized
    to; degenerate boxes (no area after scaling) are dropped, as torchvision refuses them."""
    n = len(boxes)
    counts = pc.fill_null(pc.list_value_length(boxes), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(boxes)
    if len(flat):
        xyxy = np.stack(
            [
                pc.struct_field(flat, k).to_numpy(zero_copy_only=False).astype(np.float32)
                for k in ("x1", "y1", "x2", "y2")
            ],
            axis=1,
        )
        labels = (
            pc.fill_null(pc.struct_field(flat, "label"), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        )
    else:
        xyxy, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    h, w = size
    row_of = np.repeat(np.arange(n), counts)
    sx = w / widths.to_numpy(zero_copy_only=False).astype(np.float32)[row_of]
    sy = h / heights.to_numpy(zero_copy_only=False).astype(np.float32)[row_of]
    xyxy = xyxy * np.stack([sx, sy, sx, sy], axis=1)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, h)
    good = (xyxy[:, 2] > xyxy[:, 0] + 1e-3) & (xyxy[:, 3] > xyxy[:, 1] + 1e-3)
    counts = np.bincount(row_of[good], minlength=n).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return BoxRows(offsets, torch.from_numpy(xyxy[good]), torch.from_numpy(labels[good]))


def hflip(
    images: torch.Tensor, targets: list[Target], flip: torch.Tensor
) -> tuple[torch.Tensor, list[Target]]:
    """Mirror the images where ``flip`` (a ``(B,)`` bool) is set, boxes with them (torchvision v2)."""
    if not bool(flip.any()):
        return images, targets
    h, w = images.shape[-2:]
    images = images.clone()
    out = []
    for i, t in enumerate(targets):
        if flip[i]:
            images[i] = TF.horizontal_flip(images[i])
            boxes = tv_tensors.BoundingBoxes(t["boxes"], format="XYXY", canvas_size=(h, w))
            t = {**t, "boxes": TF.horizontal_flip(boxes).as_subclass(torch.Tensor)}
        out.append(t)
    return images, out
