"""Self-supervised pretraining on an image table's unlabelled rows, data-parallel on Spark.

It runs through the supervised engine's machinery: ``run_on_barrier`` (torch DDP on Spark barrier
tasks), the same in-memory shard decoding and equal-steps-per-rank epoch plan, safetensors
checkpoints with resume, TensorBoard events, ``metrics.jsonl`` and the live progress file. Each
epoch also logs the kNN monitor (labelled queries of ``monitor_split`` against a labelled bank of
``monitor_bank_split``) and the per-dimension std of the normalised projector outputs, warning on
collapse. The result is a plain model directory holding the encoder (its classifier head is an
untrained placeholder), usable by ``finetune``, ``embed`` and retrieval.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from .. import distributed as D
from ..modeldir import ModelSpec, Preprocess, save_model_dir
from ..models import create_model
from ..progress import Timer
from ..table import read_meta, read_table
from ..train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ..train.config import TrainConfig
from ..train.data import Shard, decode_shard, epoch_indices, steps_per_epoch
from ..train.engine import _follow_progress, _model_kwargs, _write_json_atomic, infer_image_spec
from ..train.optim import build_optimizer, lr_factor, param_groups, set_lr
from .methods import build_method
from .monitor import collapse_warning, knn_accuracy, normalized_std
from .presets import PretrainConfig, resolve
from .views import TwoViews


def pixel_stats(images: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of uint8 ``(N, C, H, W)`` pixels in [0, 1], summed over all ranks."""
    px = images.to(torch.float64).div_(255)
    stats = torch.cat([px.sum(dim=(0, 2, 3)), (px * px).sum(dim=(0, 2, 3)), torch.tensor([px[:, 0].numel()])])
    del px
    stats = D.all_reduce_sum(stats)
    mean = stats[:channels] / stats[-1]
    std = (stats[channels : 2 * channels] / stats[-1] - mean**2).clamp_min(1e-12).sqrt()
    return mean, std


def _split_mask(splits: list[str], name: str | None) -> torch.Tensor:
    return torch.tensor([s == name for s in splits], dtype=torch.bool)


@torch.no_grad()
def shard_features(encoder: torch.nn.Module, shard: Shard, mean, std, device, batch_size: int = 512) -> torch.Tensor:
    was = encoder.training
    encoder.eval()
    feats = [encoder.forward_features(((shard.images[i : i + batch_size].to(device).float() / 255) - mean) / std).cpu()
             for i in range(0, len(shard), batch_size)]
    encoder.train(was)
    return torch.cat(feats) if feats else torch.empty(0)


def _rank_pretrain(ctx: D.RankContext, batches: Iterator[pa.RecordBatch], payload: dict[str, Any]) -> bytes | None:
    from safetensors.torch import save as st_save
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.tensorboard import SummaryWriter

    cfg = PretrainConfig.from_json(payload["cfg"])
    out, ckpt_dir = payload["out"], payload["checkpoint_dir"]
    channels, size = payload["channels"], tuple(payload["size"])
    device = ctx.device
    t_load = time.perf_counter()
    shard, splits = decode_shard(batches, channels, size)
    pool = shard.subset(_split_mask(splits, cfg.pool_split))
    labelled = shard.labels >= 0
    world = ctx.world_size
    bank = shard.subset(_split_mask(splits, cfg.monitor_bank_split) & labelled)
    queries = shard.subset(_split_mask(splits, cfg.monitor_split) & labelled)
    bank = Shard(bank.images[: cfg.monitor_bank_rows // world], bank.labels[: cfg.monitor_bank_rows // world])
    queries = Shard(queries.images[: cfg.monitor_query_rows // world], queries.labels[: cfg.monitor_query_rows // world])
    del shard
    counts = D.all_reduce_sum(torch.tensor([len(pool), len(bank), len(queries)], dtype=torch.float64))
    least = D.all_reduce_min(torch.tensor([len(pool)], dtype=torch.float64))
    if counts[0] == 0:
        raise ValueError(f"no rows in split {cfg.pool_split!r} to pretrain on; choose the pool with --pool")
    if least[0] == 0:
        raise ValueError(f"a rank got no pool rows: {int(counts[0])} rows is too few for {world} workers")
    mean_v, std_v = pixel_stats(pool.images, channels)
    load_s = time.perf_counter() - t_load

    torch.manual_seed(cfg.seed)
    encoder = create_model(cfg.model, payload["num_classes"], channels, **payload["model_kwargs"])
    method = build_method(cfg.method, encoder, cfg.proj_dim, cfg.proj_hidden, cfg.proj_layers, cfg.temperature)
    optimizer = build_optimizer(param_groups(method, cfg.weight_decay), cfg.optimizer, cfg.lr, cfg.weight_decay,
                                cfg.momentum)
    start_epoch, history = 0, []
    if cfg.resume or ctx.attempt > 0:
        meta = load_checkpoint(ckpt_dir, method, optimizer)
        if meta is not None:
            start_epoch, history = int(meta["epoch"]), list(meta.get("history", []))
            mean_v, std_v = torch.tensor(meta["mean"], dtype=torch.float64), torch.tensor(meta["std"], dtype=torch.float64)
    method.to(device)
    net = DDP(method) if world > 1 else method
    mean = mean_v.float().view(1, -1, 1, 1).to(device)
    std = std_v.float().view(1, -1, 1, 1).to(device)
    local_batch = cfg.batch_size // world
    steps = steps_per_epoch(int(counts[0]), cfg.batch_size)
    total_steps = steps * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * steps)
    views = TwoViews(cfg.views)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_epoch * steps) if ctx.is_main else None
    gen = torch.Generator()
    proj_dim = cfg.proj_dim

    for epoch in range(start_epoch, cfg.epochs):
        gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + ctx.rank)
        idx = epoch_indices(len(pool), steps, local_batch, cfg.seed, epoch, ctx.rank)
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        std_sum = 0.0
        lr = cfg.lr
        for s in range(steps):
            x = pool.images[idx[s]].to(device, non_blocking=True).float().div_(255)
            v1, v2 = views(x, gen)  # (B, C, H, W) each
            v1, v2 = (v1 - mean) / std, (v2 - mean) / std
            lr = set_lr(optimizer, cfg.lr, lr_factor(epoch * steps + s, total_steps, cfg.schedule, warmup_steps))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, z = net(v1, v2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double().cpu()
            std_sum += normalized_std(z)
            if ctx.is_main and (s % 20 == 0 or s == steps - 1):
                el = time.perf_counter() - t0
                _write_json_atomic(os.path.join(out, "progress.json"), {
                    "epoch": epoch + 1, "epochs": cfg.epochs, "step": s + 1, "steps": steps,
                    "loss": float(loss.detach()), "images_per_s": (s + 1) * cfg.batch_size / max(el, 1e-9),
                })
        epoch_time = time.perf_counter() - t0
        red = D.all_reduce_sum(torch.tensor([float(loss_sum), std_sum], dtype=torch.float64))
        train_loss, out_std = float(red[0]) / (steps * world), float(red[1]) / (steps * world)
        knn = None
        if counts[1] > 0 and counts[2] > 0:
            # Each rank votes its queries against its own slice of the bank; the counts are summed.
            correct = torch.zeros(2, dtype=torch.float64)
            if len(bank) and len(queries):
                fb = shard_features(encoder, bank, mean, std, device)
                fq = shard_features(encoder, queries, mean, std, device)
                acc = knn_accuracy(fb, bank.labels, fq, queries.labels, k=cfg.knn_k)
                correct += torch.tensor([acc * len(queries), len(queries)], dtype=torch.float64)
            correct = D.all_reduce_sum(correct)
            knn = float(correct[0] / correct[1]) if correct[1] > 0 else None
        warning = collapse_warning(out_std, proj_dim, cfg.collapse_ratio)
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "knn_acc": None if knn is None else round(knn, 5),
            "output_std": round(out_std, 5),
            "output_std_x_sqrt_d": round(out_std * proj_dim**0.5, 4),
            "collapse_warning": warning,
            "images_per_s": round(steps * cfg.batch_size / epoch_time, 1),
            "epoch_time_s": round(epoch_time, 3),
            "lr": lr,
        }
        history.append(row)
        if ctx.is_main:
            assert writer is not None
            if warning:
                print(f"WARNING epoch {epoch + 1}: {warning}", flush=True)
            writer.add_scalar("loss/train", train_loss, epoch + 1)
            if knn is not None:
                writer.add_scalar("monitor/knn_acc", knn, epoch + 1)
            writer.add_scalar("monitor/output_std", out_std, epoch + 1)
            writer.add_scalar("monitor/output_std_x_sqrt_d", out_std * proj_dim**0.5, epoch + 1)
            writer.add_scalar("throughput/images_per_s", row["images_per_s"], epoch + 1)
            writer.add_scalar("throughput/epoch_time_s", epoch_time, epoch + 1)
            writer.add_scalar("lr", lr, epoch + 1)
            writer.flush()
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            save_checkpoint(ckpt_dir, epoch + 1, net, optimizer,
                            {"history": history, "mean": mean_v.tolist(), "std": std_v.tolist(),
                             "step": (epoch + 1) * steps, "method": cfg.method}, keep=cfg.keep_checkpoints)
        if D.world_size() > 1:
            torch.distributed.barrier()  # checkpoint written before anyone moves on
    if writer is not None:
        writer.close()
    if not ctx.is_main:
        return None
    encoder.reset_head(payload["num_classes"])  # a placeholder classifier: fine-tuning replaces it
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()})
    return D.encode_result(
        {"history": history, "mean": mean_v.tolist(), "std": std_v.tolist(), "pool_rows": int(counts[0]),
         "monitor_bank_rows": int(counts[1]), "monitor_query_rows": int(counts[2]), "load_s": round(load_s, 3),
         "steps_per_epoch": steps, "threads_per_rank": ctx.threads, "start_epoch": start_epoch},
        {"weights": weights},
    )


def pretrain(spark: SparkSession, table: str, out: str, method: str | None = None, preset: str = "cpu-small",
             **overrides: Any) -> dict[str, Any]:
    """Pretrain an encoder with ``method`` on ``table``'s ``pool_split`` rows; write model dir ``out``.

    ``overrides`` are :class:`PretrainConfig` fields (e.g. ``epochs=3``, ``pool_split="train"``,
    ``monitor_split="test"``, ``resume=True``); ``None`` keeps the preset's value.
    """
    cfg = resolve(preset, method=method, **overrides)
    meta = read_meta(spark, table)
    splits = sorted({cfg.pool_split, cfg.monitor_bank_split} | ({cfg.monitor_split} if cfg.monitor_split else set()))
    df = read_table(spark, table).where(F.col("split").isin(splits))
    return pretrain_df(spark, df, meta.class_names, out, cfg, preset)


def pretrain_df(spark: SparkSession, df, class_names: list[str], out: str, cfg: PretrainConfig,
                preset: str | None = None) -> dict[str, Any]:
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
    # The supervised engine's helpers read these TrainConfig fields only.
    tcfg = TrainConfig(model=cfg.model, model_kwargs=cfg.model_kwargs, image_size=cfg.image_size, channels=cfg.channels)
    channels, size = infer_image_spec(df, tcfg)
    model_kwargs = _model_kwargs(tcfg, size)
    num_classes = max(1, len(class_names))
    payload = {"cfg": cfg.to_json(), "out": out, "checkpoint_dir": ckpt_dir, "channels": channels,
               "size": list(size), "num_classes": num_classes, "model_kwargs": model_kwargs}
    resolved = {**cfg.to_json(), "preset": preset, "lr": cfg.lr, "channels": channels, "image_size": list(size)}
    with open(os.path.join(out, "pretrain_config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    stop = threading.Event()
    follower = threading.Thread(target=_follow_progress, args=(out, stop), daemon=True)
    follower.start()
    try:
        result = D.run_on_barrier(spark, df.select("image", "label", "split"), cfg.workers, _rank_pretrain, payload,
                                  threads_per_rank=cfg.threads_per_rank)
    finally:
        stop.set()
        follower.join(timeout=2)
    info, blobs = D.decode_result(result)
    from safetensors.torch import load as st_load

    encoder = create_model(cfg.model, num_classes, channels, **model_kwargs)
    encoder.load_state_dict(st_load(blobs["weights"]))
    history = info["history"]
    last = history[-1] if history else {}
    for h in history:
        if h.get("collapse_warning") and h["epoch"] > info["start_epoch"]:
            warnings.warn(f"epoch {h['epoch']}: {h['collapse_warning']}", stacklevel=2)
    metrics = {
        "method": cfg.method, "preset": preset, "epochs": len(history), "train_loss": last.get("train_loss"),
        "knn_acc": last.get("knn_acc"), "output_std": last.get("output_std"),
        "pool_rows": info["pool_rows"], "pool_split": cfg.pool_split,
        "images_per_s": round(sum(h["images_per_s"] for h in history) / max(1, len(history)), 1),
        "pretrain_time_s": round(sum(h["epoch_time_s"] for h in history), 1),
        "data_load_s": info["load_s"], "wall_s": round(timer.elapsed, 3), "workers": cfg.workers,
        "threads_per_rank": info["threads_per_rank"], "resumed_from_epoch": info["start_epoch"],
    }
    save_model_dir(out, encoder, ModelSpec(cfg.model, num_classes, channels, model_kwargs), class_names,
                   Preprocess(channels=channels, size=size, mean=tuple(info["mean"]), std=tuple(info["std"])),
                   {**metrics, "history": history}, extra={"ssl": resolved, "head": "untrained placeholder"})
    return {"model_dir": out, **metrics, "history": history}
