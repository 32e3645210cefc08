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
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.spark import distributed as D
from sparkvision.models.modeldir import ModelSpec, Preprocess, save_model_dir
from sparkvision.models import create_model, model_kwargs_for
from sparkvision.spark.progress import Timer
from sparkvision.data.table import read_meta, read_table
from sparkvision.train.checkpoint import list_checkpoints, load_checkpoint
from sparkvision.train.config import TrainConfig
from sparkvision.train.data import Shard, decode_shard, epoch_indices, pixel_stats, split_mask, steps_per_epoch
from sparkvision.train.engine import infer_image_spec
from sparkvision.train.loop import RankLog, prepare_out, run_epoch, run_with_progress
from sparkvision.train.optim import build_optimizer, param_groups
from sparkvision.ssl.methods import build_method
from sparkvision.ssl.monitor import collapse_warning, knn_accuracy, normalized_std
from sparkvision.ssl.presets import PretrainConfig, resolve
from sparkvision.ssl.views import TwoViews


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

    cfg = PretrainConfig.from_json(payload["cfg"])
    out, ckpt_dir = payload["out"], payload["checkpoint_dir"]
    channels, size = payload["channels"], tuple(payload["size"])
    device = ctx.device
    t_load = time.perf_counter()
    shard, splits = decode_shard(batches, channels, size)
    pool = shard.subset(split_mask(splits, cfg.pool_split))
    labelled = shard.labels >= 0
    world = ctx.world_size
    bank = shard.subset(split_mask(splits, cfg.monitor_bank_split) & labelled)
    queries = shard.subset(split_mask(splits, cfg.monitor_split) & labelled)
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
    views = TwoViews(cfg.views)
    autocast = device.type if cfg.bf16 and device.type == "cuda" else None
    log = RankLog(ctx, out, ckpt_dir, cfg.epochs, steps, cfg.batch_size, start_epoch, cfg.keep_checkpoints)
    gen = torch.Generator()
    proj_dim = cfg.proj_dim
    std_sum = [0.0]  # per-dimension std of the normalised outputs, summed over the epoch's steps

    def step_loss(b: torch.Tensor) -> torch.Tensor:
        x = pool.images[b].to(device, non_blocking=True).float().div_(255)
        v1, v2 = views(x, gen)  # (B, C, H, W) each
        loss, z = net((v1 - mean) / std, (v2 - mean) / std)
        std_sum[0] += normalized_std(z)
        return loss

    for epoch in range(start_epoch, cfg.epochs):
        gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + ctx.rank)
        idx = epoch_indices(len(pool), steps, local_batch, cfg.seed, epoch, ctx.rank)
        net.train()
        std_sum[0] = 0.0
        train_loss, lr, epoch_time = run_epoch(optimizer, step_loss, idx, epoch, cfg.lr, cfg.schedule,
                                               steps * cfg.epochs, int(cfg.warmup_epochs * steps), log, autocast)
        out_std = float(D.all_reduce_sum(torch.tensor([std_sum[0]], dtype=torch.float64))[0]) / (steps * world)
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
        if ctx.is_main and warning:
            print(f"WARNING epoch {epoch + 1}: {warning}", flush=True)
        log.epoch_end(row, {"loss/train": train_loss, "monitor/knn_acc": knn, "monitor/output_std": out_std,
                            "monitor/output_std_x_sqrt_d": out_std * proj_dim**0.5,
                            "throughput/images_per_s": row["images_per_s"], "throughput/epoch_time_s": epoch_time,
                            "lr": lr},
                      net, optimizer, {"history": history, "mean": mean_v.tolist(), "std": std_v.tolist(),
                                       "method": cfg.method})
    log.close()
    if not ctx.is_main:
        return None
    encoder.reset_head(payload["num_classes"])  # a placeholder classifier: fine-tuning replaces it
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()})
    # The projector comes back with the encoder (not from the checkpoint files, which a driver on
    # another node may not see): SimCLRv2-style fine-tuning starts from its first layer(s).
    projector = st_save({k: v.detach().cpu().contiguous() for k, v in method.projector.state_dict().items()})
    return D.encode_result(
        {"history": history, "mean": mean_v.tolist(), "std": std_v.tolist(), "pool_rows": int(counts[0]),
         "monitor_bank_rows": int(counts[1]), "monitor_query_rows": int(counts[2]), "load_s": round(load_s, 3),
         "steps_per_epoch": steps, "threads_per_rank": ctx.threads, "start_epoch": start_epoch},
        {"weights": weights, "projector": projector},
    )


PROJECTOR_FILE = "projector.safetensors"


def export_projector(model_dir: str) -> str:
    """Write the pretraining projector's weights from the last checkpoint to ``PROJECTOR_FILE``:
    for encoder directories written before ``pretrain`` saved the projector itself.

    The encoder model directory holds the encoder only; SimCLRv2-style fine-tuning from the
    projector's first layer(s) (``finetune --projector-layers``) needs these too, and keeping them in
    their own file leaves the model directory loadable by every other command.
    """
    from safetensors import safe_open

    ckpt_dir = os.path.join(model_dir, "checkpoints")
    epochs = list_checkpoints(ckpt_dir)
    if not epochs:
        raise FileNotFoundError(f"no pretraining checkpoint in {ckpt_dir} to take the projector from")
    prefix = "model/projector."
    with safe_open(os.path.join(ckpt_dir, f"epoch-{epochs[-1]}.safetensors"), "pt") as f:
        tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not tensors:
        raise ValueError(f"checkpoint epoch-{epochs[-1]} in {ckpt_dir} has no projector weights")
    from safetensors.torch import save

    return _write_projector(model_dir, save(tensors))


def _write_projector(model_dir: str, data: bytes) -> str:
    """Write safetensors bytes (as the rank returns them) to ``PROJECTOR_FILE``, atomically."""
    path = os.path.join(model_dir, PROJECTOR_FILE)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return path


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
    out, ckpt_dir = prepare_out(out, cfg.resume)
    # infer_image_spec reads these TrainConfig fields only.
    tcfg = TrainConfig(model=cfg.model, model_kwargs=cfg.model_kwargs, image_size=cfg.image_size, channels=cfg.channels)
    channels, size = infer_image_spec(df, tcfg)
    model_kwargs = model_kwargs_for(cfg.model, cfg.model_kwargs, size[0])
    num_classes = max(1, len(class_names))
    payload = {"cfg": cfg.to_json(), "out": out, "checkpoint_dir": ckpt_dir, "channels": channels,
               "size": list(size), "num_classes": num_classes, "model_kwargs": model_kwargs}
    resolved = {**cfg.to_json(), "preset": preset, "lr": cfg.lr, "channels": channels, "image_size": list(size)}
    with open(os.path.join(out, "pretrain_config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    result = run_with_progress(spark, df.select("image", "label", "split"), cfg.workers, _rank_pretrain, payload, out,
                               threads_per_rank=cfg.threads_per_rank, label="pretrain")
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
    _write_projector(out, blobs["projector"])
    return {"model_dir": out, **metrics, "history": history}
