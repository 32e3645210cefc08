"""What every training loop on Spark shares: supervised training, self-supervised pretraining and
fine-tuning differ only in their step's loss and their end-of-epoch evaluation.

Driver side: :func:`prepare_out` (a fresh run clears stale outputs, ``resume`` needs a
checkpoint) and :func:`run_with_progress` (the barrier job, with a live progress bar fed by the
``progress.json`` rank 0 writes). Rank side: :func:`run_epoch` (the optimisation loop over one
epoch plan) and :class:`RankLog` (progress file, TensorBoard, ``metrics.jsonl`` and checkpoints,
written by rank 0 only; every rank waits for the checkpoint before the next epoch).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from pyspark.sql import DataFrame, SparkSession

from sparkvision.spark import distributed as D
from sparkvision.spark.progress import step_progress
from sparkvision.train.checkpoint import list_checkpoints, save_checkpoint
from sparkvision.train.optim import lr_factor, set_lr

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"


def write_json_atomic(path: str, obj: Any) -> None:
    """Readers polling ``path`` (the driver's progress bar, the web job runner) never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def prepare_out(out: str, resume: bool) -> tuple[str, str]:
    """``(out, checkpoint_dir)`` as absolute paths. A fresh run removes the outputs of an earlier
    one (its checkpoints would otherwise be resumed by a retried task); ``resume`` needs one."""
    out = os.path.abspath(out)
    ckpt_dir = os.path.join(out, "checkpoints")
    if not resume:
        for stale in ("checkpoints", "tensorboard"):
            shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
        for stale in (METRICS_FILE, PROGRESS_FILE):
            if os.path.exists(os.path.join(out, stale)):
                os.remove(os.path.join(out, stale))
    elif not list_checkpoints(ckpt_dir):
        raise ValueError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
    os.makedirs(out, exist_ok=True)
    return out, ckpt_dir


def _follow_progress(out: str, stop: threading.Event, label: str) -> None:
    path = os.path.join(out, PROGRESS_FILE)
    with step_progress(label, None) as advance:
        while not stop.wait(0.5):
            try:
                with open(path) as f:
                    p = json.load(f)
            except (OSError, ValueError):
                continue
            done = (p["epoch"] - 1) * p["steps"] + p["step"]
            advance(completed=done, note=f"epoch {p['epoch']}/{p['epochs']} loss {p['loss']:.3f} "
                                         f"{p['images_per_s']:.0f} img/s")


def run_with_progress(
    spark: SparkSession,
    df: DataFrame,
    workers: int,
    rank_fn: Callable[..., bytes | None],
    payload: dict[str, Any],
    out: str,
    threads_per_rank: int | None = None,
    repartition: bool = True,
    label: str = "train",
) -> bytes:
    """:func:`sparkvision.spark.distributed.run_on_barrier` with a progress bar that follows ``out``."""
    stop = threading.Event()
    follower = threading.Thread(target=_follow_progress, args=(out, stop, label), daemon=True)
    follower.start()
    try:
        return D.run_on_barrier(spark, df, workers, rank_fn, payload, threads_per_rank=threads_per_rank,
                                repartition=repartition)
    finally:
        stop.set()
        follower.join(timeout=2)


class RankLog:
    """Rank 0's record of a run; the other ranks only join the checkpoint barrier."""

    def __init__(self, ctx: D.RankContext, out: str, checkpoint_dir: str, epochs: int, steps: int,
                 batch_size: int, start_epoch: int = 0, keep_checkpoints: int = 2) -> None:
        self.ctx, self.out, self.checkpoint_dir = ctx, out, checkpoint_dir
        self.epochs, self.steps, self.batch_size, self.keep = epochs, steps, batch_size, keep_checkpoints
        self.writer = None
        if ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_epoch * steps)

    def step(self, epoch: int, step: int, loss: torch.Tensor, elapsed: float) -> None:
        """Live progress (every 20 steps and the last): what the driver's bar and the web show."""
        if self.ctx.is_main and (step % 20 == 0 or step == self.steps - 1):
            write_json_atomic(os.path.join(self.out, PROGRESS_FILE), {
                "epoch": epoch + 1, "epochs": self.epochs, "step": step + 1, "steps": self.steps,
                "loss": float(loss.detach()), "images_per_s": (step + 1) * self.batch_size / max(elapsed, 1e-9),
            })

    def epoch_end(self, row: dict[str, Any], scalars: dict[str, float | None], net: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, checkpoint_meta: dict[str, Any]) -> None:
        """Append ``row`` to metrics.jsonl, ``scalars`` to TensorBoard, save the checkpoint."""
        epoch = int(row["epoch"])
        if self.ctx.is_main:
            assert self.writer is not None
            for name, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(name, value, epoch)
            self.writer.flush()
            with open(os.path.join(self.out, METRICS_FILE), "a") as f:
                f.write(json.dumps(row) + "\n")
            save_checkpoint(self.checkpoint_dir, epoch, net, optimizer,
                            {**checkpoint_meta, "step": epoch * self.steps}, keep=self.keep)
        if D.world_size() > 1:
            torch.distributed.barrier()  # checkpoint written before anyone moves on

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run_epoch(
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    idx: torch.Tensor,
    epoch: int,
    base_lr: float,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    log: RankLog,
    autocast_device: str | None = None,
) -> tuple[float, float, float]:
    """One epoch: for each row of ``idx`` (the rank's sample indices per step) set the scheduled LR,
    compute ``step_loss(indices)`` (under bf16 autocast on ``autocast_device`` if given), step.

    Returns ``(mean loss over all ranks, last lr, epoch seconds)``.
    """
    steps = len(idx)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64)
    lr = base_lr
    for s in range(steps):
        lr = set_lr(optimizer, base_lr, lr_factor(epoch * steps + s, total_steps, schedule, warmup_steps))
        with torch.autocast(autocast_device or "cpu", dtype=torch.bfloat16, enabled=autocast_device is not None):
            loss = step_loss(idx[s])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double().cpu()
        log.step(epoch, s, loss, time.perf_counter() - t0)
    epoch_time = time.perf_counter() - t0
    mean_loss = float(D.all_reduce_sum(loss_sum) / (steps * log.ctx.world_size))
    return mean_loss, lr, epoch_time
