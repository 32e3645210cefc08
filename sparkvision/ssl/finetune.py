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

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.spark import distributed as D
from sparkvision.models.modeldir import ModelSpec, Preprocess, load_model_dir, save_model_dir
from sparkvision.models import create_model, model_kwargs_for
from sparkvision.spark.progress import Timer
from sparkvision.data.table import read_meta, read_table
from sparkvision.train.augment import AugmentConfig, BatchAugment
from sparkvision.train.checkpoint import load_checkpoint
from sparkvision.train.config import TrainConfig
from sparkvision.train.data import decode_shard, epoch_indices, pixel_stats, split_mask, steps_per_epoch
from sparkvision.train.engine import evaluate_shard, infer_image_spec, to_input
from sparkvision.train.loop import RankLog, prepare_out, run_epoch, run_with_progress
from sparkvision.train.optim import build_optimizer
from sparkvision.ssl.config import FinetuneConfig
from sparkvision.ssl.losses import DistillationLoss, FixMatchLoss
from sparkvision.ssl.sampling import sample_label_fraction

# Split name the driver gives the unlabelled pool's rows (the table's own names are user data).
POOL_SPLIT = "__sparkvision_pool__"


def finetune_groups(model: torch.nn.Module, weight_decay: float, encoder_lr_scale: float, linear: bool) -> list[dict]:
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
            out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                        "lr_scale": 1.0 if is_head else encoder_lr_scale})
    return out


def _rank_finetune(ctx: D.RankContext, batches: Iterator[pa.RecordBatch], payload: dict[str, Any]) -> bytes | None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = FinetuneConfig.from_json(payload["cfg"])
    out, ckpt_dir, device = payload["out"], payload["checkpoint_dir"], ctx.device
    channels, size, num_classes = payload["channels"], tuple(payload["size"]), payload["num_classes"]
    shard, splits = decode_shard(batches, channels, size)
    labelled = shard.labels >= 0
    teacher_spec = payload.get("teacher")
    semi = cfg.consistency_weight > 0
    if teacher_spec is not None:  # distillation: every pool row trains, its label (if any) unused
        train = shard.subset(split_mask(splits, POOL_SPLIT))
    else:
        train = shard.subset(split_mask(splits, cfg.train_split) & labelled)
    pool = shard.subset(split_mask(splits, POOL_SPLIT)) if semi else None  # FixMatch: labels never read
    evals = shard.subset(split_mask(splits, cfg.eval_split) & labelled)
    del shard
    counts = D.all_reduce_sum(torch.tensor([len(train), len(evals)], dtype=torch.float64))
    least = D.all_reduce_min(torch.tensor([len(train), len(pool) if semi else 1], dtype=torch.float64))
    if semi and least[1] == 0:
        raise ValueError(f"a rank got no unlabelled rows: split {cfg.unlabeled_split!r} is too small for "
                         f"{ctx.world_size} workers; check --unlabeled-split or lower --workers")
    if least[0] == 0:
        if teacher_spec is not None:
            raise ValueError(f"a rank got no rows to distill on: {int(counts[0])} rows in split "
                             f"{cfg.unlabeled_split!r} and the labelled sample for {ctx.world_size} workers; "
                             "check --unlabeled-split or lower --workers")
        raise ValueError(f"a rank got no training rows: {int(counts[0])} rows is too few for {ctx.world_size} workers; "
                         "lower --workers or raise --label-fraction")
    if teacher_spec is None and int(train.labels.max()) >= num_classes:
        raise ValueError(f"label {int(train.labels.max())} is out of range for {num_classes} classes")
    if payload["mean"] is None:
        mean_v, std_v = pixel_stats(train.images, channels)
    else:
        mean_v, std_v = torch.tensor(payload["mean"], dtype=torch.float64), torch.tensor(payload["std"], dtype=torch.float64)

    torch.manual_seed(cfg.seed)
    model = create_model(payload["model"], num_classes, channels, **payload["model_kwargs"])
    if payload["encoder_weights"] is not None:
        sd = st_load(payload["encoder_weights"])
        missing, _ = model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")}, strict=False)
        if any(not k.startswith("head.") for k in missing):
            raise ValueError(f"encoder weights do not fit model {payload['model']!r}: missing {missing[:3]}")
    lr_scale = cfg.encoder_lr_scale if payload["encoder_weights"] is not None else 1.0
    optimizer = build_optimizer(finetune_groups(model, cfg.weight_decay, lr_scale, cfg.linear), cfg.optimizer,
                                cfg.lr, cfg.weight_decay, cfg.momentum)
    start_epoch, history = 0, []
    if cfg.resume or ctx.attempt > 0:
        meta = load_checkpoint(ckpt_dir, model, optimizer)
        if meta is not None:
            start_epoch, history = int(meta["epoch"]), list(meta.get("history", []))
    model.to(device)
    net = DDP(model) if ctx.world_size > 1 else model
    mean = mean_v.float().view(1, -1, 1, 1).to(device)
    std = std_v.float().view(1, -1, 1, 1).to(device)
    local_batch = cfg.batch_size // ctx.world_size
    steps = steps_per_epoch(int(counts[0]), cfg.batch_size)
    augment = BatchAugment(cfg.augment)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    teacher = None
    if teacher_spec is not None:
        teacher = create_model(teacher_spec["model"], num_classes, channels, **teacher_spec["model_kwargs"])
        teacher.load_state_dict(st_load(teacher_spec["weights"]))
        teacher.to(device).eval().requires_grad_(False)
        # The student's normalised input re-normalised with the teacher's statistics: both see the same view.
        t_mean = torch.tensor(teacher_spec["mean"], dtype=torch.float32).view(1, -1, 1, 1).to(device)
        t_std = torch.tensor(teacher_spec["std"], dtype=torch.float32).view(1, -1, 1, 1).to(device)
        t_scale, t_shift = std / t_std, (mean - t_mean) / t_std
        distill_loss = DistillationLoss(cfg.distill_temperature)
    if semi:
        strong = BatchAugment(cfg.strong_augment)
        fixmatch = FixMatchLoss(cfg.confidence)
    log = RankLog(ctx, out, ckpt_dir, cfg.epochs, steps, cfg.batch_size, start_epoch, cfg.keep_checkpoints)
    gen, pool_gen = torch.Generator(), torch.Generator()
    mask_rates: list[float] = []

    def step_loss(b: torch.Tensor) -> torch.Tensor:
        x = to_input(train.images[b], mean, std, device, False, augment, gen)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x * t_scale + t_shift)
            return distill_loss(net(x), target)
        y = train.labels[b].to(device)
        if not semi:
            return loss_fn(net(x), y)
        u = pool.images[torch.randint(len(pool), (cfg.unlabeled_ratio * len(b),), generator=pool_gen)]
        x_weak = to_input(u, mean, std, device, False, augment, gen)
        x_strong = to_input(u, mean, std, device, False, strong, gen)
        # One forward over labelled, weak and strong images, as the paper does: BatchNorm's batch and
        # running statistics then describe the same mixture in training and at evaluation. (Pseudo-
        # labelling the weak view in a separate pass let the strong views dominate the statistics of
        # the labelled images' batch: -3 points at 1% of Fashion-MNIST.) The weak logits are detached
        # inside FixMatchLoss.
        n, m = len(b), len(u)
        logits = net(torch.cat([x, x_weak, x_strong]))
        loss = loss_fn(logits[:n], y) + cfg.consistency_weight * fixmatch(logits[n + m:], logits[n : n + m])
        mask_rates.append(fixmatch.last_mask_rate)
        return loss

    for epoch in range(start_epoch, cfg.epochs):
        gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + ctx.rank)
        pool_gen.manual_seed(cfg.seed * 100019 + epoch * 1013 + ctx.rank)
        mask_rates.clear()
        idx = epoch_indices(len(train), steps, local_batch, cfg.seed, epoch, ctx.rank)
        net.train(not cfg.linear)  # linear evaluation: BN statistics and dropout of the encoder stay frozen
        train_loss, lr, epoch_time = run_epoch(optimizer, step_loss, idx, epoch, cfg.lr, cfg.schedule,
                                               steps * cfg.epochs, int(cfg.warmup_epochs * steps), log)
        last = epoch + 1 == cfg.epochs
        ev = torch.zeros(3, dtype=torch.float64)
        if counts[1] > 0 and (last or (epoch + 1) % payload["eval_every"] == 0):
            c, n, ls = evaluate_shard(model, evals, mean, std, device, False)
            ev = D.all_reduce_sum(torch.tensor([c, n, ls], dtype=torch.float64))
        row = {"epoch": epoch + 1, "train_loss": round(train_loss, 5),
               "test_acc": round(float(ev[0] / ev[1]), 5) if ev[1] > 0 else None,
               "test_loss": round(float(ev[2] / ev[1]), 5) if ev[1] > 0 else None,
               "epoch_time_s": round(epoch_time, 3), "lr": lr}
        scalars = {"loss/train": train_loss, "accuracy/test": row["test_acc"], "lr": lr}
        if semi:  # share of the unlabelled images confident enough to train on, over all ranks
            rate = D.all_reduce_sum(torch.tensor([sum(mask_rates), len(mask_rates)], dtype=torch.float64))
            row["pseudo_label_rate"] = scalars["fixmatch/pseudo_label_rate"] = round(
                float(rate[0] / max(1.0, float(rate[1]))), 4)
        history.append(row)
        log.epoch_end(row, scalars, net, optimizer, {"history": history})
    log.close()
    if not ctx.is_main:
        return None
    for p in model.parameters():
        p.requires_grad_(True)
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    return D.encode_result({"history": history, "mean": mean_v.tolist(), "std": std_v.tolist(),
                            "train_rows": int(counts[0]), "eval_rows": int(counts[1]), "start_epoch": start_epoch},
                           {"weights": weights})


def projector_neck(encoder_dir: str, layers: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The first ``layers`` FC + BN layers of ``encoder_dir``'s pretraining projector, renamed to
    the keys of ``ImageModel.attach_neck`` (both are ``ssl.heads._block`` layers: Linear, BN, ReLU),
    and their widths."""
    from safetensors.torch import load_file

    from sparkvision.ssl.pretrain import PROJECTOR_FILE

    path = os.path.join(encoder_dir, PROJECTOR_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --projector-layers needs an encoder written by "
                                "`sparkvision pretrain` (or sparkvision.ssl.pretrain.export_projector on its dir)")
    proj = load_file(path)
    out: dict[str, torch.Tensor] = {}
    dims = []
    for i in range(layers):
        fc, bn = f"net.{3 * i}", f"net.{3 * i + 1}"
        # A hidden layer is FC, BN, ReLU; the output layer has no ReLU (and is not a useful neck).
        if f"{fc}.weight" not in proj or f"{bn}.running_mean" not in proj or f"net.{3 * i + 3}.weight" not in proj:
            raise ValueError(f"the projector in {encoder_dir} has fewer than {layers + 1} FC + BN layers; "
                             f"--projector-layers must be below its depth")
        out[f"neck.{3 * i}.weight"] = proj[f"{fc}.weight"]
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out[f"neck.{3 * i + 1}.{k}"] = proj[f"{bn}.{k}"]
        dims.append(int(proj[f"{fc}.weight"].shape[0]))
    return out, dims


def finetune(spark: SparkSession, table: str, out: str, encoder: str | None = None,
             cfg: FinetuneConfig | None = None, eval_every: int = 5, teacher: str | None = None) -> dict[str, Any]:
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
    from safetensors.torch import save as st_save

    cfg = cfg or FinetuneConfig()
    cfg.validate()
    if encoder is None and cfg.linear:
        raise ValueError("--linear needs --encoder (a linear probe of random weights is not a baseline)")
    if teacher is not None and cfg.linear:
        raise ValueError("--teacher distils into a whole student; it cannot be combined with --linear")
    semi = cfg.consistency_weight > 0
    if teacher is not None and semi:
        raise ValueError("--teacher (distillation) and --consistency-weight (FixMatch) are two ways to use the "
                         "unlabelled pool; pick one")
    if (teacher is not None or semi) and cfg.eval_split and cfg.unlabeled_split == cfg.eval_split:
        raise ValueError(f"unlabeled_split {cfg.unlabeled_split!r} is also the eval split: training on the "
                         "rows that are scored would leak them; pick another --unlabeled-split or --eval-split")
    timer = Timer()
    meta = read_meta(spark, table)
    class_names = meta.class_names
    if len(class_names) < 2:
        raise ValueError(f"table {table} has {len(class_names)} classes; fine-tuning needs at least 2")
    teacher_spec = None
    if teacher is not None:
        tm = load_model_dir(teacher)
        if tm.spec.num_classes != len(class_names):
            raise ValueError(f"teacher {teacher} predicts {tm.spec.num_classes} classes but table {table} has "
                             f"{len(class_names)}")
        teacher_spec = {"model": tm.spec.model, "model_kwargs": dict(tm.spec.model_kwargs),
                        "mean": list(tm.preprocess.mean), "std": list(tm.preprocess.std),
                        "channels": tm.preprocess.channels, "size": list(tm.preprocess.size),
                        "weights": st_save({k: v.contiguous() for k, v in tm.model.state_dict().items()})}
    df = read_table(spark, table)
    train_rows = sample_label_fraction(df.where(F.col("split") == cfg.train_split), cfg.label_fraction,
                                       cfg.sample_seed)
    parts = [train_rows]
    if teacher is not None or semi:
        pool = df.where(F.col("split") == cfg.unlabeled_split)
        if not pool.limit(1).count():  # a typo would otherwise train on the labelled sample alone
            have = sorted(r[0] for r in df.select("split").distinct().limit(50).collect())
            raise ValueError(f"table {table} has no rows in split {cfg.unlabeled_split!r} (--unlabeled-split); "
                             f"its splits: {', '.join(map(str, have))}")
        if teacher is not None and cfg.unlabeled_split != cfg.train_split:
            pool = pool.unionByName(train_rows)  # distillation: the labelled sample is part of the pool
        pool = pool.withColumn("split", F.lit(POOL_SPLIT))
        parts = [pool] if teacher is not None else [train_rows, pool]
    if cfg.eval_split:
        parts.append(df.where(F.col("split") == cfg.eval_split))
    data = parts[0]
    for part in parts[1:]:
        data = data.unionByName(part)

    out, ckpt_dir = prepare_out(out, cfg.resume)

    if encoder is not None:
        lm = load_model_dir(encoder)
        model_name, model_kwargs = lm.spec.model, dict(lm.spec.model_kwargs)
        channels, size = lm.preprocess.channels, lm.preprocess.size
        mean, std = list(lm.preprocess.mean), list(lm.preprocess.std)
        enc_sd = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
        if cfg.projector_layers:
            neck_sd, dims = projector_neck(encoder, cfg.projector_layers)
            enc_sd.update(neck_sd)
            model_kwargs["neck"] = dims
        enc_weights = st_save(enc_sd)
    else:
        if cfg.projector_layers:
            raise ValueError("projector_layers needs --encoder (a pretraining run's projector)")
        tcfg = TrainConfig(model=cfg.model, model_kwargs=cfg.model_kwargs)
        channels, size = infer_image_spec(data, tcfg)
        model_name, model_kwargs = cfg.model, model_kwargs_for(cfg.model, cfg.model_kwargs, size[0])
        mean = std = None
        enc_weights = None
    if teacher_spec is not None and (teacher_spec["channels"] != channels or tuple(teacher_spec["size"]) != tuple(size)):
        raise ValueError(f"teacher {teacher} takes {teacher_spec['channels']}x{teacher_spec['size']} images but the "
                         f"student takes {channels}x{list(size)}")
    payload = {"cfg": cfg.to_json(), "out": out, "checkpoint_dir": ckpt_dir, "channels": channels, "size": list(size),
               "num_classes": len(class_names), "model": model_name, "model_kwargs": model_kwargs, "mean": mean,
               "std": std, "encoder_weights": enc_weights, "eval_every": max(1, eval_every), "teacher": teacher_spec}
    with open(os.path.join(out, "finetune_config.json"), "w") as f:
        json.dump({**cfg.to_json(), "encoder": encoder, "teacher": teacher, "model": model_name}, f, indent=2)
    result = run_with_progress(spark, data.select("image", "label", "split"), cfg.workers, _rank_finetune, payload,
                               out, threads_per_rank=cfg.threads_per_rank, label="finetune")
    info, blobs = D.decode_result(result)
    from safetensors.torch import load as st_load

    model = create_model(model_name, len(class_names), channels, **model_kwargs)
    model.load_state_dict(st_load(blobs["weights"]))
    history = info["history"]
    last = history[-1] if history else {}
    metrics = {"test_acc": last.get("test_acc"), "train_loss": last.get("train_loss"),
               "mode": "distill" if teacher else ("linear" if cfg.linear else ("finetune" if encoder else "scratch")),
               "fixmatch": semi,
               "teacher": teacher,
               "label_fraction": cfg.label_fraction, "train_rows": info["train_rows"], "eval_rows": info["eval_rows"],
               "epochs": len(history), "encoder": encoder, "wall_s": round(timer.elapsed, 3),
               "train_time_s": round(sum(h["epoch_time_s"] for h in history), 1),
               "resumed_from_epoch": info["start_epoch"]}
    save_model_dir(out, model, ModelSpec(model_name, len(class_names), channels, model_kwargs), class_names,
                   Preprocess(channels=channels, size=size, mean=tuple(info["mean"]), std=tuple(info["std"])),
                   {**metrics, "history": history})
    return {"model_dir": out, **metrics, "history": history}
