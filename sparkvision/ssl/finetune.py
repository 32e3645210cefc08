"""Few-label fine-tuning and linear evaluation of a pretrained encoder (or training from scratch).

The labelled training rows are first cut to ``label_fraction`` by the stratified, seeded sampler
(in Spark, nothing collected), then a classifier is trained data-parallel through the same
engine pieces as supervised training (``run_on_barrier``, shard decoding, epoch plan, per-sample
batch augmentation, checkpoints with resume, TensorBoard, ``metrics.jsonl``):

* ``linear=True``: the encoder is frozen (eval mode, no gradient) and only a new linear head is
  trained: the standard linear evaluation protocol.
* fine-tuning: everything trains, the encoder at ``encoder_lr_scale`` times the head's learning
  rate, so a few hundred labels do not wash out what pretraining learned.
* ``encoder=None``: the same architecture, augmentations and schedule from random weights, the
  "scratch" baseline every pretrained number should be compared with.
* ``teacher=``: distillation with unlabelled data, the third step of SimCLRv2 (Chen et al. 2020,
  "Big Self-Supervised Models are Strong Semi-Supervised Learners", eq. 2): a fine-tuned
  classifier labels every image of the unlabelled pool with its tempered softmax and the student
  is trained on those soft labels alone, so the many unlabelled images, not just the few labelled
  ones, shape the final classifier.
* ``consistency_weight > 0``: semi-supervised fine-tuning with FixMatch (Sohn et al. 2020, see
  ``losses.FixMatchLoss``): each step also draws ``unlabeled_ratio`` x batch images of the
  unlabelled pool, pseudo-labels a weakly augmented view with the model itself where it is
  confident, and trains a strongly augmented view (``strong_augment``: larger shifts, jitter,
  cutout) to predict that label. Unlike distillation the pseudo-labels improve as the
  model does, and the strong views teach invariances a few hundred labels cannot.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from sparkvision.data.table import read_meta, read_table
from sparkvision.errors import ParamError
from sparkvision.inference.modelref import model_dir_here
from sparkvision.models import ImageModel, create_model, model_kwargs_for
from sparkvision.models.modeldir import ModelSpec, load_model_dir
from sparkvision.spark import distributed as D
from sparkvision.spark.progress import Timer
from sparkvision.ssl.config import FinetuneConfig
from sparkvision.ssl.losses import DistillationLoss, FixMatchLoss
from sparkvision.ssl.pretrain import PROJECTOR_FILE
from sparkvision.ssl.sampling import sample_label_fraction
from sparkvision.train.augment import BatchAugment
from sparkvision.train.data import Shard, split_mask
from sparkvision.train.driver import (
    infer_image_spec,
    launch,
    prepare_out,
    rank_payload,
    run_metrics,
    save_trained,
)
from sparkvision.train.engine import ClassifierRank, check_labels, to_input
from sparkvision.train.rank import check_rows, stats_tensor

# Split name the driver gives the unlabelled pool's rows (the table's own names are user data).
POOL_SPLIT = "__sparkvision_pool__"


def finetune_groups(
    model: ImageModel, weight_decay: float, encoder_lr_scale: float, linear: bool
) -> list[dict]:
    """Head and encoder parameters in separate groups (the encoder's at ``lr_scale``), no weight
    decay on biases/norms; with ``linear`` the encoder is frozen and left out."""
    head_ids = {id(p) for p in model.head.parameters()}
    groups: dict[tuple[bool, bool], list] = {(h, d): [] for h in (True, False) for d in (True, False)}
    for p in model.parameters():
        is_head = id(p) in head_ids
        if linear and not is_head:
            p.requires_grad_(False)
            continue
        groups[(is_head, p.ndim > 1)].append(p)
    out = []
    for (is_head, decay), params in groups.items():
        if params:
            out.append(
                {
                    "params": params,
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr_scale": 1.0 if is_head else encoder_lr_scale,
                }
            )
    return out


class FinetuneRank(ClassifierRank):
    """A rank of fine-tuning, linear evaluation, distillation or FixMatch (see the module's doc)."""

    config_class = FinetuneConfig

    def __init__(self, ctx: D.RankContext, payload: dict[str, Any]) -> None:
        super().__init__(ctx, payload)
        self.train_mode = (
            not self.cfg.linear
        )  # linear evaluation: BN statistics and dropout of the encoder stay frozen
        self.teacher_spec = payload.get("teacher")
        self.semi = self.cfg.consistency_weight > 0

    def select(self, shard: Shard, splits: list[str]) -> tuple[Shard, torch.Tensor]:
        cfg, workers = self.cfg, self.ctx.world_size
        labelled = shard.labels >= 0
        if self.teacher_spec is not None:  # distillation: every pool row trains, its label (if any) unused
            train = shard.subset(split_mask(splits, POOL_SPLIT))
        else:
            train = shard.subset(split_mask(splits, cfg.train_split) & labelled)
        self.pool = (
            shard.subset(split_mask(splits, POOL_SPLIT)) if self.semi else None
        )  # FixMatch: labels never read
        self.evals = shard.subset(split_mask(splits, cfg.eval_split) & labelled)
        counts = D.all_reduce_sum(torch.tensor([len(train), len(self.evals)], dtype=torch.float64))
        if (
            self.pool is not None
            and D.all_reduce_min(torch.tensor([len(self.pool)], dtype=torch.float64))[0] == 0
        ):
            raise ValueError(
                f"a rank got no unlabelled rows: split {cfg.unlabeled_split!r} is too small for "
                f"{workers} workers; check unlabeled_split or lower workers"
            )
        if self.teacher_spec is not None:
            too_few = (
                "a rank got no rows to distill on: {rows} rows in split "
                + repr(cfg.unlabeled_split)
                + " and the labelled sample for {workers} workers; check unlabeled_split or lower workers"
            )
        else:
            too_few = (
                "a rank got no training rows: {rows} rows is too few for {workers} workers; "
                "lower workers or raise label_fraction"
            )
        check_rows(len(train), counts, self.ctx, too_few.format(rows=0, workers=workers), too_few)
        if self.teacher_spec is None:
            check_labels(train, self.num_classes)
        return train, counts

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.payload["mean"] is None:  # from scratch: this data's statistics
            return super().stats()
        return (
            torch.tensor(self.payload["mean"], dtype=torch.float64),
            torch.tensor(self.payload["std"], dtype=torch.float64),
        )

    def build(self) -> tuple[torch.nn.Module, list[dict]]:
        cfg, payload = self.cfg, self.payload
        model = create_model(payload["model"], self.num_classes, self.channels, **payload["model_kwargs"])
        if payload["encoder_weights"] is not None:
            sd = st_load(payload["encoder_weights"])
            missing, _ = model.load_state_dict(
                {k: v for k, v in sd.items() if not k.startswith("head.")}, strict=False
            )
            if any(not k.startswith("head.") for k in missing):
                raise ValueError(
                    f"encoder weights do not fit model {payload['model']!r}: missing {missing[:3]}"
                )
        lr_scale = cfg.encoder_lr_scale if payload["encoder_weights"] is not None else 1.0
        return model, finetune_groups(model, cfg.weight_decay, lr_scale, cfg.linear)

    def prepare(self) -> None:
        super().prepare()
        cfg, spec = self.cfg, self.teacher_spec
        self.teacher = None
        if spec is not None:
            self.teacher = create_model(
                spec["model"], self.num_classes, self.channels, **spec["model_kwargs"]
            )
            self.teacher.load_state_dict(st_load(spec["weights"]))
            self.teacher.to(self.device).eval().requires_grad_(False)
            # The student's normalised input re-normalised with the teacher's statistics: both see the same view.
            t_mean, t_std = stats_tensor(spec["mean"], self.device), stats_tensor(spec["std"], self.device)
            self.t_scale, self.t_shift = self.std / t_std, (self.mean - t_mean) / t_std
            self.distill_loss = DistillationLoss(cfg.distill_temperature)
        if self.semi:
            self.strong = BatchAugment(cfg.strong_augment)
            self.fixmatch = FixMatchLoss(cfg.confidence)
        self.pool_gen = torch.Generator()
        self.mask_rates: list[float] = []

    def begin_epoch(self, epoch: int) -> None:
        self.pool_gen.manual_seed(self.cfg.seed * 100019 + epoch * 1013 + self.ctx.rank)
        self.mask_rates.clear()

    def epoch_state(self) -> dict[str, torch.Tensor]:
        return {
            "pool_gen": self.pool_gen.get_state(),
            "mask_rates": torch.tensor(self.mask_rates, dtype=torch.float64),
        }

    def load_epoch_state(self, state: dict[str, torch.Tensor]) -> None:
        self.pool_gen.set_state(state["pool_gen"])
        self.mask_rates[:] = state["mask_rates"].tolist()

    def step_loss(self, b: torch.Tensor) -> torch.Tensor:
        if self.teacher is None and not self.semi:
            return super().step_loss(b)
        cfg, mean, std, device = self.cfg, self.mean, self.std, self.device
        x = to_input(self.rows.images[b], mean, std, device, self.channels_last, self.augment, self.gen)
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(x * self.t_scale + self.t_shift)
            return self.distill_loss(self.net(x), target)
        y = self.rows.labels[b].to(device)
        assert self.pool is not None  # FixMatch (semi): select() kept the unlabelled pool
        u = self.pool.images[
            torch.randint(len(self.pool), (cfg.unlabeled_ratio * len(b),), generator=self.pool_gen)
        ]
        x_weak = to_input(u, mean, std, device, self.channels_last, self.augment, self.gen)
        x_strong = to_input(u, mean, std, device, self.channels_last, self.strong, self.gen)
        # One forward over labelled, weak and strong images, as the paper does: BatchNorm's batch and
        # running statistics then describe the same mixture in training and at evaluation. (Pseudo-
        # labelling the weak view in a separate pass let the strong views dominate the statistics of
        # the labelled images' batch: -3 points at 1% of Fashion-MNIST.) The weak logits are detached
        # inside FixMatchLoss.
        n, m = len(b), len(u)
        logits = self.net(torch.cat([x, x_weak, x_strong]))
        loss = self.loss_fn(logits[:n], y) + cfg.consistency_weight * self.fixmatch(
            logits[n + m :], logits[n : n + m]
        )
        self.mask_rates.append(self.fixmatch.last_mask_rate)
        return loss

    def eval_due(self, epoch: int) -> bool:
        return epoch + 1 == self.cfg.epochs or (epoch + 1) % self.payload["eval_every"] == 0

    def end_epoch(self, epoch: int) -> tuple[dict[str, Any], dict[str, float | None]]:
        fields, scalars = super().end_epoch(epoch)
        if self.semi:  # share of the unlabelled images confident enough to train on, over all ranks
            rate = D.all_reduce_sum(
                torch.tensor([sum(self.mask_rates), len(self.mask_rates)], dtype=torch.float64)
            )
            fields["pseudo_label_rate"] = scalars["fixmatch/pseudo_label_rate"] = round(
                float(rate[0] / max(1.0, float(rate[1]))), 4
            )
        return fields, scalars

    def result(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        for p in self.module.parameters():
            p.requires_grad_(True)
        return super().result()


def projector_neck(
    encoder_dir: str, layers: int, name: str | None = None
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The first ``layers`` FC + BN layers of ``encoder_dir``'s pretraining projector, renamed to
    the keys of ``ImageModel.attach_neck`` (both are ``ssl.heads._block`` layers: Linear, BN, ReLU),
    and their widths."""
    path = os.path.join(encoder_dir, PROJECTOR_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{name or encoder_dir}/{PROJECTOR_FILE} not found: projector_layers needs an encoder written by "
            "`sparkvision pretrain` (or sparkvision.ssl.pretrain.export_projector on its dir)"
        )
    proj = load_file(path)
    out: dict[str, torch.Tensor] = {}
    dims = []
    for i in range(layers):
        fc, bn = f"net.{3 * i}", f"net.{3 * i + 1}"
        # A hidden layer is FC, BN, ReLU; the output layer has no ReLU (and is not a useful neck).
        if (
            f"{fc}.weight" not in proj
            or f"{bn}.running_mean" not in proj
            or f"net.{3 * i + 3}.weight" not in proj
        ):
            raise ParamError(
                "projector_layers",
                f"{layers} must be below the depth of the projector in "
                f"{encoder_dir} (it has fewer than {layers + 1} FC + BN layers)",
            )
        out[f"neck.{3 * i}.weight"] = proj[f"{fc}.weight"]
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out[f"neck.{3 * i + 1}.{k}"] = proj[f"{bn}.{k}"]
        dims.append(int(proj[f"{fc}.weight"].shape[0]))
    return out, dims


def check_modes(cfg: FinetuneConfig, encoder: str | None, teacher: str | None) -> None:
    """Refuse combinations of encoder, teacher, linear evaluation and FixMatch that make no sense."""
    if encoder is None and cfg.linear:
        raise ParamError("linear", "needs an encoder (a linear probe of random weights is not a baseline)")
    if teacher is not None and cfg.linear:
        raise ParamError("linear", "cannot be combined with a teacher: distillation trains a whole student")
    semi = cfg.consistency_weight > 0
    if teacher is not None and semi:
        raise ParamError(
            "consistency_weight",
            "FixMatch and a teacher (distillation) are two ways to use the unlabelled pool; pick one",
        )
    if (teacher is not None or semi) and cfg.eval_split and cfg.unlabeled_split == cfg.eval_split:
        raise ValueError(
            f"unlabeled_split {cfg.unlabeled_split!r} is also the eval split: training on the "
            "rows that are scored would leak them; pick another unlabeled_split or eval_split"
        )
    if encoder is None and cfg.projector_layers:
        raise ParamError("projector_layers", "needs an encoder (a pretraining run's projector)")


def teacher_payload(spark: SparkSession, teacher: str, table: str, num_classes: int) -> dict[str, Any]:
    """The teacher model directory (a local path or any URI the session reads) as the ranks need
    it (weights as safetensors bytes)."""
    with model_dir_here(spark, teacher) as here:
        tm = load_model_dir(here, param="teacher")
    if tm.spec.num_classes != num_classes:
        raise ValueError(
            f"teacher {teacher} predicts {tm.spec.num_classes} classes but table {table} has {num_classes}"
        )
    return {
        "model": tm.spec.model,
        "model_kwargs": dict(tm.spec.model_kwargs),
        "mean": list(tm.preprocess.mean),
        "std": list(tm.preprocess.std),
        "channels": tm.preprocess.channels,
        "size": list(tm.preprocess.size),
        "weights": st_save({k: v.contiguous() for k, v in tm.model.state_dict().items()}),
    }


def finetune_rows(df: DataFrame, cfg: FinetuneConfig, table: str, distill: bool) -> DataFrame:
    """The rows the ranks get: the labelled sample, the unlabelled pool (renamed ``POOL_SPLIT``;
    distillation trains on the pool alone, the labelled sample included) and the eval rows."""
    train_rows = sample_label_fraction(
        df.where(F.col("split") == cfg.train_split), cfg.label_fraction, cfg.sample_seed
    )
    parts = [train_rows]
    if distill or cfg.consistency_weight > 0:
        pool = df.where(F.col("split") == cfg.unlabeled_split)
        if not pool.limit(1).count():  # a typo would otherwise train on the labelled sample alone
            have = sorted(r[0] for r in df.select("split").distinct().limit(50).collect())
            raise ParamError(
                "unlabeled_split",
                f"table {table} has no rows in split {cfg.unlabeled_split!r}; "
                f"its splits: {', '.join(map(str, have))}",
            )
        if distill and cfg.unlabeled_split != cfg.train_split:
            pool = pool.unionByName(train_rows)  # distillation: the labelled sample is part of the pool
        pool = pool.withColumn("split", F.lit(POOL_SPLIT))
        parts = [pool] if distill else [train_rows, pool]
    if cfg.eval_split:
        parts.append(df.where(F.col("split") == cfg.eval_split))
    data = parts[0]
    for part in parts[1:]:
        data = data.unionByName(part)
    return data


def student_payload(
    encoder: str | None, cfg: FinetuneConfig, data: DataFrame
) -> tuple[int, tuple[int, int], dict[str, Any]]:
    """``(channels, size, payload)``: the student's input and its model, preprocessing and starting
    weights: the encoder's (with ``cfg.projector_layers`` of its projector as a neck), or
    ``cfg.model`` from scratch (statistics from the data)."""
    if encoder is None:
        channels, size = infer_image_spec(data)
        model_kwargs = model_kwargs_for(cfg.model, cfg.model_kwargs, size[0])
        return (
            channels,
            size,
            {
                "model": cfg.model,
                "model_kwargs": model_kwargs,
                "mean": None,
                "std": None,
                "encoder_weights": None,
            },
        )
    # The encoder may be a URI (a pretraining run's --out): read through the session's file systems.
    with model_dir_here(data.sparkSession, encoder, extra=(PROJECTOR_FILE,)) as here:
        lm = load_model_dir(here, param="encoder")
        model_kwargs = dict(lm.spec.model_kwargs)
        enc_sd = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
        if cfg.projector_layers:
            neck_sd, dims = projector_neck(here, cfg.projector_layers, name=encoder)
            enc_sd.update(neck_sd)
            model_kwargs["neck"] = dims
    h, w = lm.preprocess.size
    return (
        lm.preprocess.channels,
        (h, w),
        {
            "model": lm.spec.model,
            "model_kwargs": model_kwargs,
            "mean": list(lm.preprocess.mean),
            "std": list(lm.preprocess.std),
            "encoder_weights": st_save(enc_sd),
        },
    )


def finetune(
    spark: SparkSession,
    table: str,
    out: str,
    encoder: str | None = None,
    cfg: FinetuneConfig | None = None,
    eval_every: int = 5,
    teacher: str | None = None,
) -> dict[str, Any]:
    """Fine-tune (or, with ``cfg.linear``, linearly evaluate) the encoder model directory
    ``encoder`` on ``cfg.label_fraction`` of ``table``'s labelled training rows; ``encoder=None``
    trains ``cfg.model`` from scratch. Writes a classifier model directory ``out``.

    With ``teacher`` (a classifier model directory, typically this function's own output) the
    student is instead distilled on the teacher's soft labels of every ``cfg.unlabeled_split`` row
    plus the labelled sample; no label is read, so a pool of any size can be used.

    With ``cfg.consistency_weight > 0`` the labelled sample trains as usual and every step adds
    FixMatch's loss on images drawn from the ``cfg.unlabeled_split`` rows (their labels, if any,
    are never read).
    """
    cfg = cfg or FinetuneConfig()
    cfg.validate()
    check_modes(cfg, encoder, teacher)
    timer = Timer()
    class_names = read_meta(spark, table).class_names
    if len(class_names) < 2:
        raise ValueError(f"table {table} has {len(class_names)} classes; fine-tuning needs at least 2")
    teacher_spec = teacher_payload(spark, teacher, table, len(class_names)) if teacher is not None else None
    data = finetune_rows(read_table(spark, table), cfg, table, distill=teacher is not None)
    channels, size, student = student_payload(encoder, cfg, data)
    if teacher_spec is not None and (
        teacher_spec["channels"] != channels or tuple(teacher_spec["size"]) != size
    ):
        raise ValueError(
            f"teacher {teacher} takes {teacher_spec['channels']}x{teacher_spec['size']} images but the "
            f"student takes {channels}x{list(size)}"
        )
    out, ckpt_dir = prepare_out(out, cfg.resume)
    payload = rank_payload(
        cfg,
        out,
        ckpt_dir,
        channels,
        size,
        len(class_names),
        eval_every=max(1, eval_every),
        teacher=teacher_spec,
        **student,
    )
    info, blobs = launch(
        spark,
        data,
        cfg,
        FinetuneRank.main,
        payload,
        "finetune_config.json",
        {**cfg.to_json(), "encoder": encoder, "teacher": teacher, "model": student["model"]},
        label="finetune",
    )
    history = info["history"]
    last = history[-1] if history else {}
    metrics = {
        "test_acc": last.get("test_acc"),
        "train_loss": last.get("train_loss"),
        "mode": "distill"
        if teacher
        else ("linear" if cfg.linear else ("finetune" if encoder else "scratch")),
        "fixmatch": cfg.consistency_weight > 0,
        "teacher": teacher,
        "label_fraction": cfg.label_fraction,
        "train_rows": info["train_rows"],
        "eval_rows": info["eval_rows"],
        "encoder": encoder,
        "train_time_s": round(sum(h["epoch_time_s"] for h in history), 1),
        **run_metrics(info, timer, cfg.workers),
    }
    save_trained(
        spark,
        out,
        ModelSpec(student["model"], len(class_names), channels, student["model_kwargs"]),
        blobs["weights"],
        class_names,
        size,
        info,
        {**metrics, "history": history},
    )
    return {"model_dir": out, **metrics, "history": history}
