"""Supervised data-parallel training on Spark: the driver side (:func:`train`) and the rank's
method (:class:`SupervisedRank`, on the skeleton of :mod:`sparkvision.train.rank`).

Each rank decodes its shard of the image table once, then runs epochs over in-memory uint8 tensors
exactly like a plain PyTorch loop; DDP all-reduces gradients between ranks. Rank 0 writes
checkpoints, TensorBoard events, ``metrics.jsonl``, its live progress and finally the weights
through the driver's output sink (``spark.sink``), so ``OUT`` may be a local path or any URI Spark
writes; the driver then completes the model directory around the weights.
:class:`ClassifierRank` is what fine-tuning (``ssl.finetune``) shares with it.
"""

from __future__ import annotations

from typing import Any

import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from safetensors.torch import load as st_load

from sparkvision.data.images import PixelDtype
from sparkvision.data.table import read_meta, read_table
from sparkvision.errors import ParamError
from sparkvision.models import create_model, model_kwargs_for
from sparkvision.models.dbn import DBN
from sparkvision.models.modeldir import ModelSpec
from sparkvision.spark import distributed as D
from sparkvision.spark.progress import Timer
from sparkvision.train.augment import BatchAugment
from sparkvision.train.config import TrainConfig
from sparkvision.train.data import Shard, split_mask
from sparkvision.train.driver import (
    infer_image_spec,
    launch,
    prepare_out,
    rank_payload,
    run_metrics,
    save_trained,
)
from sparkvision.train.layerwise import pretrain_rank
from sparkvision.train.rank import RankTraining, check_rows
from sparkvision.train.transfer import backbone_scale, input_stats, start_weights, transfer_groups
from sparkvision.transforms.preprocess import normalize, to_unit


def to_input(
    x_uint8: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    device,
    channels_last: bool,
    augment: BatchAugment | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> [0, 1] -> augmented -> normalised, with the shared input transform
    (:mod:`sparkvision.transforms.preprocess`) so inference sees the numbers training saw."""
    x = to_unit(x_uint8.to(device, non_blocking=True))
    if augment is not None:
        x = augment(x, generator)
    return normalize(x, mean, std, channels_last)


@torch.no_grad()
def evaluate_shard(
    model: torch.nn.Module, shard: Shard, mean, std, device, channels_last: bool, batch_size: int = 512
) -> tuple[int, int, float]:
    """(correct, total, loss_sum) on one rank's shard."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, len(shard), batch_size):
        x = to_input(shard.images[i : i + batch_size], mean, std, device, channels_last)
        y = shard.labels[i : i + batch_size].to(device)
        logits = model(x).float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    return correct, total, loss_sum


def check_labels(rows: Shard, num_classes: int) -> None:
    """A label beyond the table's classes would fail deep inside the loss; name it instead."""
    if len(rows) and int(rows.labels.max()) >= num_classes:
        raise ValueError(f"label {int(rows.labels.max())} is out of range for {num_classes} classes")


class ClassifierRank(RankTraining):
    """A rank training a classifier: augmented labelled rows, cross-entropy, accuracy on ``evals``
    (the second of the global ``counts``) after the epochs :meth:`eval_due` names."""

    evals: Shard

    def prepare(self) -> None:
        # Not on a float table (no augmentation there): BatchAugment clamps to [0, 1], feature values are not.
        # Under the "crop" policy augmenting starts with a random resized crop of the centre crop.
        crop = self.resize == "crop"
        self.augment = BatchAugment(self.cfg.augment, crop) if self.pixel_dtype == "uint8" else None
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)

    def step_loss(self, b: torch.Tensor) -> torch.Tensor:
        x = to_input(
            self.rows.images[b], self.mean, self.std, self.device, self.channels_last, self.augment, self.gen
        )
        return self.loss_fn(self.net(x), self.rows.labels[b].to(self.device, non_blocking=True))

    def eval_due(self, epoch: int) -> bool:
        return True

    def end_epoch(self, epoch: int) -> tuple[dict[str, Any], dict[str, float | None]]:
        ev = torch.zeros(3, dtype=torch.float64)
        if self.counts[1] > 0 and self.eval_due(epoch):
            c, n, ls = evaluate_shard(
                self.module, self.evals, self.mean, self.std, self.device, self.channels_last
            )
            ev = D.all_reduce_sum(torch.tensor([c, n, ls], dtype=torch.float64))
        acc = round(float(ev[0] / ev[1]), 5) if ev[1] > 0 else None
        loss = round(float(ev[2] / ev[1]), 5) if ev[1] > 0 else None
        return {"test_acc": acc, "test_loss": loss}, {"accuracy/test": acc, "loss/test": loss}

    def result(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        info, blobs = super().result()
        return {**info, "train_rows": int(self.counts[0]), "eval_rows": int(self.counts[1])}, blobs


class SupervisedRank(ClassifierRank):
    """Supervised training: ``cfg.model`` from random weights on the labelled ``train_split`` rows."""

    config_class = TrainConfig

    def __init__(self, ctx: D.RankContext, payload: dict[str, Any]) -> None:
        super().__init__(ctx, payload)
        self.channels_last, self.bf16 = self.cfg.channels_last, self.cfg.bf16

    def select(self, shard: Shard, splits: list[str]) -> tuple[Shard, torch.Tensor]:
        cfg = self.cfg
        labelled = shard.labels >= 0
        train = shard.subset(split_mask(splits, cfg.train_split) & labelled)
        self.evals = shard.subset(split_mask(splits, cfg.eval_split) & labelled)
        check_labels(train, self.num_classes)
        counts = D.all_reduce_sum(torch.tensor([len(train), len(self.evals)], dtype=torch.float64))
        check_rows(
            len(train),
            counts,
            self.ctx,
            f"no labelled rows in split {cfg.train_split!r} to train on",
            "a rank got no training rows: {rows} rows is too few for {workers} workers",
        )
        return train, counts

    def build(self) -> tuple[torch.nn.Module, list[dict]]:
        cfg = self.cfg
        model = create_model(cfg.model, self.num_classes, self.channels, **self.payload["model_kwargs"])
        start = self.payload.get("start_weights")
        if start:  # the tensors of --init-weights that fit (checked on the driver: start_weights)
            model.load_state_dict(st_load(start), strict=False)
        model.freeze(cfg.freeze)
        scale = backbone_scale(cfg.backbone_lr_scale, cfg.init_weights)
        return model, transfer_groups(model, cfg.weight_decay, scale)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        fixed = input_stats(self.cfg.normalize, self.cfg.init_weights, self.channels)
        return fixed if fixed is not None else super().stats()

    def pretrain(self) -> list[dict[str, Any]]:
        return pretrain_rank(self, self.evals) if isinstance(self.module, DBN) else []


def transfer_start(
    cfg: TrainConfig, num_classes: int, channels: int, model_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Payload extras for ``--init-weights`` / ``--freeze``, checked on the driver before any task
    starts: the tensors of the file that fit (and what did not), and a ``--freeze`` the model has
    stages for. Empty when neither is given."""
    if not cfg.init_weights and cfg.freeze == "none":
        return {}
    probe = create_model(cfg.model, num_classes, channels, **model_kwargs)
    try:
        probe.freeze(cfg.freeze)
    except ValueError as e:
        raise ParamError("freeze", str(e)) from None
    if not cfg.init_weights:
        return {}
    blob, summary = start_weights(probe, cfg.init_weights)
    return {"start_weights": blob, "transfer": summary}


def train(spark: SparkSession, table: str, out: str, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``table`` and write the model directory ``out``."""
    cfg = cfg or TrainConfig()
    cfg.validate()
    meta = read_meta(spark, table)
    if len(meta.class_names) < 2:
        raise ValueError(f"table {table} has {len(meta.class_names)} classes; training needs at least 2")
    splits = [cfg.train_split] + ([cfg.eval_split] if cfg.eval_split else [])
    df = read_table(spark, table).where(F.col("split").isin(splits))
    return train_df(spark, df, meta.class_names, out, cfg, pixel_dtype=meta.pixel_dtype)


def train_df(
    spark: SparkSession,
    df: DataFrame,
    class_names: list[str],
    out: str,
    cfg: TrainConfig,
    repartition: bool = True,
    pixel_dtype: PixelDtype = "uint8",
) -> dict[str, Any]:
    """Train on an image-table DataFrame (columns image, label, split, height, width, channels);
    ``pixel_dtype`` is its table's (``TableMeta.pixel_dtype``: "float32" rows decode as floats)."""
    cfg.validate()
    if pixel_dtype == "float32" and cfg.augment.to_spec() != "none":
        raise ParamError(
            "augment", "a float table's rows are feature vectors, which flips and crops scramble: use 'none'"
        )
    timer = Timer()
    out, ckpt_dir = prepare_out(out, cfg.resume)
    channels, size = infer_image_spec(df, cfg.channels, cfg.image_size)
    model_kwargs = model_kwargs_for(cfg.model, cfg.model_kwargs, size[0])
    transfer = transfer_start(cfg, len(class_names), channels, model_kwargs)
    payload = rank_payload(
        cfg,
        out,
        ckpt_dir,
        channels,
        size,
        len(class_names),
        model_kwargs=model_kwargs,
        pixel_dtype=pixel_dtype,
        resize=cfg.resize_policy(),
        **transfer,
    )
    info, blobs = launch(
        spark,
        df,
        cfg,
        SupervisedRank.main,
        payload,
        "train_config.json",
        {**cfg.to_json(), "channels": channels, "image_size": list(size)},
        repartition=repartition,
    )
    history = info["history"]
    last = history[-1] if history else {}
    metrics = {
        "test_acc": last.get("test_acc"),
        "train_loss": last.get("train_loss"),
        "history": history,
        "train_rows": info["train_rows"],
        "eval_rows": info["eval_rows"],
        "pretrain": info.get("pretrain", []),  # layer-wise pretraining this job ran (none on resume)
        **run_metrics(info, timer, cfg.workers),
        **({"init_weights": transfer["transfer"]} if transfer else {}),
    }
    save_trained(
        spark,
        out,
        ModelSpec(cfg.model, len(class_names), channels, model_kwargs),
        blobs["weights"],
        class_names,
        size,
        info,
        metrics,
        resize=cfg.resize_policy(),
    )
    return {"model_dir": out, **{k: v for k, v in metrics.items() if k != "history"}, "history": history}
