"""Synthetic detection scenes: items of an image table pasted onto cluttered backgrounds.

Product photos have busy backgrounds and small subjects (the JD case that motivates detect ->
crop -> embed). A scene reproduces that from any labelled image table: 1-3 items, each scaled to
cover 5-60% of the scene, pasted at random places over a background of gradients, blob textures,
noise and distractor shapes, with each item's box recorded in scene pixels.

Everything here is a pure function of its inputs and a ``numpy.random.Generator``: the same items
and generator state give the same scene, on the driver, an executor or in a test.

Choices, and why:

* **Items are pasted through a mask** of their non-background pixels (``paste="mask"``, the
  default): the background is the median colour of the item's border, and pixels that differ
  from it are the item. Pasting the whole rectangle would put e.g. Fashion-MNIST's black square
  on the clutter, and a detector would learn to find black squares instead of garments. The item
  is first cut to the bounding box of its mask, so the recorded box is tight around the object
  and its coverage is the object's. An item with no distinct background (a solid colour, a
  photo filling its frame) is pasted whole; ``paste="rect"`` always does that.
* **Distractor shapes are drawn under the items**, never over them, so a recorded box always
  holds its item's pixels; only a later item may cover part of an earlier one, and at most
  ``max_overlap`` of the smaller of the two boxes (positions and scales are re-drawn until that
  holds). Items are pasted largest first, so small items are not buried under big ones.
* **Coverage is drawn log-uniformly**, so small items (the hard case) are as common as large
  ones; with several items the per-item ceiling is lowered so that they fit side by side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from sparkvision.data.images import to_8bit
from sparkvision.detect.boxes import overlap_of_smaller

Paste = Literal["mask", "rect"]
MASK_THRESHOLD = 24  # max channel difference from the border colour that still counts as background
PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class SceneItem:
    """One decoded item to paste, with what its box records about it."""

    image: Image.Image
    label: int | None
    label_name: str | None = None
    content_id: str | None = None


@dataclass(frozen=True)
class PlacedBox:
    """An item's box in scene pixels (``x2``/``y2`` are far edges), with its item's identity."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: int | None
    label_name: str | None
    content_id: str | None

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class SceneConfig:
    """How a scene is made; the defaults are the issue's (1-3 items covering 5-60%, 128x128)."""

    size: tuple[int, int] = (128, 128)  # (width, height)
    min_coverage: float = 0.05  # of the scene area, per item box
    max_coverage: float = 0.60
    max_overlap: float = 0.30  # intersection over the smaller box, between any two items
    paste: Paste = "mask"
    distractors: tuple[int, int] = (4, 14)  # shapes drawn under the items, inclusive range
    final_noise: float = 4.0  # largest std of the pixel noise added over the finished scene

    def __post_init__(self) -> None:
        if not 0 < self.min_coverage <= self.max_coverage <= 1:
            raise ValueError(f"coverage range {self.min_coverage}..{self.max_coverage} must lie in (0, 1]")
        if min(self.size) < 8:
            raise ValueError(f"scene size {self.size} is under 8 pixels")


# --------------------------------------------------------------------------- backgrounds


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def gradient(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A linear blend between two random colours at a random angle, ``(H, W, 3)`` float."""
    w, h = size
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    a, b = np.array(random_colour(rng), np.float32), np.array(random_colour(rng), np.float32)
    return a * (1 - t[..., None]) + b * t[..., None]


def blob_texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Tiled colour noise, upsampled smoothly into blobs, ``(H, W, 3)`` float."""
    w, h = size
    cells = int(rng.integers(3, 17))
    small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    big = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(big, np.float32)


def draw_distractors(rng: np.random.Generator, img: Image.Image, count: int) -> None:
    """Random polygons, ellipses, rectangles and lines, in place: edges an item detector must ignore."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        kind = rng.integers(0, 4)
        colour = random_colour(rng)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.3) * min(w, h)
        if kind == 0:
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = r * rng.uniform(0.4, 1.0, n)
            pts = [(cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii, strict=True)]
            draw.polygon(pts, fill=colour)
        elif kind == 1:
            rx, ry = r, r * rng.uniform(0.3, 1.0)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        elif kind == 2:
            rx, ry = r * rng.uniform(0.2, 1.0), r * rng.uniform(0.2, 1.0)
            draw.rectangle(
                [cx - rx, cy - ry, cx + rx, cy + ry], outline=colour, width=int(rng.integers(1, 4))
            )
        else:
            ex, ey = rng.uniform(0, w), rng.uniform(0, h)
            draw.line([cx, cy, ex, ey], fill=colour, width=int(rng.integers(1, 5)))


def clutter_background(
    rng: np.random.Generator, size: tuple[int, int], distractors: tuple[int, int] = (4, 14)
) -> Image.Image:
    """A busy RGB background: gradient and blob texture blended, pixel noise, distractor shapes."""
    mix = rng.uniform(0.2, 0.8)
    base = gradient(rng, size) * (1 - mix) + blob_texture(rng, size) * mix
    base += rng.normal(0.0, rng.uniform(0, 20), base.shape)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw_distractors(rng, img, int(rng.integers(distractors[0], distractors[1] + 1)))
    return img


# --------------------------------------------------------------------------- items


def item_mask(rgb: np.ndarray) -> np.ndarray | None:
    """Boolean ``(H, W)`` mask of the pixels that differ from the border's median colour.

    None when the item has no distinct background: no border pixel is background-coloured
    often enough, or nothing differs from it. A 3x3 closing fills pinholes (dark pixels inside a
    dark garment) so the item is not pasted with specks of clutter through it.
    """
    h, w = rgb.shape[:2]
    if h < 3 or w < 3:
        return None
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.int16)  # (P, 3)
    bg = np.median(border, axis=0)
    if np.mean(np.abs(border - bg).max(axis=1) <= MASK_THRESHOLD) < 0.5:
        return None  # the border is not one colour: the item fills its frame
    diff = np.abs(rgb.astype(np.int16) - bg).max(axis=2) > MASK_THRESHOLD
    if not diff.any():
        return None
    m = Image.fromarray(diff.astype(np.uint8) * 255, "L")
    m = m.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))
    return np.asarray(m) > 127


def cut_item(image: Image.Image, paste: Paste) -> tuple[Image.Image, Image.Image | None]:
    """``(RGB item cut to its object, its L mask or None)``: the object's pixels and nothing else."""
    rgb = to_8bit(image, "RGB")
    if paste == "rect":
        return rgb, None
    arr = np.asarray(rgb)
    mask = item_mask(arr)
    if mask is None:
        return rgb, None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    cut = Image.fromarray(np.ascontiguousarray(arr[y0:y1, x0:x1]), "RGB")
    return cut, Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8) * 255, "L")


def fit_size(area: float, aspect: float, lo: float, hi: float, size: tuple[int, int]) -> tuple[int, int]:
    """Whole-pixel ``(w, h)`` near ``area`` with aspect ``w/h``, inside the scene, covering ``lo..hi``.

    Rounding can push a box just outside the coverage range; a side is then nudged a pixel at a
    time. An item too elongated to reach ``lo`` inside the scene gets as close as it fits.
    """
    sw, sh = size
    total = sw * sh
    w = min(max(1, round(math.sqrt(area * aspect))), sw)
    h = min(max(1, round(w / aspect)), sh)
    while w * h < lo * total and (w < sw or h < sh):
        if (h >= sh or w / sw <= h / sh) and w < sw:
            w += 1
        else:
            h += 1
    while w * h > hi * total and (w > 1 or h > 1):
        if w / sw >= h / sh and w > 1:
            w -= 1
        else:
            h -= 1
    return w, h


def place(
    rng: np.random.Generator,
    aspect: float,
    cover: float,
    placed: list[tuple[float, float, float, float]],
    cfg: SceneConfig,
) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of one item of coverage ``cover``: a position whose box overlaps no placed
    box by more than ``cfg.max_overlap``. Every 20 failed draws the item shrinks (not below
    ``cfg.min_coverage``); after :data:`PLACEMENT_TRIES` the least-overlapping draw is used."""
    sw, sh = cfg.size
    lo, hi = cfg.min_coverage, cfg.max_coverage
    best: tuple[float, tuple[int, int, int, int]] | None = None
    for attempt in range(PLACEMENT_TRIES):
        if attempt and attempt % 20 == 0:
            cover = max(lo, cover * 0.8)
        w, h = fit_size(cover * sw * sh, aspect, lo, hi, cfg.size)
        x, y = int(rng.integers(0, sw - w + 1)), int(rng.integers(0, sh - h + 1))
        if not placed:
            return x, y, w, h
        box = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
        worst = float(overlap_of_smaller(box, torch.tensor(placed)).max())
        if worst <= cfg.max_overlap:
            return x, y, w, h
        if best is None or worst < best[0]:
            best = (worst, (x, y, w, h))
    assert best is not None
    return best[1]


def compose_scene(
    items: Sequence[SceneItem], rng: np.random.Generator, cfg: SceneConfig = SceneConfig()
) -> tuple[Image.Image, list[PlacedBox]]:
    """A cluttered RGB scene of ``cfg.size`` with ``items`` pasted on it, and their boxes.

    Boxes come in paste order (largest first): a later box may cover up to ``cfg.max_overlap``
    of an earlier one, never the reverse.
    """
    if not items:
        raise ValueError("a scene needs at least one item")
    scene = clutter_background(rng, cfg.size, cfg.distractors)
    ceiling = min(cfg.max_coverage, 0.9 / len(items))  # room for all of them side by side
    lo = min(cfg.min_coverage, ceiling)
    covers = [math.exp(rng.uniform(math.log(lo), math.log(ceiling))) for _ in items]
    placed: list[tuple[float, float, float, float]] = []
    boxes: list[PlacedBox] = []
    for i in sorted(range(len(items)), key=lambda i: -covers[i]):  # largest first
        item = items[i]
        img, mask = cut_item(item.image, cfg.paste)
        x, y, w, h = place(rng, img.width / img.height, covers[i], placed, cfg)
        patch = img.resize((w, h), Image.Resampling.BILINEAR)
        if mask is None:
            scene.paste(patch, (x, y))
        else:
            scene.paste(patch, (x, y), mask.resize((w, h), Image.Resampling.BILINEAR))
        placed.append((float(x), float(y), float(x + w), float(y + h)))
        boxes.append(PlacedBox(*placed[-1], item.label, item.label_name, item.content_id))
    # Light sensor noise over everything, so clean item pixels on a noisy ground are no shortcut.
    arr = np.asarray(scene, np.float32) + rng.normal(
        0.0, rng.uniform(0, cfg.final_noise), (cfg.size[1], cfg.size[0], 3)
    )
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB"), boxes
