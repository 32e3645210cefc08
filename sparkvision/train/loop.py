"""The epoch of a rank and its record, shared by every training method (see ``train.rank``).

:func:`run_epoch` is the optimisation loop over one epoch plan; :class:`RankLog` writes the
progress file the driver's bar polls, TensorBoard events, ``metrics.jsonl`` and checkpoints, all
by rank 0 only (every rank waits for the checkpoint before the next epoch).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from sparkvision.spark import distributed as D
from sparkvision.train.checkpoint import save_checkpoint
from sparkvision.train.optim import lr_factor, set_lr

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"


def write_json_atomic(path: str, obj: Any) -> None:
    """Readers polling ``path`` (the driver's progress bar, the web job runner) never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class RankLog:
    """Rank 0's record of a run; the other ranks only join the checkpoint barrier."""

    def __init__(
        self,
        ctx: D.RankContext,
        out: str,
        checkpoint_dir: str,
        epochs: int,
        steps: int,
        batch_size: int,
        start_epoch: int = 0,
        keep_checkpoints: int = 2,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        self.ctx, self.out, self.checkpoint_dir = ctx, out, checkpoint_dir
        self.epochs, self.steps, self.batch_size, self.keep = epochs, steps, batch_size, keep_checkpoints
        self.writer = None
        if ctx.is_main and start_epoch > 0:
            # A run killed between appending an epoch's row and saving its checkpoint would list
            # that epoch twice after resuming: the checkpoint's history is what happened.
            with open(os.path.join(out, METRICS_FILE), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in history or [])
        if ctx.is_main:
            self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_epoch * steps)

    def step(self, epoch: int, step: int, loss: torch.Tensor, elapsed: float) -> None:
        """Live progress (every 20 steps and the last): what the driver's bar and the web show."""
        if self.ctx.is_main and (step % 20 == 0 or step == self.steps - 1):
            write_json_atomic(
                os.path.join(self.out, PROGRESS_FILE),
                {
                    "epoch": epoch + 1,
                    "epochs": self.epochs,
                    "step": step + 1,
                    "steps": self.steps,
                    "loss": float(loss.detach()),
                    "images_per_s": (step + 1) * self.batch_size / max(elapsed, 1e-9),
                },
            )

    def epoch_end(
        self,
        row: dict[str, Any],
        scalars: dict[str, float | None],
        net: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        checkpoint_meta: dict[str, Any],
    ) -> None:
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
            save_checkpoint(
                self.checkpoint_dir,
                epoch,
                net,
                optimizer,
                {**checkpoint_meta, "step": epoch * self.steps},
                keep=self.keep,
            )
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
        with torch.autocast(
            autocast_device or "cpu", dtype=torch.bfloat16, enabled=autocast_device is not None
        ):
            loss = step_loss(idx[s])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double().cpu()
        log.step(epoch, s, loss, time.perf_counter() - t0)
    epoch_time = time.perf_counter() - t0
    mean_loss = float(D.all_reduce_sum(loss_sum) / (steps * log.ctx.world_size))
    return mean_loss, lr, epoch_time
