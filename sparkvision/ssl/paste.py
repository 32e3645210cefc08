"""Views of an item as the detect -> crop pipeline will show it: cut to its box, on clutter.

Why: ``features`` embeds the detector's crop of a product on a busy background, and retrieval
compares it with the clean catalogue picture. A classifier's features separate classes, not
items; an instance-level embedder has to learn that the crop and the clean item are the same
thing. Self-supervised pretraining (instance discrimination) learns exactly the invariances its
views show, so these views show what the pipeline does to an item:

* **the object's box as the crop window** (``object_crop``): the item's non-background pixels
  found as :func:`sparkvision.detect.scenes.item_mask` finds them (pixels that differ from the
  border's median colour by more than :data:`~sparkvision.detect.scenes.MASK_THRESHOLD`, a 3x3
  closing), their bounding box grown on each side by its own random margin (a detector's box is
  never exact, and ``crop`` adds :class:`~sparkvision.detect.config.CropSpec`'s margin), then
  stretched to the output size as ``crop`` and ``embed`` resize;
* **the background replaced by clutter** (``clutter``): outside the mask, a random window of a
  synthetic cluttered scene (:func:`~sparkvision.detect.scenes.clutter_background`, the same
  generator ``datasets scenes`` uses), at the scale a 5-60% item's crop sees it, plus light
  sensor noise.

Both are batched tensor ops (one ``grid_sample`` for the geometry, one for the clutter), drawn per
sample from the view's generator. The clutter comes from a bank of scenes made once per process
from that generator (PIL drawing per sample would cost more than the training step).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sparkvision.detect.scenes import MASK_THRESHOLD, clutter_background

BANK_SCENES = 256  # cluttered backgrounds drawn once per process
BANK_SIZE = 128  # their side, in pixels: the default scene's
# The side of the clutter window, as a share of a bank scene's side: an item covering 5-60% of a
# scene, cropped with its margin, shows about 0.25-0.95 of the scene's side.
CLUTTER_WINDOW = (0.25, 0.95)
SENSOR_NOISE = 4.0 / 255  # largest std of the noise over a cluttered view (the scenes' final_noise)


def object_masks(x: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, 1, H, W)`` masks of each image's object, as ``item_mask`` finds it.

    An image whose border is not mostly one colour, or with nothing distinct from it, is all
    object (its mask is all True), as ``datasets scenes`` then pastes it whole.
    """
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (B, C, P)
    bg = border.median(dim=2).values  # (B, C)
    thr = MASK_THRESHOLD / 255
    plain = ((border - bg[:, :, None]).abs().amax(1) <= thr).float().mean(1) >= 0.5  # (B,)
    diff = ((x - bg[:, :, None, None]).abs().amax(1, keepdim=True) > thr).float()
    closed = -F.max_pool2d(-F.max_pool2d(diff, 3, 1, 1), 3, 1, 1)  # dilate then erode: fill pinholes
    mask = closed > 0.5
    whole = ~plain | ~mask.flatten(1).any(1)
    return mask | whole[:, None, None, None]


def mask_boxes(mask: torch.Tensor) -> torch.Tensor:
    """``(B, 4)`` boxes ``x1, y1, x2, y2`` (far edges exclusive, pixels) of the True pixels."""
    _, _, h, w = mask.shape
    rows, cols = mask[:, 0].any(2), mask[:, 0].any(1)  # (B, H), (B, W)

    def span(v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = v.float().argmax(1)
        last = n - v.flip(1).float().argmax(1)
        return first.float(), last.float()

    x1, x2 = span(cols, w)
    y1, y2 = span(rows, h)
    return torch.stack([x1, y1, x2, y2], 1)


def box_windows(
    boxes: torch.Tensor, size: tuple[int, int], margin: tuple[float, float], u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cx, cy, sw, sh)`` in ``affine_grid``'s units for each box grown by a margin per side.

    ``u`` ``(B, 4)`` in [0, 1) draws the left, top, right, bottom margins from ``margin`` (shares
    of the box's own width or height): the window may reach past the image, where the view shows
    background.
    """
    h, w = size
    lo, hi = margin
    m = lo + u * (hi - lo)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    left, right = boxes[:, 0] - m[:, 0] * bw, boxes[:, 2] + m[:, 2] * bw
    top, bottom = boxes[:, 1] - m[:, 1] * bh, boxes[:, 3] + m[:, 3] * bh
    return (left + right) / w - 1, (top + bottom) / h - 1, (right - left) / w, (bottom - top) / h


class ClutterBank:
    """Cluttered backgrounds made once, sampled as random windows per view."""

    def __init__(self, seed: int, count: int = BANK_SCENES, size: int = BANK_SIZE) -> None:
        rng = np.random.default_rng(seed)
        scenes = [np.asarray(clutter_background(rng, (size, size))) for _ in range(count)]
        rgb = torch.from_numpy(np.stack(scenes)).permute(0, 3, 1, 2).float() / 255  # (N, 3, S, S)
        gray = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]  # PIL's "L"
        self.scenes = {3: rgb.contiguous(), 1: gray.contiguous()}

    def windows(
        self, b: int, channels: int, size: tuple[int, int], rand, device: torch.device
    ) -> torch.Tensor:
        """``(b, channels, H, W)`` float windows in [0, 1], one per sample."""
        bank = self.scenes[channels]
        pick = (rand(b) * len(bank)).long().clamp(max=len(bank) - 1).cpu()
        src = bank[pick].to(device)
        lo, hi = CLUTTER_WINDOW
        side = lo + rand(b) * (hi - lo)
        cx, cy = (rand(b) * 2 - 1) * (1 - side), (rand(b) * 2 - 1) * (1 - side)
        zero = torch.zeros_like(side)
        theta = torch.stack([torch.stack([side, zero, cx], 1), torch.stack([zero, side, cy], 1)], 1)
        grid = F.affine_grid(theta, [b, channels, *size], align_corners=False)
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
