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
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from .. import distributed as D
from ..modeldir import ModelSpec, Preprocess, save_model_dir
from ..models import create_model
from ..progress import Timer, step_progress
from ..table import read_meta, read_table
from .augment import BatchAugment
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Shard, decode_shard, epoch_indices, steps_per_epoch
from .optim import build_optimizer, lr_factor, param_groups, set_lr


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def to_input(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device, channels_last: bool,
             augment: BatchAugment | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> [0, 1] -> augmented -> normalised: the one preprocessing path."""
    x = x_uint8.to(device, non_blocking=True).float().div_(255)
    if augment is not None:
        x = augment(x, generator)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
    out, ckpt_dir = payload["out"], payload["checkpoint_dir"]
    channels, size, num_classes = payload["channels"], tuple(payload["size"]), payload["num_classes"]
    device = ctx.device
    t_load = time.perf_counter()
    shard, splits = decode_shard(batches, channels, size)
    split_t = [s == cfg.train_split for s in splits]
    train_mask = torch.tensor(split_t, dtype=torch.bool) & (shard.labels >= 0)
    train = shard.subset(train_mask)
    evals = shard.subset(torch.tensor([s == cfg.eval_split for s in splits], dtype=torch.bool) & (shard.labels >= 0))
    del shard
    if len(train) and int(train.labels.max()) >= num_classes:
        raise ValueError(f"label {int(train.labels.max())} is out of range for {num_classes} classes")
    counts = D.all_reduce_sum(torch.tensor([len(train), len(evals)], dtype=torch.float64))
    least = D.all_reduce_min(torch.tensor([len(train)], dtype=torch.float64))
    if counts[0] == 0:
        raise ValueError(f"no labelled rows in split {cfg.train_split!r} to train on")
    if least[0] == 0:
        raise ValueError(f"a rank got no training rows: {int(counts[0])} rows is too few for {ctx.world_size} workers")
    # Per-channel mean/std of the training pixels, over all ranks (the preprocessing spec).
    px = train.images.to(torch.float64).div_(255)
    stats = torch.cat([px.sum(dim=(0, 2, 3)), (px * px).sum(dim=(0, 2, 3)), torch.tensor([px[:, 0].numel()])])
    del px
    stats = D.all_reduce_sum(stats)
    n_px = stats[-1]
    mean_v = (stats[:channels] / n_px)
    std_v = (stats[channels : 2 * channels] / n_px - mean_v**2).clamp_min(1e-12).sqrt()
    load_s = time.perf_counter() - t_load

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes, channels, **payload["model_kwargs"])
    optimizer = build_optimizer(param_groups(model, cfg.weight_decay), cfg.optimizer, cfg.lr, cfg.weight_decay,
                                cfg.momentum)
    start_epoch, history = 0, []
    if cfg.resume or ctx.attempt > 0:
        meta = load_checkpoint(ckpt_dir, model, optimizer)
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
    total_steps = steps * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * steps)
    augment = BatchAugment(cfg.augment)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_epoch * steps)
    aug_gen = torch.Generator()

    for epoch in range(start_epoch, cfg.epochs):
        aug_gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + ctx.rank)
        idx = epoch_indices(len(train), steps, local_batch, cfg.seed, epoch, ctx.rank)
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        lr = cfg.lr
        for s in range(steps):
            b = idx[s]
            x = to_input(train.images[b], mean, std, device, cfg.channels_last, augment, aug_gen)
            y = train.labels[b].to(device, non_blocking=True)
            lr = set_lr(optimizer, cfg.lr, lr_factor(epoch * steps + s, total_steps, cfg.schedule, warmup_steps))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double().cpu()
            if ctx.is_main and (s % 20 == 0 or s == steps - 1):
                el = time.perf_counter() - t0
                _write_json_atomic(os.path.join(out, "progress.json"), {
                    "epoch": epoch + 1, "epochs": cfg.epochs, "step": s + 1, "steps": steps,
                    "loss": float(loss.detach()), "images_per_s": (s + 1) * cfg.batch_size / max(el, 1e-9),
                })
        epoch_time = time.perf_counter() - t0
        train_loss = float(D.all_reduce_sum(loss_sum.clone()) / (steps * ctx.world_size))
        ev = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
        if counts[1] > 0:
            c, n, ls = evaluate_shard(net.module if ctx.world_size > 1 else net, evals, mean, std, device,
                                      cfg.channels_last)
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
        if ctx.is_main:
            assert writer is not None
            writer.add_scalar("loss/train", train_loss, epoch + 1)
            if row["test_acc"] is not None:
                writer.add_scalar("accuracy/test", row["test_acc"], epoch + 1)
                writer.add_scalar("loss/test", row["test_loss"], epoch + 1)
            writer.add_scalar("throughput/images_per_s", row["images_per_s"], epoch + 1)
            writer.add_scalar("throughput/epoch_time_s", epoch_time, epoch + 1)
            writer.add_scalar("lr", lr, epoch + 1)
            writer.flush()
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            save_checkpoint(ckpt_dir, epoch + 1, net, optimizer,
                            {"history": history, "mean": mean_v.tolist(), "std": std_v.tolist(), "step": (epoch + 1) * steps},
                            keep=cfg.keep_checkpoints)
        if D.world_size() > 1:
            torch.distributed.barrier()  # checkpoint written before anyone moves on
    if writer is not None:
        writer.close()
    if not ctx.is_main:
        return None
    target = net.module if ctx.world_size > 1 else net
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in target.state_dict().items()})
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


def _model_kwargs(cfg: TrainConfig, size: tuple[int, int]) -> dict[str, Any]:
    """The model's kwargs plus the input size for factories that declare ``image_size``."""
    import inspect

    from ..models.registry import _REGISTRY, _load_builtin

    _load_builtin()
    kw = dict(cfg.model_kwargs)
    factory = _REGISTRY.get(cfg.model)
    if factory is not None and "image_size" in inspect.signature(factory).parameters:
        kw.setdefault("image_size", size[0])
    return kw


def _follow_progress(out: str, stop: threading.Event) -> None:
    path = os.path.join(out, "progress.json")
    with step_progress("train", None) as advance:
        while not stop.wait(0.5):
            try:
                with open(path) as f:
                    p = json.load(f)
            except (OSError, ValueError):
                continue
            done = (p["epoch"] - 1) * p["steps"] + p["step"]
            advance(completed=done, note=f"epoch {p['epoch']}/{p['epochs']} loss {p['loss']:.3f} "
                                         f"{p['images_per_s']:.0f} img/s")


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
    out = os.path.abspath(out)
    ckpt_dir = os.path.join(out, "checkpoints")
    if not cfg.resume:
        for stale in ("checkpoints", "tensorboard"):
            shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
        for stale in ("metrics.jsonl", "progress.json"):
            if os.path.exists(os.path.join(out, stale)):
                os.remove(os.path.join(out, stale))
    elif not list_checkpoints(ckpt_dir):
        raise ValueError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
    os.makedirs(out, exist_ok=True)
    channels, size = infer_image_spec(df, cfg)
    model_kwargs = _model_kwargs(cfg, size)
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
    stop = threading.Event()
    follower = threading.Thread(target=_follow_progress, args=(out, stop), daemon=True)
    follower.start()
    try:
        result = D.run_on_barrier(
            spark, df.select("image", "label", "split"), cfg.workers, _rank_main, payload,
            threads_per_rank=cfg.threads_per_rank, repartition=repartition,
        )
    finally:
        stop.set()
        follower.join(timeout=2)
    info, blobs = D.decode_result(result)
    from safetensors.torch import load as st_load

    model = create_model(cfg.model, len(class_names), channels, **model_kwargs)
    model.load_state_dict(st_load(blobs["weights"]))
    model_kwargs = {**model_kwargs, **getattr(model, "arch", {})}
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
