"""The epoch of a rank and its record, shared by every training method (see ``train.rank``).

:func:`run_epoch` is the optimisation loop over one epoch plan, from step 0 or from the step a
mid-epoch checkpoint stopped at; :class:`RankLog` is rank 0's record of the run, written to the
run's store (:mod:`sparkvision.spark.filestore`; on Spark the driver's output sink, so ``OUT`` may
be any URI): live progress, TensorBoard events, ``metrics.jsonl`` and checkpoints.

Every checkpoint (each epoch's end, and every ``checkpoint_every`` steps) is collective: every
rank hands over its state (RNG states, its partial epoch sums), rank 0 writes them with the
weights and optimizer state, and all wait for the write before the next step. That is what lets
a resumed run continue the interrupted epoch at the next step with the same data order and the
same random draws, as if it had not stopped.

``metrics.jsonl`` is rewritten whole from the run's history at each epoch's end and on resume, so
it always lists each finished epoch once. TensorBoard events are written to a local directory and
copied to ``OUT/tensorboard`` at each epoch's end (an event file is appended to, which object
stores cannot do); a resumed run's writer purges the steps after the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from sparkvision.spark import distributed as D
from sparkvision.spark.filestore import Store, scratch_dir, upload, write_bytes
from sparkvision.spark.sink import SinkStore
from sparkvision.train.checkpoint import save_checkpoint
from sparkvision.train.optim import lr_factor, set_lr

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"

# What a checkpoint takes from the rank: (module, optimizer, checkpoint JSON, this rank's state).
Snapshot = tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any], dict[str, torch.Tensor]]


@dataclass
class EpochStart:
    """Where :func:`run_epoch` starts: step 0, or the step a mid-epoch checkpoint stopped at, with
    this rank's loss sum and the seconds spent over the steps before it."""

    step: int = 0
    loss_sum: float = 0.0
    elapsed: float = 0.0


def rank_state(
    gen: torch.Generator, method: dict[str, torch.Tensor], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """This rank's state for a checkpoint: the augmentation generator's state, torch's global RNG
    state (dropout, random init of anything built later) and the method's epoch state."""
    state = {"gen": gen.get_state(), "torch_rng": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return {**state, **{f"m/{k}": v for k, v in method.items()}}


def restore_rank_state(
    saved: dict[str, torch.Tensor] | None,
    step: int,
    gen: torch.Generator,
    device: torch.device | None = None,
) -> tuple[EpochStart, dict[str, torch.Tensor]]:
    """Put back this rank's state from a checkpoint taken ``step`` steps into an epoch, after the
    epoch's own seeding: ``(where the epoch starts, the method's epoch state)``. The global RNG is
    restored at every checkpoint; the generator and epoch sums only mid-epoch (an epoch's start
    re-seeds them). ``saved`` is None when the checkpoint had fewer ranks than this run: the
    epoch then goes on at ``step`` with this rank's fresh state."""
    if saved is None:
        return EpochStart(step), {}
    torch.set_rng_state(saved["torch_rng"])
    if device is not None and device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)
    if step == 0:
        return EpochStart(), {}
    gen.set_state(saved["gen"])
    method = {k[2:]: v for k, v in saved.items() if k.startswith("m/")}
    return EpochStart(step, float(saved["loss_sum"][0]), float(saved["elapsed"][0])), method


def gather_states(state: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Every rank's ``state``, on rank 0 (empty elsewhere): a collective call."""
    if D.world_size() == 1:
        return {0: state}
    found: list[Any] | None = [None] * D.world_size() if D.is_main() else None
    torch.distributed.gather_object(state, found, dst=0)
    return {r: s for r, s in enumerate(found or [])}


class RankLog:
    """Rank 0's record of a run in ``store`` (the run's ``OUT``); the other ranks only take part in
    checkpoints. ``snapshot`` gives what a checkpoint saves (see :data:`Snapshot`)."""

    def __init__(
        self,
        ctx: D.RankContext,
        store: Store,
        epochs: int,
        steps: int,
        batch_size: int,
        start_epoch: int = 0,
        keep_checkpoints: int = 2,
        history: list[dict[str, Any]] | None = None,
        checkpoint_every: int = 0,
        snapshot: Callable[[], Snapshot] | None = None,
        resumed: bool = False,
        checkpoints: Store | None = None,
    ) -> None:
        self.ctx, self.store = ctx, store
        self.checkpoints = checkpoints if checkpoints is not None else store.child(CHECKPOINT_DIR)
        self.epochs, self.steps, self.batch_size, self.keep = epochs, steps, batch_size, keep_checkpoints
        self.every, self.snapshot = checkpoint_every, snapshot
        self.board: _Board | None = None
        if ctx.is_main:
            if resumed or start_epoch > 0:
                # A run killed between writing an epoch's row and its checkpoint would list that
                # epoch twice after resuming: the checkpoint's history is what happened.
                self.write_metrics(history or [])
            # Scalars are logged per epoch (step = epoch number): a resumed run purges the epochs
            # after its checkpoint from the event files written before.
            self.board = _Board(store, start_epoch + 1 if resumed or start_epoch > 0 else None)

    def step(self, epoch: int, step: int, loss: torch.Tensor, elapsed: float) -> None:
        """Live progress (every 20 steps and the last): what the driver's bar and the web show."""
        if self.ctx.is_main and (step % 20 == 0 or step == self.steps - 1):
            progress = {
                "epoch": epoch + 1,
                "epochs": self.epochs,
                "step": step + 1,
                "steps": self.steps,
                "loss": float(loss.detach()),
                "images_per_s": (step + 1) * self.batch_size / max(elapsed, 1e-9),
            }
            if isinstance(self.store, SinkStore):
                self.store.progress(progress)
            else:
                write_bytes(self.store, PROGRESS_FILE, json.dumps(progress).encode())

    def step_done(self, epoch: int, done: int, loss_sum: torch.Tensor, elapsed: float) -> None:
        """After ``done`` steps of ``epoch``: a mid-epoch checkpoint every ``checkpoint_every``
        global steps (the epoch's last step is left to the epoch's own checkpoint)."""
        if self.every > 0 and done < self.steps and (epoch * self.steps + done) % self.every == 0:
            state = {
                "loss_sum": loss_sum.detach().double().reshape(1).clone(),
                "elapsed": torch.tensor([elapsed], dtype=torch.float64),
            }
            self.checkpoint(epoch, done, state)

    def epoch_end(self, row: dict[str, Any], scalars: dict[str, float | None]) -> None:
        """Log epoch ``row`` (TensorBoard ``scalars``, ``metrics.jsonl``) and checkpoint it."""
        epoch = int(row["epoch"])
        if self.board is not None:
            for name, value in scalars.items():
                if value is not None:
                    self.board.writer.add_scalar(name, value, epoch)
            self.board.sync()
        self.checkpoint(epoch, 0, {})

    def checkpoint(self, epoch: int, step: int, state: dict[str, torch.Tensor]) -> None:
        """Collective: every rank's state to rank 0, which writes checkpoint ``(epoch, step)``
        (and, at an epoch's end, ``metrics.jsonl`` from the history); then all go on."""
        assert self.snapshot is not None, "a RankLog that checkpoints needs a snapshot"
        model, optimizer, meta, own = self.snapshot()
        ranks = gather_states({**own, **state})
        if self.ctx.is_main:
            if step == 0:
                self.write_metrics(meta.get("history", []))
            save_checkpoint(
                self.checkpoints,
                epoch,
                model,
                optimizer,
                {
                    **meta,
                    "step": epoch * self.steps + step,
                    "steps_per_epoch": self.steps,
                    "world_size": self.ctx.world_size,
                },
                keep=self.keep,
                step=step,
                ranks=ranks,
            )
        if D.world_size() > 1:
            torch.distributed.barrier()  # checkpoint written before anyone moves on

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        write_bytes(self.store, METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history).encode())

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class _Board:
    """TensorBoard events written locally, copied to ``OUT/tensorboard`` on :meth:`sync`."""

    def __init__(self, store: Store, purge_step: int | None) -> None:
        self.store = store.child(TENSORBOARD_DIR)
        self.dir = tempfile.mkdtemp(prefix="sparkvision-tb-", dir=scratch_dir())
        self.writer = SummaryWriter(self.dir, purge_step=purge_step)
        self.sent: dict[str, int] = {}

    def sync(self) -> None:
        self.writer.flush()
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            size = os.path.getsize(path) if os.path.isfile(path) else -1
            if size >= 0 and self.sent.get(name) != size:
                upload(self.store, name, path)
                self.sent[name] = size

    def close(self) -> None:
        try:
            self.writer.close()
            self.sync()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


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
    start: EpochStart | None = None,
) -> tuple[float, float, float]:
    """One epoch: for each row of ``idx`` (the rank's sample indices per step) from ``start.step``
    on, set the scheduled LR, compute ``step_loss(indices)`` (under bf16 autocast on
    ``autocast_device`` if given), step.

    Returns ``(mean loss over all ranks and all the epoch's steps, last lr, epoch seconds)``; a
    resumed epoch counts the loss and seconds of its steps before ``start`` too.
    """
    start = start or EpochStart()
    steps = len(idx)
    t0 = time.perf_counter() - start.elapsed
    loss_sum = torch.tensor(start.loss_sum, dtype=torch.float64)
    lr = base_lr
    for s in range(start.step, steps):
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
        log.step_done(epoch, s + 1, loss_sum, time.perf_counter() - t0)
    epoch_time = time.perf_counter() - t0
    mean_loss = float(D.all_reduce_sum(loss_sum) / (steps * log.ctx.world_size))
    return mean_loss, lr, epoch_time
