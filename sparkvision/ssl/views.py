"""Two random views of every image in a batch: the augmentation of Siamese pretraining.

The recipe (horizontal flip, colour jitter, grayscale, random resized crop) is the paper's, and
every part of it is a field of :class:`ViewConfig`. Like the supervised ``BatchAugment`` it draws
the random parameters *per sample* and applies them to the whole batch in a few tensor ops
(torchvision.transforms.v2 called on a batch would draw one set for all images): the crop, zoom
and flip are one ``affine_grid``/``grid_sample``, the photometric ops per-sample broadcasts.
The operations are those of v2's RandomResizedCrop(scale, ratio), RandomHorizontalFlip,
RandomApply(ColorJitter(b, c, s, h), p) and RandomGrayscale(p).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator
from torch import nn

from sparkvision.fields import check_known, json_object
from sparkvision.train.augment import adjust_hue, gray3

if TYPE_CHECKING:  # imported when a view pastes: the CLI's start loads no torchvision
    from sparkvision.ssl.paste import ClutterBank


@dataclass
class ViewConfig:
    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction of RandomResizedCrop (SimSiam's 0.2)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range
    hflip: float = 0.5
    jitter_p: float = 0.8  # probability of applying colour jitter (SimCLR)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4  # RGB only
    hue: float = 0.1  # RGB only: shift in [-hue, hue] turns of the colour circle (SimCLR / SimSiam's 0.1)
    grayscale: float = 0.2  # probability (RGB only; a grayscale image is already gray)
    # Views as detect -> crop shows an item (sparkvision.ssl.paste): off by default.
    object_crop: float = 0.0  # probability that the crop window is the object's box, grown by a margin
    object_margin: tuple[float, float] = (0.0, 0.3)  # per-side margin range, shares of the box's side
    clutter: float = 0.0  # probability that the background is replaced by synthetic clutter

    def validate(self) -> None:
        for name in ("hflip", "jitter_p", "grayscale", "object_crop", "clutter"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"views {name} must be a probability in [0, 1], got {v}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"views crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"views crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"views {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.object_margin[0] <= self.object_margin[1] <= 1:
            raise ValueError(
                f"views object_margin must satisfy 0 <= min <= max <= 1, got {self.object_margin}"
            )
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"views hue must be in [0, 0.5], got {self.hue}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("crop_scale", "crop_ratio", "object_margin"):
            d[k] = list(getattr(self, k))
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ViewConfig:
        check_known(cls, d, "views")
        d = dict(d)
        for k in ("crop_scale", "crop_ratio", "object_margin"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _views(v: Any) -> Any:
    if isinstance(v, str):  # the command line's --views '{"clutter": 0.5}'
        v = json_object(v)
    if isinstance(v, dict):
        ViewConfig.from_json(v)  # names unknown fields
    return v  # pydantic builds the dataclass from a dict, checking each field's type


ViewSpec = Annotated[ViewConfig, BeforeValidator(_views)]
"""A :class:`ViewConfig`, or the JSON object a recipe was saved as."""


class RandomView(nn.Module):
    """One random view of a float batch ``(B, C, H, W)`` in [0, 1]; each sample its own draw."""

    def __init__(self, cfg: ViewConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ViewConfig()
        self.cfg.validate()
        self.bank: ClutterBank | None = None  # made on first use, from the view's generator

    def masks(self, x: torch.Tensor) -> torch.Tensor | None:
        """The objects' masks ``(B, 1, H, W)`` when the recipe crops to or pastes them, else None:
        they depend on the images only, so both views of a batch share one computation."""
        if self.cfg.object_crop > 0 or self.cfg.clutter > 0:
            from sparkvision.ssl import paste

            return paste.object_masks(x)
        return None

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg = self.cfg
        b, c, h, w = x.shape
        dev = x.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator).to(dev)

        # Random resized crop (+ flip) as one affine map from output to input coordinates.
        lo, hi = cfg.crop_scale
        area = lo + rand(b) * (hi - lo)
        log_r = torch.log(torch.tensor(cfg.crop_ratio))
        ratio = torch.exp(log_r[0] + rand(b) * (log_r[1] - log_r[0]))
        sw = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        sh = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (rand(b) * 2 - 1) * (1 - sw)  # crop centre in [-1, 1], crop stays inside the image
        cy = (rand(b) * 2 - 1) * (1 - sh)
        if mask is None:
            mask = self.masks(x)
        if mask is not None:
            from sparkvision.ssl import paste
        if mask is not None and cfg.object_crop > 0:
            ocx, ocy, osw, osh = paste.box_windows(
                paste.mask_boxes(mask), (h, w), cfg.object_margin, rand(b, 4)
            )
            on_box = rand(b) < cfg.object_crop
            cx, cy = torch.where(on_box, ocx, cx), torch.where(on_box, ocy, cy)
            sw, sh = torch.where(on_box, osw, sw), torch.where(on_box, osh, sh)
        flip = torch.where(rand(b) < cfg.hflip, -1.0, 1.0)
        zero = torch.zeros_like(sw)
        theta = torch.stack([torch.stack([sw * flip, zero, cx], 1), torch.stack([zero, sh, cy], 1)], 1).to(
            x.dtype
        )  # (B, 2, 3)
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if mask is not None and cfg.clutter > 0:
            # Outside the object (the image's background, and past its edges) the scene shows.
            inside = F.grid_sample(
                mask.to(x.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            if self.bank is None:
                self.bank = paste.ClutterBank(int(torch.randint(2**31 - 1, (1,), generator=generator)))
            ground = self.bank.windows(b, c, (h, w), rand, dev).to(x.dtype)
            noise = torch.randn(x.shape, generator=generator).to(dev, x.dtype) * rand(b)[:, None, None, None]
            pasted = (x * inside + ground * (1 - inside) + noise * paste.SENSOR_NOISE).clamp(0, 1)
            x = torch.where((rand(b) < cfg.clutter)[:, None, None, None], pasted, x)

        # Colour jitter, applied to a sample with probability jitter_p (factor 1 otherwise).
        on = (rand(b) < cfg.jitter_p).to(x.dtype)[:, None, None, None]
        if cfg.brightness > 0:
            f = 1 + (rand(b) * 2 - 1)[:, None, None, None] * cfg.brightness * on
            x = (x * f).clamp(0, 1)
        if cfg.contrast > 0:
            f = 1 + (rand(b) * 2 - 1)[:, None, None, None] * cfg.contrast * on
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * f + mean).clamp(0, 1)
        if c == 3:
            gray = gray3(x)
            if cfg.saturation > 0:
                f = 1 + (rand(b) * 2 - 1)[:, None, None, None] * cfg.saturation * on
                x = ((x - gray) * f + gray).clamp(0, 1)
                gray = gray3(x)
            if cfg.hue > 0:
                x = adjust_hue(x, (rand(b) * 2 - 1) * cfg.hue * on[:, 0, 0, 0])
                gray = gray3(x)
            if cfg.grayscale > 0:
                g = rand(b) < cfg.grayscale
                x = torch.where(g[:, None, None, None], gray, x)
        return x


class TwoViews(nn.Module):
    """``x -> (view1, view2)``: two independent draws of the same recipe."""

    def __init__(self, cfg: ViewConfig | None = None) -> None:
        super().__init__()
        self.view = RandomView(cfg)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.view.masks(x)
        return self.view(x, generator, mask), self.view(x, generator, mask)
