"""Training a detector data-parallel on Spark: the rank's method (:class:`DetectorRank`, on the
skeleton every method shares, :mod:`sparkvision.train.rank`) and the driver side
(:func:`train_detector`).

Everything but the method's own part is the engine's: the barrier job with relaunch on lost
executors, the shard cache, checkpoints and resume, progress, TensorBoard and ``metrics.jsonl``,
the weights back through the driver's sink. The method asks the engine for the detection table's
``boxes`` (with each row's stored ``width``/``height``, to scale them to the detector's input),
trains torchvision's detection losses, and scores mAP@0.5 and mAP@[.5:.95] on the eval split
after every epoch with ``torchmetrics``' COCO evaluation, over every rank's predictions.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from safetensors.torch import load as st_load
from torchmetrics.detection import MeanAveragePrecision

from sparkvision.data.detection import read_detection_table
from sparkvision.data.table import read_meta
from sparkvision.detect.config import DetectorConfig
from sparkvision.detect.targets import BoxRows, Target, box_rows, hflip
from sparkvision.models.detector import AGNOSTIC_CLASS, DetectorSpec, detector_json, start_weights
from sparkvision.models.modeldir import WEIGHTS, Preprocess
from sparkvision.spark import distributed as D
from sparkvision.spark.filestore import driver_store, write_bytes
from sparkvision.spark.progress import Timer
from sparkvision.train.data import Shard, split_mask
from sparkvision.train.driver import RANK_COLUMNS, launch, prepare_out, rank_payload, run_metrics
from sparkvision.train.optim import param_groups
from sparkvision.train.rank import RankTraining, check_rows
from sparkvision.transforms.preprocess import normalize, to_unit

BOX_COLUMNS = ("width", "height", "boxes")
EVAL_BATCH = 32


def detection_inputs(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> the normalised float input, with the shared transform (what
    ``detect`` applies too, from ``preprocess.json``)."""
    return normalize(to_unit(x_uint8), mean, std, channels_last=False)


class DetectorRank(RankTraining):
    """A rank training ``cfg.model`` on the rows of ``train_split`` (with or without boxes: a row
    without any teaches the background), scoring mAP on ``eval_split``."""

    config_class = DetectorConfig
    extra_columns = BOX_COLUMNS
    evals: Shard

    def __init__(self, ctx: D.RankContext, payload: dict[str, Any]) -> None:
        super().__init__(ctx, payload)
        self.spec = DetectorSpec.from_json(payload["spec"])

    def boxes_of(self, shard: Shard) -> BoxRows:
        e = shard.extra
        return box_rows(e["boxes"], e["width"], e["height"], self.size)

    def select(self, shard: Shard, splits: list[str]) -> tuple[Shard, torch.Tensor]:
        cfg = self.cfg
        train = shard.subset(split_mask(splits, cfg.train_split))
        self.evals = shard.subset(split_mask(splits, cfg.eval_split))
        self.train_boxes, self.eval_boxes = self.boxes_of(train), self.boxes_of(self.evals)
        counts = D.all_reduce_sum(torch.tensor([len(train), len(self.evals)], dtype=torch.float64))
        check_rows(
            len(train),
            counts,
            self.ctx,
            f"no rows in split {cfg.train_split!r} to train on",
            "a rank got no training rows: {rows} rows is too few for {workers} workers",
        )
        return train, counts

    def build(self) -> tuple[torch.nn.Module, list[dict]]:
        model = self.spec.build()
        start = self.payload.get("start_weights")
        if start:
            model.load_state_dict(st_load(start), strict=False)  # only the tensors that fit (driver-checked)
        return model, param_groups(model, self.cfg.weight_decay)

    def step_loss(self, b: torch.Tensor) -> torch.Tensor:
        x = detection_inputs(self.rows.images[b], self.mean.cpu(), self.std.cpu())
        targets = self.train_boxes.targets(b, self.spec.class_agnostic)
        flip = torch.rand(len(b), generator=self.gen) < self.cfg.hflip
        x, targets = hflip(x, targets, flip)
        losses = self.net(list(x.to(self.device)), [to_device(t, self.device) for t in targets])
        return sum(losses.values())  # type: ignore[return-value]

    def end_epoch(self, epoch: int) -> tuple[dict[str, Any], dict[str, float | None]]:
        local = self.predict_evals() if self.counts[1] > 0 else ([], [])
        if D.world_size() > 1:
            found: list[Any] | None = [None] * D.world_size() if D.is_main() else None
            torch.distributed.gather_object(local, found, dst=0)
            parts = found or []
        else:
            parts = [local]
        if not self.ctx.is_main or self.counts[1] == 0:
            return {"map_50": None, "map": None}, {}
        # Scored on rank 0 over what it gathered: no sync of its own with the other ranks.
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", sync_on_compute=False)
        for preds, targets in parts:
            if preds:
                metric.update(preds, targets)
        result = metric.compute()
        m50, m = round(float(result["map_50"]), 5), round(float(result["map"]), 5)
        return {"map_50": m50, "map": m}, {"map/0.5": m50, "map/0.5-0.95": m}

    @torch.no_grad()
    def predict_evals(self) -> tuple[list[Target], list[Target]]:
        """This rank's eval rows: the detector's outputs and the true boxes, on the CPU."""
        self.module.eval()
        preds: list[Target] = []
        targets: list[Target] = []
        for i in range(0, len(self.evals), EVAL_BATCH):
            rows = list(range(i, min(i + EVAL_BATCH, len(self.evals))))
            x = detection_inputs(self.evals.images[i : i + EVAL_BATCH], self.mean.cpu(), self.std.cpu())
            for out in self.module(list(x.to(self.device))):
                preds.append({k: out[k].cpu() for k in ("boxes", "scores", "labels")})
            targets += self.eval_boxes.targets(rows, self.spec.class_agnostic)
        return preds, targets

    def result(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        info, blobs = super().result()
        return {**info, "train_rows": int(self.counts[0]), "eval_rows": int(self.counts[1])}, blobs


def to_device(t: Target, device: torch.device) -> Target:
    return {k: v.to(device) for k, v in t.items()}


def train_detector(
    spark: SparkSession, table: str, out: str, cfg: DetectorConfig | None = None
) -> dict[str, Any]:
    """Train ``cfg.model`` on detection table ``table`` and write the detector's directory ``out``."""
    cfg = cfg or DetectorConfig()
    cfg.validate()
    timer = Timer()
    meta = read_meta(spark, table)
    classes = list(meta.class_names) if cfg.per_class else [AGNOSTIC_CLASS]
    size = (cfg.image_size, cfg.image_size)
    spec = DetectorSpec(cfg.model, len(classes) + 1, size, not cfg.per_class, dict(cfg.model_kwargs))
    extra: dict[str, Any] = {"spec": spec.to_json()}
    if cfg.weights:
        extra["start_weights"], extra["start_tensors"] = start_weights(spec.build(), cfg.weights)
    splits = [cfg.train_split] + ([cfg.eval_split] if cfg.eval_split else [])
    df = read_detection_table(spark, table).where(F.col("split").isin(splits))
    out, ckpt_dir = prepare_out(out, cfg.resume)
    payload = rank_payload(cfg, out, ckpt_dir, 3, size, len(classes) + 1, **extra)
    info, files = launch(
        spark,
        df,
        cfg,
        DetectorRank.main,
        payload,
        "train_config.json",
        cfg.to_json(),
        label="train-detector",
        columns=(*RANK_COLUMNS, *BOX_COLUMNS),
    )
    if files.get("weights") != WEIGHTS:
        raise ValueError(f"rank 0 uploaded its weights to {files.get('weights')}, not {WEIGHTS}")
    history = info["history"]
    last = history[-1] if history else {}
    metrics = {
        "map_50": last.get("map_50"),
        "map": last.get("map"),
        "train_loss": last.get("train_loss"),
        "history": history,
        "train_rows": info["train_rows"],
        "eval_rows": info["eval_rows"],
        "start_tensors": extra.get("start_tensors", 0),
        **run_metrics(info, timer, cfg.workers),
    }
    preprocess = Preprocess(channels=3, size=size, mean=tuple(info["mean"]), std=tuple(info["std"]))
    store = driver_store(spark, out)
    for name, obj in detector_json(spec, classes, preprocess, metrics).items():
        write_bytes(store, name, json.dumps(obj, indent=2).encode())
    return {"out": out, "classes": classes, "image_size": list(size), **metrics}
