"""One rank of a training run on Spark: the set-up, epoch loop and result every method shares.

Supervised training (``train.engine``), self-supervised pretraining (``ssl.pretrain``) and
fine-tuning (``ssl.finetune``) each subclass :class:`RankTraining` and say only what is their
own: which rows of the shard they use, the module they train, a step's loss and the end-of-epoch
evaluation. Everything else happens here once, the same way for all of them, so a fix to resume,
seeding or logging reaches every method: the shard is decoded once, the pixel statistics are
taken over all ranks, the seed is set before the module is built, the latest checkpoint is
resumed, the module goes to the rank's device behind DDP, every epoch walks the same
equal-steps-per-rank plan, rank 0 logs (progress file, TensorBoard, ``metrics.jsonl``) and
checkpoints, and finally returns the weights to the driver.

The process group, the device and the rank's torch threads are set up by
:func:`sparkvision.spark.distributed.run_on_barrier` before :meth:`RankTraining.main` runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow as pa
import torch
from safetensors.torch import save as st_save
from torch.nn.parallel import DistributedDataParallel

from sparkvision.data.images import pixel_dtype
from sparkvision.models.modeldir import resize_policy
from sparkvision.spark import distributed as D
from sparkvision.train.checkpoint import Restored, load_checkpoint
from sparkvision.train.data import Shard, epoch_indices, load_shard, pixel_stats, steps_per_epoch, warn_failed
from sparkvision.train.loop import (
    EpochStart,
    RankLog,
    Snapshot,
    rank_state,
    restore_rank_state,
    run_epoch,
)
from sparkvision.train.optim import build_optimizer
from sparkvision.train.outputs import rank_stores, upload_results


def state_bytes(module: torch.nn.Module) -> bytes:
    """``module``'s weights as safetensors bytes: what a rank sends back to the driver."""
    return st_save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


def stats_tensor(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-channel statistics as a ``(1, C, 1, 1)`` float tensor on ``device``, ready to broadcast."""
    return torch.as_tensor(values, dtype=torch.float64).float().view(1, -1, 1, 1).to(device)


class RankTraining:
    """The per-rank skeleton of a training run; subclasses fill in the hooks.

    The payload carries at least ``cfg`` (the method's config as JSON), ``out``,
    ``checkpoint_dir``, ``channels``, ``size`` and ``num_classes``. The config needs the fields
    ``seed, epochs, batch_size, optimizer, lr, weight_decay, momentum, schedule, warmup_epochs,
    resume, keep_checkpoints, cache``.

    Set by the skeleton for the hooks to use: ``rows`` (the rows an epoch walks over),
    ``counts`` (global row counts from :meth:`select`), ``mean_v``/``std_v`` (float64 per-channel
    statistics) and ``mean``/``std`` (the same on the device, ``(1, C, 1, 1)``), ``module`` (what
    :meth:`build` returned), ``net`` (``module`` behind DDP on more than one rank), ``optimizer``,
    ``steps``, ``history``, ``start_epoch`` and ``gen`` (the augmentation generator, re-seeded
    every epoch from the seed, the epoch and the rank).
    """

    config_class: ClassVar[Any]  # the config dataclass, with from_json
    channels_last: bool = False  # module and inputs in channels-last memory format
    bf16: bool = False  # bf16 autocast (on GPU only)
    train_mode: bool = True  # net.train(train_mode) before every epoch
    # Columns beyond image/label/split the method reads (``Shard.extra``); the driver's ``launch``
    # must be given the same ones (its ``columns``) so they reach the ranks.
    extra_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: D.RankContext, payload: dict[str, Any]) -> None:
        self.ctx, self.payload, self.device = ctx, payload, ctx.device
        self.cfg = self.config_class.from_json(payload["cfg"])
        self.channels, self.size = int(payload["channels"]), tuple(payload["size"])
        self.num_classes = int(payload["num_classes"])
        self.pixel_dtype = pixel_dtype(payload.get("pixel_dtype", "uint8"))  # "float32": a float table
        self.resize = resize_policy(payload.get("resize", "stretch"))  # how rows meet self.size

    @classmethod
    def main(
        cls, ctx: D.RankContext, batches: Iterator[pa.RecordBatch], payload: dict[str, Any]
    ) -> bytes | None:
        """The ``rank_fn`` of :func:`~sparkvision.spark.distributed.run_on_barrier`."""
        rank = cls(ctx, payload)
        try:
            return rank.run(batches)
        finally:
            rank.close()

    def close(self) -> None:
        """Release the shard's stream store (decode threads, local file), also after a failure."""
        if getattr(self, "rows", None) is not None and self.rows.store is not None:
            warn_failed(self.rows)
            self.rows.store.close()

    # ------------------------------------------------------------------ hooks
    def select(self, shard: Shard, splits: list[str]) -> tuple[Shard, torch.Tensor]:
        """Keep the rows the method uses (as attributes) and check there are enough on every rank.

        Returns the rows an epoch walks over and the global row counts (all-reduced; the first
        is the epoch rows' total, which sets the steps per epoch).
        """
        raise NotImplementedError

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean/std of the inputs (the model's preprocessing); every rank calls it."""
        return pixel_stats(self.rows.images, self.channels)

    def build(self) -> tuple[torch.nn.Module, list[dict]]:
        """The module to train (seeded) and its optimizer parameter groups."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Anything built after the module is on its device (losses, teachers, view makers)."""

    def pretrain(self) -> list[dict[str, Any]]:
        """Unsupervised pretraining of the built module before the first epoch (a DBN's layer-wise
        RBMs), on a fresh start only: a resumed run's checkpoint holds the pretrained weights.
        Returns its log rows (rank 0's result ``pretrain``)."""
        return []

    def step_loss(self, b: torch.Tensor) -> torch.Tensor:
        """The loss of one step on the epoch rows ``b`` (this rank's indices into ``rows``)."""
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> None:
        """Reset per-epoch state before the epoch's steps."""

    def end_epoch(self, epoch: int) -> tuple[dict[str, Any], dict[str, float | None]]:
        """Evaluation after the epoch: its ``metrics.jsonl`` fields and TensorBoard scalars."""
        return {}, {}

    def checkpoint_extra(self) -> dict[str, Any]:
        """More JSON for the checkpoint, beside the history and the pixel statistics."""
        return {}

    def epoch_state(self) -> dict[str, torch.Tensor]:
        """This rank's state within an epoch beyond its RNGs (sums :meth:`end_epoch` reduces, the
        method's own generators), saved by a mid-epoch checkpoint."""
        return {}

    def load_epoch_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`epoch_state` saved, when an epoch resumes mid-way."""

    def result(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Rank 0's result for the driver, beside the history and statistics: info and blobs."""
        return {}, {"weights": state_bytes(self.module)}

    # ------------------------------------------------------------------ skeleton
    def run(self, batches: Iterator[pa.RecordBatch]) -> bytes | None:
        cfg, ctx = self.cfg, self.ctx
        t_load = time.perf_counter()
        shard, splits = load_shard(
            batches,
            self.channels,
            self.size,
            cfg.cache,
            ctx.threads,
            extra_columns=self.extra_columns,
            pixel_dtype=self.pixel_dtype,
            resize=self.resize,
        )
        self.rows, self.counts = self.select(shard, splits)
        del shard, splits
        self.mean_v, self.std_v = self.stats()
        load_s = time.perf_counter() - t_load

        torch.manual_seed(cfg.seed)
        self.module, groups = self.build()
        self.optimizer = build_optimizer(groups, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
        self.store, self.checkpoints = rank_stores(self.payload)
        self.start_epoch, self.history = self.resume()
        self.module.to(self.device)
        if self.channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.net = DistributedDataParallel(self.module) if ctx.world_size > 1 else self.module
        self.mean, self.std = stats_tensor(self.mean_v, self.device), stats_tensor(self.std_v, self.device)
        self.steps = steps_per_epoch(int(self.counts[0]), cfg.batch_size)
        local_batch = cfg.batch_size // ctx.world_size
        autocast = self.device.type if self.bf16 and self.device.type == "cuda" else None
        log = RankLog(
            ctx,
            self.store,
            cfg.epochs,
            self.steps,
            cfg.batch_size,
            self.start_epoch,
            cfg.keep_checkpoints,
            self.history,
            cfg.checkpoint_every,
            self.snapshot,
            resumed=self.restored is not None,
            checkpoints=self.checkpoints,
        )
        self.gen = torch.Generator()
        self.prepare()
        pretrained = self.pretrain() if self.restored is None else []
        # A reshuffling run (``reshuffle``) is one job per epoch: the driver deals the rows afresh
        # and says where this job stops; the epoch's checkpoint carries the run to the next job.
        stop = min(cfg.epochs, int(self.payload.get("stop_epoch") or cfg.epochs))
        for epoch in range(self.start_epoch, stop):
            self.gen.manual_seed(cfg.seed * 100003 + epoch * 1009 + ctx.rank)
            self.begin_epoch(epoch)
            start = self.restart_point(epoch)
            idx = epoch_indices(len(self.rows), self.steps, local_batch, cfg.seed, epoch, ctx.rank)
            self.rows.plan(idx, start.step)  # the stream cache decodes ahead along the epoch's plan
            self.net.train(self.train_mode)
            train_loss, lr, epoch_time = run_epoch(
                self.optimizer,
                self.step_loss,
                idx,
                epoch,
                cfg.lr,
                cfg.schedule,
                self.steps * cfg.epochs,
                int(cfg.warmup_epochs * self.steps),
                log,
                autocast,
                start,
            )
            fields, scalars = self.end_epoch(epoch)
            images_per_s = round(self.steps * cfg.batch_size / epoch_time, 1)
            row = {
                "epoch": epoch + 1,
                "train_loss": round(train_loss, 5),
                **fields,
                "images_per_s": images_per_s,
                "epoch_time_s": round(epoch_time, 3),
                "lr": lr,
            }
            self.history.append(row)
            log.epoch_end(
                row,
                {
                    "loss/train": train_loss,
                    **scalars,
                    "throughput/images_per_s": images_per_s,
                    "throughput/epoch_time_s": epoch_time,
                    "lr": lr,
                },
            )
        log.close()
        if not ctx.is_main:
            return None
        done = stop >= cfg.epochs
        info, blobs = self.result() if done else ({}, {})
        files = upload_results(self.store, blobs)  # through the sink: the result row stays small
        return D.encode_result(
            {
                "history": self.history,
                "mean": self.mean_v.tolist(),
                "std": self.std_v.tolist(),
                "pixel_dtype": self.pixel_dtype,
                "load_s": round(load_s, 3),
                "steps_per_epoch": self.steps,
                "threads_per_rank": ctx.threads,
                "start_epoch": self.start_epoch,
                "cache": self.rows.cache,
                "files": files,
                "done": done,
                "skipped_checkpoints": self.skipped,
                "pretrain": pretrained,
                **info,
            },
        )

    def resume(self) -> tuple[int, list[dict[str, Any]]]:
        """``(start epoch, history)`` from the latest whole checkpoint when resuming (or when
        Spark re-runs a failed stage, or the driver relaunches the job after a lost rank),
        restoring module, optimizer and pixel statistics; else a fresh start. A mid-epoch
        checkpoint's step and rank states are kept in ``restored`` for :meth:`restart_point`."""
        self.restored: Restored | None = None
        self.skipped: list[str] = []
        if not (self.cfg.resume or self.payload.get("resume") or self.ctx.attempt > 0):
            return 0, []
        found = load_checkpoint(self.checkpoints, self.module, self.optimizer)
        if found is None:
            return 0, []
        self.restored, self.skipped, meta = found, found.skipped, found.meta
        if "mean" in meta:
            self.mean_v = torch.tensor(meta["mean"], dtype=torch.float64)
            self.std_v = torch.tensor(meta["std"], dtype=torch.float64)
        return found.epoch, list(meta.get("history", []))

    def restart_point(self, epoch: int) -> EpochStart:
        """Where ``epoch`` starts: on the epoch a checkpoint interrupted, its step, with this
        rank's RNG states and epoch sums as they were (same batches, same random draws as the
        run that was interrupted); else step 0."""
        found = self.restored
        if found is None or epoch != found.epoch:
            return EpochStart()
        self.restored = None
        start, method = restore_rank_state(
            found.ranks.get(self.ctx.rank), found.epoch_step, self.gen, self.device
        )
        if method:
            self.load_epoch_state(method)
        return start

    def snapshot(self) -> Snapshot:
        """What a checkpoint saves now (see :class:`~sparkvision.train.loop.RankLog`)."""
        meta = {
            "history": self.history,
            "mean": self.mean_v.tolist(),
            "std": self.std_v.tolist(),
            **self.checkpoint_extra(),
        }
        return self.module, self.optimizer, meta, rank_state(self.gen, self.epoch_state(), self.device)


def check_rows(local: int, counts: torch.Tensor, ctx: D.RankContext, none: str, too_few: str) -> None:
    """Refuse to start when there is no row at all (``none``) or a rank got none (``too_few``,
    formatted with ``rows`` and ``workers``): an empty rank would stall its peers' all-reduces."""
    least = D.all_reduce_min(torch.tensor([local], dtype=torch.float64))
    if counts[0] == 0:
        raise ValueError(none)
    if least[0] == 0:
        raise ValueError(too_few.format(rows=int(counts[0]), workers=ctx.world_size))
