"""Pretraining configuration as data, and the named presets (saved beside every encoder)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sparkvision.ssl.methods import METHODS
from sparkvision.ssl.views import ViewConfig


@dataclass
class PretrainConfig:
    method: str = "improved-simclr"  # improved-simclr | simsiam | simclr
    model: str = "resnet18"  # encoder: any registered backbone
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 100
    batch_size: int = 1024  # global, split over the ranks
    optimizer: str = "sgd"
    base_lr: float = 0.01  # the paper's; lr = base_lr * batch_size / 256 when lr_scaling == "linear"
    lr_scaling: str = "none"  # none | linear (SimSiam's rule)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    proj_dim: int = 1024  # projector (and improved predictor) output; 1024 in the paper
    proj_hidden: int = 1024
    proj_layers: int = 3
    temperature: float = 0.5  # simclr only
    views: ViewConfig = field(default_factory=ViewConfig)
    pool_split: str = "unlabeled"  # rows pretrained on (labels, if any, are ignored)
    monitor_split: str | None = "val"  # labelled queries of the kNN monitor; None to skip
    monitor_bank_split: str = "train"  # labelled bank of the kNN monitor
    monitor_bank_rows: int = 5000  # at most this many bank / query rows in all
    monitor_query_rows: int = 2000
    knn_k: int = 20
    collapse_ratio: float = 0.2  # warn when std * sqrt(d) of normalised outputs falls below this
    seed: int = 0
    workers: int = 1
    threads_per_rank: int | None = None
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    resume: bool = False
    keep_checkpoints: int = 2
    bf16: bool = True  # autocast on GPU only
    channels_last: bool = False

    @property
    def lr(self) -> float:
        return self.base_lr * (self.batch_size / 256 if self.lr_scaling == "linear" else 1.0)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.workers < 1 or self.batch_size % self.workers or self.batch_size < 2 * self.workers:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by workers {self.workers} "
                             "with at least 2 images per rank (BatchNorm)")
        if self.lr_scaling not in ("none", "linear"):
            raise ValueError(f"lr_scaling must be none or linear, got {self.lr_scaling!r}")
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        self.views.validate()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["views"] = self.views.to_json()
        if self.image_size is not None:
            d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PretrainConfig:
        d = dict(d)
        d["views"] = ViewConfig.from_json(d.get("views", {}))
        if d.get("image_size") is not None:
            d["image_size"] = tuple(d["image_size"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# Views for small grayscale images (Fashion-MNIST): milder crops than ImageNet's 0.08-1, since a
# 28x28 crop of 20% of the area leaves almost nothing of the garment.
SMALL_GRAY_VIEWS = ViewConfig(crop_scale=(0.3, 1.0), brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0,
                              grayscale=0.0)

PRESETS: dict[str, PretrainConfig] = {
    # The paper's setting: ResNet-18, SGD, base LR 0.01 cosine, momentum 0.9, batch 1024, 100 epochs.
    "paper": PretrainConfig(),
    # A small backbone sized to finish within ~60 minutes on 2 free CPU cores for Fashion-MNIST
    # (60k images at ~500 images/s: ~2 minutes an epoch).
    "cpu-small": PretrainConfig(
        model="cnn", epochs=25, batch_size=256, base_lr=0.05, weight_decay=5e-4, warmup_epochs=1,
        proj_dim=512, proj_hidden=1024, proj_layers=2, views=SMALL_GRAY_VIEWS,
    ),
    # The same, long: resume it from its checkpoints across sittings (--resume).
    "cpu-long": PretrainConfig(
        model="cnn", epochs=100, batch_size=256, base_lr=0.05, weight_decay=5e-4, warmup_epochs=2,
        proj_dim=1024, proj_hidden=1024, proj_layers=3, views=SMALL_GRAY_VIEWS,
    ),
}


def resolve(preset: str = "paper", **overrides: Any) -> PretrainConfig:
    """A preset with fields overridden (``None`` values leave the preset's field)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    known = set(PretrainConfig.__dataclass_fields__)
    bad = [k for k in overrides if k not in known]
    if bad:
        raise ValueError(f"unknown pretraining option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    cfg.views = replace(cfg.views)
    cfg.model_kwargs = dict(cfg.model_kwargs)
    cfg.validate()
    return cfg
