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

import os
import warnings
from typing import Any

import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from safetensors import safe_open
from safetensors.torch import save as st_save

from sparkvision.data.table import read_meta, read_table
from sparkvision.models import ImageModel, create_model, model_kwargs_for
from sparkvision.models.modeldir import ModelSpec
from sparkvision.spark import distributed as D
from sparkvision.spark.progress import Timer
from sparkvision.ssl.methods import SSLMethod, build_method
from sparkvision.ssl.monitor import collapse_warning, knn_accuracy, normalized_std
from sparkvision.ssl.presets import PretrainConfig, resolve
from sparkvision.ssl.views import TwoViews
from sparkvision.train.checkpoint import list_checkpoints
from sparkvision.train.data import Shard, split_mask
from sparkvision.train.driver import (
    infer_image_spec,
    launch,
    prepare_out,
    rank_payload,
    run_metrics,
    save_trained,
)
from sparkvision.train.engine import to_input
from sparkvision.train.optim import param_groups
from sparkvision.train.rank import RankTraining, check_rows, state_bytes
from sparkvision.transforms.preprocess import normalize, to_unit


@torch.no_grad()
def shard_features(
    encoder: ImageModel, shard: Shard, mean, std, device, batch_size: int = 512
) -> torch.Tensor:
    """Encoder features of every image of ``shard`` (eval mode, then the mode it was in)."""
    was = encoder.training
    encoder.eval()
    feats = [
        encoder.forward_features(to_input(shard.images[i : i + batch_size], mean, std, device, False)).cpu()
        for i in range(0, len(shard), batch_size)
    ]
    encoder.train(was)
    return torch.cat(feats) if feats else torch.empty(0)


class PretrainRank(RankTraining):
    """A rank of self-supervised pretraining: two views of each ``pool_split`` row through the
    method's loss; after each epoch the kNN monitor and the collapse signal."""

    config_class = PretrainConfig
    module: SSLMethod  # what build() returns

    def __init__(self, ctx: D.RankContext, payload: dict[str, Any]) -> None:
        super().__init__(ctx, payload)
        self.bf16 = self.cfg.bf16

    def select(self, shard: Shard, splits: list[str]) -> tuple[Shard, torch.Tensor]:
        cfg, world = self.cfg, self.ctx.world_size
        pool = shard.subset(split_mask(splits, cfg.pool_split))
        labelled = shard.labels >= 0
        bank = shard.subset(split_mask(splits, cfg.monitor_bank_split) & labelled)
        queries = shard.subset(split_mask(splits, cfg.monitor_split) & labelled)
        self.bank = bank.head(cfg.monitor_bank_rows // world)  # views: the stream cache decodes nothing
        self.queries = queries.head(cfg.monitor_query_rows // world)
        counts = D.all_reduce_sum(
            torch.tensor([len(pool), len(self.bank), len(self.queries)], dtype=torch.float64)
        )
        check_rows(
            len(pool),
            counts,
            self.ctx,
            f"no rows in split {cfg.pool_split!r} to pretrain on; choose another pool_split",
            "a rank got no pool rows: {rows} rows is too few for {workers} workers",
        )
        return pool, counts

    def build(self) -> tuple[SSLMethod, list[dict]]:
        cfg = self.cfg
        self.encoder = create_model(
            cfg.model, self.num_classes, self.channels, **self.payload["model_kwargs"]
        )
        method = build_method(
            cfg.method, self.encoder, cfg.proj_dim, cfg.proj_hidden, cfg.proj_layers, cfg.temperature
        )
        return method, param_groups(method, cfg.weight_decay)

    def prepare(self) -> None:
        self.views = TwoViews(self.cfg.views)

    def begin_epoch(self, epoch: int) -> None:
        self.std_sum = 0.0  # per-dimension std of the normalised outputs, summed over the epoch's steps

    def epoch_state(self) -> dict[str, torch.Tensor]:
        return {"std_sum": torch.tensor([self.std_sum], dtype=torch.float64)}

    def load_epoch_state(self, state: dict[str, torch.Tensor]) -> None:
        self.std_sum = float(state["std_sum"][0])

    def step_loss(self, b: torch.Tensor) -> torch.Tensor:
        x = to_unit(self.rows.images[b].to(self.device, non_blocking=True))
        v1, v2 = self.views(x, self.gen)  # (B, C, H, W) each
        loss, z = self.net(
            normalize(v1, self.mean, self.std, False), normalize(v2, self.mean, self.std, False)
        )
        self.std_sum += normalized_std(z)
        return loss

    def end_epoch(self, epoch: int) -> tuple[dict[str, Any], dict[str, float | None]]:
        cfg, proj_dim = self.cfg, self.cfg.proj_dim
        out_std = float(D.all_reduce_sum(torch.tensor([self.std_sum], dtype=torch.float64))[0]) / (
            self.steps * self.ctx.world_size
        )
        knn = None
        if self.counts[1] > 0 and self.counts[2] > 0:
            # Each rank votes its queries against its own slice of the bank; the counts are summed.
            correct = torch.zeros(2, dtype=torch.float64)
            if len(self.bank) and len(self.queries):
                fb = shard_features(self.encoder, self.bank, self.mean, self.std, self.device)
                fq = shard_features(self.encoder, self.queries, self.mean, self.std, self.device)
                acc = knn_accuracy(fb, self.bank.labels, fq, self.queries.labels, k=cfg.knn_k)
                correct += torch.tensor([acc * len(self.queries), len(self.queries)], dtype=torch.float64)
            correct = D.all_reduce_sum(correct)
            knn = float(correct[0] / correct[1]) if correct[1] > 0 else None
        warning = collapse_warning(out_std, proj_dim, cfg.collapse_ratio)
        if self.ctx.is_main and warning:
            print(f"WARNING epoch {epoch + 1}: {warning}", flush=True)
        fields = {
            "knn_acc": None if knn is None else round(knn, 5),
            "output_std": round(out_std, 5),
            "output_std_x_sqrt_d": round(out_std * proj_dim**0.5, 4),
            "collapse_warning": warning,
        }
        return fields, {
            "monitor/knn_acc": knn,
            "monitor/output_std": out_std,
            "monitor/output_std_x_sqrt_d": out_std * proj_dim**0.5,
        }

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"method": self.cfg.method}

    def result(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        self.encoder.reset_head(self.num_classes)  # a placeholder classifier: fine-tuning replaces it
        # The projector comes back with the encoder (not from the checkpoint files, which a driver on
        # another node may not see): SimCLRv2-style fine-tuning starts from its first layer(s).
        return (
            {
                "pool_rows": int(self.counts[0]),
                "monitor_bank_rows": int(self.counts[1]),
                "monitor_query_rows": int(self.counts[2]),
            },
            {"weights": state_bytes(self.encoder), "projector": state_bytes(self.module.projector)},
        )


PROJECTOR_FILE = "projector.safetensors"


def export_projector(model_dir: str) -> str:
    """Write the pretraining projector's weights from the last checkpoint to ``PROJECTOR_FILE``:
    for encoder directories written before ``pretrain`` saved the projector itself.

    The encoder model directory holds the encoder only; SimCLRv2-style fine-tuning from the
    projector's first layer(s) (``finetune --projector-layers``) needs these too, and keeping them in
    their own file leaves the model directory loadable by every other command.
    """
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    names = list_checkpoints(ckpt_dir)
    if not names:
        raise FileNotFoundError(f"no pretraining checkpoint in {ckpt_dir} to take the projector from")
    prefix = "model/projector."
    with safe_open(os.path.join(ckpt_dir, f"{names[-1]}.safetensors"), "pt") as f:
        tensors = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not tensors:
        raise ValueError(f"checkpoint {names[-1]} in {ckpt_dir} has no projector weights")
    return write_projector(model_dir, st_save(tensors))


def write_projector(model_dir: str, data: bytes) -> str:
    """Write safetensors bytes (as the rank returns them) to ``PROJECTOR_FILE``, atomically."""
    path = os.path.join(model_dir, PROJECTOR_FILE)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return path


def pretrain(
    spark: SparkSession,
    table: str,
    out: str,
    method: str | None = None,
    preset: str = "cpu-small",
    **overrides: Any,
) -> dict[str, Any]:
    """Pretrain an encoder with ``method`` on ``table``'s ``pool_split`` rows; write model dir ``out``.

    ``overrides`` are :class:`PretrainConfig` fields (e.g. ``epochs=3``, ``pool_split="train"``,
    ``monitor_split="test"``, ``resume=True``); ``None`` keeps the preset's value.
    """
    cfg = resolve(preset, method=method, **overrides)
    meta = read_meta(spark, table)
    splits = sorted(
        {cfg.pool_split, cfg.monitor_bank_split} | ({cfg.monitor_split} if cfg.monitor_split else set())
    )
    df = read_table(spark, table).where(F.col("split").isin(splits))
    return pretrain_df(spark, df, meta.class_names, out, cfg, preset)


def pretrain_df(
    spark: SparkSession,
    df: DataFrame,
    class_names: list[str],
    out: str,
    cfg: PretrainConfig,
    preset: str | None = None,
) -> dict[str, Any]:
    """Pretrain on an image-table DataFrame (columns image, label, split, height, width, channels)."""
    cfg.validate()
    timer = Timer()
    out, ckpt_dir = prepare_out(out, cfg.resume)
    channels, size = infer_image_spec(df, cfg.channels, cfg.image_size)
    model_kwargs = model_kwargs_for(cfg.model, cfg.model_kwargs, size[0])
    num_classes = max(1, len(class_names))
    payload = rank_payload(cfg, out, ckpt_dir, channels, size, num_classes, model_kwargs=model_kwargs)
    resolved = {
        **cfg.to_json(),
        "preset": preset,
        "lr": cfg.lr,
        "channels": channels,
        "image_size": list(size),
    }
    info, blobs = launch(
        spark, df, cfg, PretrainRank.main, payload, "pretrain_config.json", resolved, label="pretrain"
    )
    history = info["history"]
    last = history[-1] if history else {}
    for h in history:
        if h.get("collapse_warning") and h["epoch"] > info["start_epoch"]:
            warnings.warn(f"epoch {h['epoch']}: {h['collapse_warning']}", stacklevel=2)
    metrics = {
        "method": cfg.method,
        "preset": preset,
        "train_loss": last.get("train_loss"),
        "knn_acc": last.get("knn_acc"),
        "output_std": last.get("output_std"),
        "pool_rows": info["pool_rows"],
        "pool_split": cfg.pool_split,
        "pretrain_time_s": round(sum(h["epoch_time_s"] for h in history), 1),
        **run_metrics(info, timer, cfg.workers),
    }
    save_trained(
        spark,
        out,
        ModelSpec(cfg.model, num_classes, channels, model_kwargs),
        blobs["weights"],
        class_names,
        size,
        info,
        {**metrics, "history": history},
        extra={"ssl": resolved, "head": "untrained placeholder"},
    )  # the projector: PROJECTOR_FILE, uploaded by rank 0 beside the weights
    return {"model_dir": out, **metrics, "history": history}
