"""Per-sample random augmentation of a whole batch in a few tensor ops.

Why not ``torchvision.transforms.v2`` directly: called on a batch tensor, v2 draws *one* set of
random parameters and applies it to every image, and calling it per sample in Python costs ~10%
of a small CNN's training step on 2 cores (the plain-PyTorch way hides that in DataLoader worker
processes, which have no spare cores here). So the geometric ops are drawn per sample and applied
with one ``affine_grid``/``grid_sample``; photometric ops are per-sample broadcasts. Flip, crop
with padding, rotation and scale are the same operations as v2's RandomHorizontalFlip,
RandomCrop(padding), RandomAffine(degrees, scale); cutout is v2's RandomErasing with a
fixed-size square that may be clipped at the border; jitter covers brightness, contrast,
saturation and hue (v2's ColorJitter; hue through HSV as v2's ``adjust_hue``, but with a shift
per sample).

Under the "crop" resize policy (``TrainConfig.resize``) augmentation starts with a random resized
crop (v2's RandomResizedCrop) per sample, see :meth:`BatchAugment._resized_crop`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator
from torch import nn

from sparkvision.fields import check_known


@dataclass
class AugmentConfig:
    hflip: float = 0.5  # probability of a horizontal flip
    crop_padding: int = 2  # random crop of the original size from the image padded by this many pixels
    rotation: float = 0.0  # max degrees, uniform in [-rotation, rotation]
    scale: tuple[float, float] = (1.0, 1.0)  # random zoom range
    brightness: float = 0.0  # factor in [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0  # RGB only
    hue: float = 0.0  # RGB only: hue shifted by a fraction of the colour circle in [-hue, hue], hue <= 0.5
    grayscale: float = 0.0  # probability (RGB only)
    cutout: float = 0.0  # side of one grey square erased per image, as a fraction of the image side

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AugmentConfig:
        check_known(cls, d, "augment")
        d = dict(d)
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d)

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(hflip=0.0, crop_padding=0)

    def to_spec(self) -> str:
        """The ``--augment`` string that :func:`parse_augment` reads back as this config."""
        off = asdict(AugmentConfig.none())
        items = [
            f"{k}={v[0]:g}:{v[1]:g}" if k == "scale" else f"{k}={v:g}"
            for k, v in asdict(self).items()
            if v != off[k]
        ]
        return ",".join(items) or "none"

    def validate(self) -> None:
        for name in ("hflip", "grayscale"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augment {name} must be a probability in [0, 1], got {v}")
        if self.crop_padding < 0:
            raise ValueError(f"augment crop_padding must be >= 0, got {self.crop_padding}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"augment scale must satisfy 0 < min <= max, got {self.scale}")
        for name in ("rotation", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"augment hue must be in [0, 0.5], got {self.hue}")
        if not 0 <= self.cutout <= 1:
            raise ValueError(
                f"augment cutout must be a fraction of the image side in [0, 1], got {self.cutout}"
            )


def gray3(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of an RGB batch ``(B, 3, H, W)``, repeated on 3 channels (as v2's
    ``rgb_to_grayscale``): the target of saturation jitter and random grayscale."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> HSV, each in [0, 1] (torchvision's formula, batched)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n of (R, G, B) is ``v - v s clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6 h) mod 6`` for n = 5, 3, 1."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h * 6, 6)
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each RGB image ``x[i]`` (in [0, 1]) by ``shift[i]`` turns.

    Why not ``torchvision.transforms.v2.functional.adjust_hue``: it takes one factor for the whole
    batch; this is the same HSV round trip with a factor per sample (tests compare the two).
    """
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0:1] + shift.to(x.dtype).view(-1, 1, 1, 1), 1.0)
    return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], 1))


def parse_augment(spec: str | None) -> AugmentConfig:
    """``"hflip=0.5,crop_padding=2,rotation=10,scale=0.9:1.1"``; ``"none"`` turns all off."""
    if spec is None or spec == "":
        return AugmentConfig()
    if spec == "none":
        return AugmentConfig.none()
    cfg = AugmentConfig.none()
    fields = set(AugmentConfig.__dataclass_fields__)
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(
                f"augment item {item!r}: expected key=value with key in {', '.join(sorted(fields))}"
            )
        if key == "scale":
            lo, _, hi = value.partition(":")
            setattr(cfg, key, (float(lo), float(hi or lo)))
        elif key == "crop_padding":
            setattr(cfg, key, int(value))
        else:
            setattr(cfg, key, float(value))
    cfg.validate()
    return cfg


def coerce_augment(v: Any) -> Any:
    """An :class:`AugmentConfig` from what a front-end sends: a spec string (or None for the
    default), or the JSON object a recipe was saved as."""
    if v is None or isinstance(v, str):
        return parse_augment(v)
    if isinstance(v, dict):
        AugmentConfig.from_json(v)  # names unknown fields
        return v  # pydantic builds the dataclass from it, checking each field's type
    return v


AugmentSpec = Annotated[AugmentConfig, BeforeValidator(coerce_augment)]


# The random resized crop of training under the "crop" resize policy: the share of the image's
# area a crop keeps, and its aspect ratio (width / height) range. torchvision's default area range
# (0.08, 1) is made for ImageNet photos of a few hundred pixels, where an object is often a
# detail of the scene; product pictures show one centred item at tens to a couple of hundred
# pixels, and a crop of 8% of that is a patch of fabric or sole, upscaled 3.5x per side from a
# few pixels: a label the crop no longer shows. From 35% a crop keeps at least ~59% of each side
# (at ratio 1), still recognisably the product, while varying scale and position as much as the
# item's framing in a real catalogue does. The ratio range is torchvision's.
RESIZED_CROP_SCALE = (0.35, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


class BatchAugment(nn.Module):
    """Augment a float batch ``(B, C, H, W)`` in [0, 1], each sample with its own random draw.

    ``resized_crop``: begin with a random resized crop (the "crop" resize policy's training view),
    when augmentation is on at all (``augment none`` turns it off with the rest: the rows are then
    used as decoded, centre-cropped).
    """

    def __init__(self, cfg: AugmentConfig, resized_crop: bool = False) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.resized_crop = resized_crop and cfg.to_spec() != "none"

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.cfg
        b, c, h, w = x.shape
        dev = x.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device="cpu").to(dev)

        if self.resized_crop:
            x = self._resized_crop(x, rand)
        if cfg.hflip > 0:
            flip = rand(b) < cfg.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if cfg.crop_padding > 0 and cfg.rotation == 0 and cfg.scale == (1.0, 1.0):
            x = self._crop(x, cfg.crop_padding, rand)
        elif cfg.crop_padding > 0 or cfg.rotation > 0 or cfg.scale != (1.0, 1.0):
            x = self._affine(x, rand)
        if cfg.brightness > 0:
            f = 1 + (rand(b) * 2 - 1) * cfg.brightness
            x = x * f[:, None, None, None]
        if cfg.contrast > 0:
            f = 1 + (rand(b) * 2 - 1) * cfg.contrast
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * f[:, None, None, None] + mean
        if c == 3 and (cfg.saturation > 0 or cfg.grayscale > 0 or cfg.hue > 0):
            gray = gray3(x)
            if cfg.saturation > 0:
                f = 1 + (rand(b) * 2 - 1) * cfg.saturation
                x = (x - gray) * f[:, None, None, None] + gray
            if cfg.hue > 0:
                x = adjust_hue(x.clamp(0, 1), (rand(b) * 2 - 1) * cfg.hue)
                gray = gray3(x)
            if cfg.grayscale > 0:
                g = rand(b) < cfg.grayscale
                x = torch.where(g[:, None, None, None], gray, x)
        if cfg.cutout > 0:
            x = self._cutout(x, cfg.cutout, rand)
        return x.clamp_(0, 1)

    @staticmethod
    def _cutout(x: torch.Tensor, frac: float, rand) -> torch.Tensor:
        """Cutout (DeVries & Taylor 2017, https://arxiv.org/abs/1708.04552) as FixMatch uses it: a
        square of side ``frac`` x the image side, centred anywhere in the image (so it may be
        clipped at the border), filled with mid-grey 0.5."""
        b, c, h, w = x.shape
        side_h, side_w = max(1, round(frac * h)), max(1, round(frac * w))
        cy = (rand(b) * h).long().clamp_(max=h - 1)
        cx = (rand(b) * w).long().clamp_(max=w - 1)
        ys = torch.arange(h, device=x.device)[None, :]
        xs = torch.arange(w, device=x.device)[None, :]
        top, left = cy[:, None] - side_h // 2, cx[:, None] - side_w // 2
        in_y = (ys >= top) & (ys < top + side_h)  # (B, H)
        in_x = (xs >= left) & (xs < left + side_w)  # (B, W)
        box = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
        return torch.where(box, torch.full_like(x, 0.5), x)

    @staticmethod
    def _crop(x: torch.Tensor, pad: int, rand) -> torch.Tensor:
        """Random crop with zero padding: an integer shift per sample, done by one gather."""
        b, c, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = (rand(b) * (2 * pad + 1)).long().clamp_(max=2 * pad)
        dx = (rand(b) * (2 * pad + 1)).long().clamp_(max=2 * pad)
        rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # (B, H)
        cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # (B, W)
        idx_r = rows[:, None, :, None].expand(b, c, h, w + 2 * pad)
        out = padded.gather(2, idx_r)  # (B, C, H, W + 2p)
        idx_c = cols[:, None, None, :].expand(b, c, h, w)
        return out.gather(3, idx_c)

    @staticmethod
    def _resized_crop(x: torch.Tensor, rand) -> torch.Tensor:
        """v2's RandomResizedCrop(size=(H, W), scale=RESIZED_CROP_SCALE, ratio=RESIZED_CROP_RATIO),
        per sample, on the decoded rows, in one ``affine_grid``/``grid_sample``.

        What it crops from: training keeps each row decoded once at the model's size, so under the
        "crop" policy a row holds its centre crop (the evaluation view), and the random crops are
        cut from that, not from the full photo: the parts of a long image outside its centre
        square are never seen, and a crop is upsampled from at most the model's resolution
        (bilinear, as v2 on a tensor; a crop is never larger than the row, so no antialiasing is
        missed). Where v2 redraws a box that does not fit (up to 10 times), this clamps its
        sides to the image, which bends the ratio of the rare extreme draws; the area is drawn
        uniformly and the log-ratio uniformly, as in v2.
        """
        b, c, h, w = x.shape
        lo, hi = RESIZED_CROP_SCALE
        area = lo + rand(b) * (hi - lo)
        r_lo, r_hi = math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])
        ratio = torch.exp(r_lo + rand(b) * (r_hi - r_lo))
        # the crop's sides as fractions of the image's: (cw W)(ch H) = area W H, cw W / (ch H) = ratio
        cw = torch.sqrt(area * ratio * h / w).clamp(max=1.0)
        ch = torch.sqrt(area / ratio * w / h).clamp(max=1.0)
        x0, y0 = rand(b) * (1 - cw), rand(b) * (1 - ch)
        zero = torch.zeros_like(cw)
        theta = torch.stack(
            [torch.stack([cw, zero, 2 * x0 + cw - 1], 1), torch.stack([zero, ch, 2 * y0 + ch - 1], 1)], 1
        ).to(x.dtype)  # (B, 2, 3): the output's [-1, 1] square onto the crop box
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _affine(self, x: torch.Tensor, rand) -> torch.Tensor:
        cfg = self.cfg
        b, c, h, w = x.shape
        angle = (rand(b) * 2 - 1) * math.radians(cfg.rotation)
        lo, hi = cfg.scale
        s = lo + rand(b) * (hi - lo)
        tx = (rand(b) * 2 - 1) * (2 * cfg.crop_padding / w)
        ty = (rand(b) * 2 - 1) * (2 * cfg.crop_padding / h)
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(
            x.dtype
        )  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
