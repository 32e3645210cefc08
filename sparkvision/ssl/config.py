"""Fine-tuning, linear-evaluation and distillation configuration as data (saved beside every model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sparkvision.train.augment import AugmentConfig
from sparkvision.train.config import TrainConfig


def strong_augment_default() -> AugmentConfig:
    """FixMatch's strong view (the paper: RandAugment + cutout), sized for small images: flip, a
    4-pixel shift, brightness/contrast jitter and a half-side cutout. No rotation or zoom: on
    Fashion-MNIST they cost the supervised recipe 1.5 points on a validation split."""
    return AugmentConfig(hflip=0.5, crop_padding=4, brightness=0.3, contrast=0.3, cutout=0.5)


@dataclass
class FinetuneConfig:
    label_fraction: float = 1.0  # stratified share of the labelled training rows (0.01, 0.05, 0.1, 1.0)
    sample_seed: int = 0
    linear: bool = False  # linear evaluation: frozen encoder, train the head only
    model: str = "cnn"  # scratch only (a pretrained encoder brings its own)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 40
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 2e-3  # the head's peak LR
    encoder_lr_scale: float = 0.1  # fine-tuning: encoder LR = lr * this (1.0 from scratch)
    projector_layers: int = 0  # SimCLRv2: keep this many pretraining projector layers under the head
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # flip + 2-pixel shift
    seed: int = 0
    workers: int = 1
    threads_per_rank: int | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    unlabeled_split: str = "unlabeled"  # distillation: the pool the teacher labels (plus the labelled sample)
    distill_temperature: float = 1.0  # distillation: tau of the teacher's and the student's softmax
    consistency_weight: float = 0.0  # FixMatch: weight of the unlabelled loss (lambda_u; 0 = off, paper 1;
    # use label_smoothing=0 with it: smoothing caps the softmax below the confidence threshold)
    confidence: float = 0.95  # FixMatch: pseudo-label threshold tau
    unlabeled_ratio: int = 7  # FixMatch: unlabelled images per labelled one in a step (mu)
    strong_augment: AugmentConfig = field(default_factory=strong_augment_default)  # FixMatch's strong view
    resume: bool = False
    keep_checkpoints: int = 1

    def validate(self) -> None:
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.encoder_lr_scale < 0:
            raise ValueError(f"encoder_lr_scale must be >= 0, got {self.encoder_lr_scale}")
        if self.projector_layers < 0:
            raise ValueError(f"projector_layers must be >= 0, got {self.projector_layers}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {self.consistency_weight}")
        if not 0 <= self.confidence < 1:
            raise ValueError(f"confidence must be in [0, 1), got {self.confidence}")
        if self.unlabeled_ratio < 1:
            raise ValueError(f"unlabeled_ratio must be >= 1, got {self.unlabeled_ratio}")
        if self.consistency_weight > 0 and self.linear:
            raise ValueError("consistency_weight trains the whole model; it cannot be combined with linear evaluation")
        self.strong_augment.validate()
        TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr,
                    schedule=self.schedule, warmup_epochs=self.warmup_epochs, label_smoothing=self.label_smoothing,
                    workers=self.workers, augment=self.augment).validate()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_json()
        d["strong_augment"] = self.strong_augment.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FinetuneConfig:
        d = dict(d)
        d["augment"] = AugmentConfig.from_json(d.get("augment", {}))
        if "strong_augment" in d:
            d["strong_augment"] = AugmentConfig.from_json(d["strong_augment"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
