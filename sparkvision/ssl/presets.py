"""Pretraining configuration as data, and the named presets (saved beside every encoder)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from sparkvision.fields import (
    CACHE,
    CHECKPOINT_EVERY,
    MAX_RESTARTS,
    RESHUFFLE,
    Cache,
    CheckpointEvery,
    Checkpoints,
    Epochs,
    ImageSize,
    JsonObject,
    LearningRate,
    MaxRestarts,
    Momentum,
    OptionalSplit,
    Recipe,
    Reshuffle,
    Threads,
    Warmup,
    WeightDecay,
    Workers,
)
from sparkvision.ssl.methods import Method
from sparkvision.ssl.views import ViewConfig, ViewSpec
from sparkvision.train.config import RECIPE, Optimizer, Schedule


@dataclass(config=RECIPE)
class PretrainConfig(Recipe):
    method: Method = Field(default="improved-simclr", description="improved-simclr | simsiam | simclr")
    model: str = Field(default="resnet18", description="Encoder backbone: any registered model.")
    model_kwargs: JsonObject = Field(default_factory=dict, description="Extra encoder arguments (JSON).")
    epochs: Epochs = Field(default=100, description="Epochs.")
    batch_size: int = Field(
        default=1024, ge=2, le=65_536, description="Global batch size, split over the ranks."
    )
    optimizer: Optimizer = Field(default="sgd", description="sgd | adamw")
    base_lr: LearningRate = Field(
        default=0.01,
        description=(
            "Base learning rate (the paper's 0.01); lr = base_lr x batch_size / 256 with lr_scaling linear."
        ),
    )
    lr_scaling: Literal["none", "linear"] = Field(
        default="none", description="none | linear (SimSiam's rule)"
    )
    momentum: Momentum = Field(default=0.9, description="SGD momentum.")
    weight_decay: WeightDecay = Field(default=1e-4, description="Weight decay.")
    schedule: Schedule = Field(default="cosine", description="cosine | onecycle | constant")
    warmup_epochs: Warmup = Field(default=0.0, description="Linear warm-up epochs.")
    proj_dim: int = Field(
        default=1024, ge=1, description="Projector (and improved predictor) output dimension."
    )
    proj_hidden: int = Field(default=1024, ge=1, description="Projector hidden width.")
    proj_layers: int = Field(default=3, ge=1, description="Projector layers.")
    temperature: float = Field(default=0.5, gt=0, description="NT-Xent temperature (simclr only).")
    views: ViewSpec = Field(
        default_factory=ViewConfig, description="The two views' augmentation (ViewConfig fields)."
    )
    pool_split: str = Field(
        default="unlabeled", description="Split pretrained on (labels, if any, are ignored)."
    )
    monitor_split: OptionalSplit = Field(
        default="val", description=("Labelled split the kNN monitor scores ('none' to skip).")
    )
    monitor_bank_split: str = Field(default="train", description="Labelled split the kNN monitor votes with.")
    monitor_bank_rows: int = Field(
        default=5000, ge=1, description="kNN monitor: at most this many bank rows."
    )
    monitor_query_rows: int = Field(
        default=2000, ge=1, description="kNN monitor: at most this many query rows."
    )
    knn_k: int = Field(default=20, ge=1, description="kNN monitor: neighbours voting.")
    collapse_ratio: float = Field(
        default=0.2,
        ge=0,
        description=("Warn when std x sqrt(d) of the normalised outputs falls below this (collapse)."),
    )
    seed: int = Field(default=0, description="Random seed.")
    workers: Workers = Field(default=1, description="DDP ranks (Spark barrier tasks).")
    threads_per_rank: Threads = Field(default=None, description="Torch threads per rank.")
    image_size: ImageSize = Field(
        default=None, description="Resize to SIZE x SIZE (default: the table's size)."
    )
    channels: Literal[1, 3] | None = Field(
        default=None, description="1 or 3 input channels (default: from the table)."
    )
    resume: bool = Field(
        default=False, description="Continue from the last checkpoint in the output directory."
    )
    keep_checkpoints: Checkpoints = Field(default=2, description="Checkpoints kept.")
    max_restarts: MaxRestarts = MAX_RESTARTS
    cache: Cache = CACHE
    checkpoint_every: CheckpointEvery = CHECKPOINT_EVERY
    reshuffle: Reshuffle = RESHUFFLE
    bf16: bool = Field(default=True, description="bfloat16 autocast (GPU only).")
    channels_last: bool = Field(default=False, description="channels_last memory format.")

    @property
    def lr(self) -> float:
        return self.base_lr * (self.batch_size / 256 if self.lr_scaling == "linear" else 1.0)

    def validate(self) -> None:
        """The rules between fields (each field's own bounds are checked on construction)."""
        if self.batch_size % self.workers or self.batch_size < 2 * self.workers:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by workers {self.workers} "
                "with at least 2 images per rank (BatchNorm)"
            )
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be below epochs ({self.epochs}), got {self.warmup_epochs}")
        self.views.validate()


# Views for small grayscale images (Fashion-MNIST): milder crops than ImageNet's 0.08-1, since a
# 28x28 crop of 20% of the area leaves almost nothing of the garment.
SMALL_GRAY_VIEWS = ViewConfig(
    crop_scale=(0.3, 1.0), brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, grayscale=0.0
)

# Views of catalogue items as `features` will show them (sparkvision.ssl.paste): most cut to the
# object's box with a random margin (the detector's box is never exact), half on synthetic clutter,
# so that an item's crop from a busy scene and its clean picture become one instance.
ITEM_VIEWS = replace(SMALL_GRAY_VIEWS, object_crop=0.9, object_margin=(0.0, 0.25), clutter=0.5)

PRESETS: dict[str, PretrainConfig] = {
    # The paper's setting: ResNet-18, SGD, base LR 0.01 cosine, momentum 0.9, batch 1024, 100 epochs.
    "paper": PretrainConfig(),
    # A small backbone sized to finish within ~60 minutes on 2 free CPU cores for Fashion-MNIST
    # (60k images at ~500 images/s: ~2 minutes an epoch).
    "cpu-small": PretrainConfig(
        model="cnn",
        epochs=25,
        batch_size=256,
        base_lr=0.05,
        weight_decay=5e-4,
        warmup_epochs=1,
        proj_dim=512,
        proj_hidden=1024,
        proj_layers=2,
        views=SMALL_GRAY_VIEWS,
    ),
    # The same, long: resume it from its checkpoints across sittings (--resume).
    "cpu-long": PretrainConfig(
        model="cnn",
        epochs=100,
        batch_size=256,
        base_lr=0.05,
        weight_decay=5e-4,
        warmup_epochs=2,
        proj_dim=1024,
        proj_hidden=1024,
        proj_layers=3,
        views=SMALL_GRAY_VIEWS,
    ),
}
# An instance-level embedder for detect -> crop -> embed (`features`): cpu-small's schedule on
# ITEM_VIEWS, with SimCLR's contrastive loss at temperature 0.1, 5 epochs. Same-item retrieval
# needs features that tell items apart, which a classifier's do not; with 3 epochs each, the
# non-contrastive improved-simclr (no negatives) put the item first for 21% of scene crops
# against a box-framed catalogue, SimCLR at t=0.1 for 83% (README, detect section).
PRESETS["cpu-items"] = replace(
    PRESETS["cpu-small"], method="simclr", temperature=0.1, epochs=5, proj_dim=128, views=ITEM_VIEWS
)


# The fields some preset sets (plus the method): for these, None means "the preset's value".
PRESET_FIELDS: tuple[str, ...] = tuple(
    sorted(
        {
            name
            for cfg in PRESETS.values()
            for name in PretrainConfig.__dataclass_fields__
            if getattr(cfg, name) != getattr(PretrainConfig(), name)
        }
        | {"method"}
    )
)


def resolve(preset: str = "paper", **overrides: Any) -> PretrainConfig:
    """A preset with fields overridden (``None`` for a :data:`PRESET_FIELDS` field leaves the preset's)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    known = set(PretrainConfig.__dataclass_fields__)
    bad = [k for k in overrides if k not in known]
    if bad:
        raise ValueError(f"unknown pretraining option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    given = {k: v for k, v in overrides.items() if v is not None or k not in PRESET_FIELDS}
    if "warmup_epochs" not in given and "epochs" in given and base.warmup_epochs >= given["epochs"]:
        # A shorter run than the preset's keeps the preset's share of warm-up, so a quick
        # `--epochs 1` try works without the user choosing a warm-up.
        given["warmup_epochs"] = base.warmup_epochs * given["epochs"] / base.epochs
    cfg = replace(base, **given)
    cfg.views = replace(cfg.views)
    cfg.model_kwargs = dict(cfg.model_kwargs)
    cfg.validate()
    return cfg
