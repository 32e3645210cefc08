"""Supervised data-parallel training on Spark: the driver side (:func:`train`) and the per-rank loop.

Each rank decodes its shard of the image table once, then runs epochs over in-memory uint8 tensors
exactly like a plain PyTorch loop; DDP all-reduces gradients between ranks. Rank 0 writes
checkpoints, TensorBoard events, ``metrics.jsonl`` and a ``progress.json`` the driver polls for
the live progress bar, and returns the final weights to the driver, which writes the model
directory. ``OUT`` must be on storage every executor can reach (a shared or local path for
local / local-cluster masters; a mounted shared file system on a multi-node cluster).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkvision.spark import distributed as D
from sparkvision.models.modeldir import ModelSpec, Preprocess, save_model_dir
from sparkvision.models import create_model, model_kwargs_for
from sparkvision.spark.progress import Timer
from sparkvision.data.table import read_meta, read_table
from sparkvision.train.augment import BatchAugment
from sparkvision.train.checkpoint import load_checkpoint
from sparkvision.train.config import TrainConfig
from sparkvision.train.data import Shard, decode_shard, epoch_indices, pixel_stats, split_mask, steps_per_epoch
from sparkvision.train.loop import RankLog, prepare_out, run_epoch, run_with_progress
from sparkvision.train.optim import build_optimizer, param_groups
from sparkvision.transforms.preprocess import normalize, to_unit


def to_input(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device, channels_last: bool,
             augment: BatchAugment | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> [0, 1] -> augmented -> normalised, with the shared input transform
    (:mod:`sparkvision.transforms.preprocess`) so inference sees the numbers training saw."""
    x = to_unit(x_uint8.to(device, non_blocking=True))
    if augment is not None:
        x = augment(x, generator)
    return normalize(x, mean, std, channels_last)


@torch.no_grad()
def evaluate_shard(model: torch.nn.Module, shard: Shard, mean, std, device, channels_last: bool,
                   batch_size: int = 512) -> tuple[int, int, float]:
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


def _rank_main(ctx: D.RankContext, batches: Iterator[pa.RecordBatch], payload: dict[str, Any]) -> bytes | None:
    from safetensors.torch import save as st_save
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = TrainConfig.from_json(payload["cfg"])
    channels, size, num_classes = payload["channels"], tuple(payload["size"]), payload["num_classes"]
    device = ctx.device
    t_load = time.perf_counter()
    shard, splits = decode_shard(batches, channels, size)
    labelled = shard.labels >= 0
    train = shard.subset(split_mask(splits, cfg.train_split) & labelled)
    evals = shard.subset(split_mask(splits, cfg.eval_split) & labelled)
    del shard
    if len(train) and int(train.labels.max()) >= num_classes:
        raise ValueError(f"label {int(train.labels.max())} is out of range for {num_classes} classes")
    counts = D.all_reduce_sum(torch.tensor([len(train), len(evals)], dtype=torch.float64))
    least = D.all_reduce_min(torch.tensor([len(train)], dtype=torch.float64))
    if counts[0] == 0:
        raise ValueError(f"no labelled rows in split {cfg.train_split!r} to train on")
    if least[0] == 0:
        raise ValueError(f"a rank got no training rows: {int(counts[0])} rows is too few for {ctx.world_size} workers")
    mean_v, std_v = pixel_stats(train.images, channels)  # the preprocessing spec, over all ranks
    load_s = time.perf_counter() - t_load

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes, channels, **payload["model_kwargs"])
    optimizer = build_optimizer(param_groups(model, cfg.weight_decay), cfg.optimizer, cfg.lr, cfg.weight_decay,
                                cfg.momentum)
    start_epoch, history = 0, []
    if cfg.resume or ctx.attempt > 0:
        meta = load_checkpoint(payload["checkpoint_dir"], model, optimizer)
        if meta is not None:
            start_epoch, history = int(meta["epoch"]), list(meta.get("history", []))
            mean_v, std_v = torch.tensor(meta["mean"], dtype=torch.float64), torch.tensor(meta["std"], dtype=torch.float64)
    model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = DDP(model) if ctx.world_size > 1 else model
    mean = mean_v.float().view(1, -1, 1, 1).to(device)
    std = std_v.float().view(1, -1, 1, 1).to(device)

    local_batch = cfg.batch_size // ctx.world_size
    steps = steps_per_epoch(int(counts[0]), cfg.batch_size)
    augment = BatchAugment(cfg.augment)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    autocast = device.type if cfg.bf16 and device.type == "cuda" else None
    log = RankLog(ctx, payload["out"], payload["checkpoint_dir"], cfg.epochs, steps, cfg.batch_size, start_epoch,
                  cfg.keep_checkpoints)
    aug_gen = torch.Generator()

    def step_loss(b: torch.Tensor) -> torch.Tensor:
        x = to_input(train.images[b], mean, std, device, cfg.channels_last, augment, aug_gen)
        return loss_fn(net(x), train.labels[b].to(device, non_blocking=True))

    for epoch in range(start_epoch, cfg.epochs):
        aug_gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + ctx.rank)
        idx = epoch_indices(len(train), steps, local_batch, cfg.seed, epoch, ctx.rank)
        net.train()
        train_loss, lr, epoch_time = run_epoch(optimizer, step_loss, idx, epoch, cfg.lr, cfg.schedule,
                                               steps * cfg.epochs, int(cfg.warmup_epochs * steps), log, autocast)
        ev = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
        if counts[1] > 0:
            c, n, ls = evaluate_shard(model, evals, mean, std, device, cfg.channels_last)
            ev = D.all_reduce_sum(torch.tensor([c, n, ls], dtype=torch.float64))
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "test_acc": round(float(ev[0] / ev[1]), 5) if ev[1] > 0 else None,
            "test_loss": round(float(ev[2] / ev[1]), 5) if ev[1] > 0 else None,
            "images_per_s": round(steps * cfg.batch_size / epoch_time, 1),
            "epoch_time_s": round(epoch_time, 3),
            "lr": lr,
        }
        history.append(row)
        log.epoch_end(row, {"loss/train": train_loss, "accuracy/test": row["test_acc"], "loss/test": row["test_loss"],
                            "throughput/images_per_s": row["images_per_s"], "throughput/epoch_time_s": epoch_time,
                            "lr": lr},
                      net, optimizer, {"history": history, "mean": mean_v.tolist(), "std": std_v.tolist()})
    log.close()
    if not ctx.is_main:
        return None
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    return D.encode_result(
        {
            "history": history,
            "mean": mean_v.tolist(),
            "std": std_v.tolist(),
            "train_rows": int(counts[0]),
            "eval_rows": int(counts[1]),
            "load_s": round(load_s, 3),
            "steps_per_epoch": steps,
            "threads_per_rank": ctx.threads,
            "start_epoch": start_epoch,
        },
        {"weights": weights},
    )


def infer_image_spec(df: DataFrame, cfg: TrainConfig) -> tuple[int, tuple[int, int]]:
    """Channels and size from the data when the config leaves them open (a tiny aggregate)."""
    channels = cfg.channels
    size = cfg.image_size
    if channels is None or size is None:
        agg = df.groupBy("height", "width").agg(F.count("*").alias("n"), F.max("channels").alias("c"))
        rows = agg.orderBy(F.desc("n")).limit(1).collect()
        if not rows:
            raise ValueError("the table has no rows to train on")
        if size is None:
            size = (int(rows[0].height), int(rows[0].width))
        if channels is None:
            max_c = df.agg(F.max("channels")).first()[0]
            channels = 1 if max_c == 1 else 3
    return int(channels), (int(size[0]), int(size[1]))


def train(spark: SparkSession, table: str, out: str, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``table`` and write the model directory ``out``."""
    cfg = cfg or TrainConfig()
    cfg.validate()
    meta = read_meta(spark, table)
    if len(meta.class_names) < 2:
        raise ValueError(f"table {table} has {len(meta.class_names)} classes; training needs at least 2")
    splits = [cfg.train_split] + ([cfg.eval_split] if cfg.eval_split else [])
    df = read_table(spark, table).where(F.col("split").isin(splits))
    return train_df(spark, df, meta.class_names, out, cfg)


def train_df(
    spark: SparkSession, df: DataFrame, class_names: list[str], out: str, cfg: TrainConfig,
    repartition: bool = True,
) -> dict[str, Any]:
    """Train on an image-table DataFrame (columns image, label, split, height, width, channels)."""
    cfg.validate()
    timer = Timer()
    out, ckpt_dir = prepare_out(out, cfg.resume)
    channels, size = infer_image_spec(df, cfg)
    model_kwargs = model_kwargs_for(cfg.model, cfg.model_kwargs, size[0])
    payload = {
        "model_kwargs": model_kwargs,
        "cfg": cfg.to_json(),
        "out": out,
        "checkpoint_dir": ckpt_dir,
        "channels": channels,
        "size": list(size),
        "num_classes": len(class_names),
    }
    with open(os.path.join(out, "train_config.json"), "w") as f:
        json.dump({**cfg.to_json(), "channels": channels, "image_size": list(size)}, f, indent=2)
    result = run_with_progress(spark, df.select("image", "label", "split"), cfg.workers, _rank_main, payload, out,
                               threads_per_rank=cfg.threads_per_rank, repartition=repartition)
    info, blobs = D.decode_result(result)
    from safetensors.torch import load as st_load

    model = create_model(cfg.model, len(class_names), channels, **model_kwargs)
    model.load_state_dict(st_load(blobs["weights"]))
    history = info["history"]
    last = history[-1] if history else {}
    metrics = {
        "test_acc": last.get("test_acc"),
        "train_loss": last.get("train_loss"),
        "epochs": len(history),
        "history": history,
        "train_rows": info["train_rows"],
        "eval_rows": info["eval_rows"],
        "images_per_s": round(sum(h["images_per_s"] for h in history) / max(1, len(history)), 1),
        "data_load_s": info["load_s"],
        "wall_s": round(timer.elapsed, 3),
        "workers": cfg.workers,
        "threads_per_rank": info["threads_per_rank"],
        "resumed_from_epoch": info["start_epoch"],
    }
    save_model_dir(
        out,
        model,
        ModelSpec(cfg.model, len(class_names), channels, model_kwargs),
        class_names,
        Preprocess(channels=channels, size=size, mean=tuple(info["mean"]), std=tuple(info["std"])),
        metrics,
    )
    return {"model_dir": out, **{k: v for k, v in metrics.items() if k != "history"}, "history": history}
