"""Where a training run's outputs go, on both sides of the barrier job.

Rank side: :func:`rank_stores` gives rank 0 (and every rank, to read a checkpoint on resume) the
run's ``OUT`` as a :class:`~sparkvision.spark.filestore.Store`: the driver's output sink when the
payload names one (always, on Spark), else the local directory itself (a rank run in-process, as
the unit tests do). :func:`upload_results` sends the final weights there in chunks, so the result
row the driver collects stays a few kilobytes of JSON whatever the model's size.

Driver side: :func:`prepare_outputs` clears a fresh run's stale outputs or checks that a resumed
one has a checkpoint, through the same store the sink serves.
"""

from __future__ import annotations

from typing import Any

from sparkvision.errors import ParamError
from sparkvision.models.modeldir import WEIGHTS
from sparkvision.spark.filestore import LocalStore, Store, write_bytes
from sparkvision.spark.sink import SinkStore
from sparkvision.train.checkpoint import list_checkpoints
from sparkvision.train.loop import CHECKPOINT_DIR, METRICS_FILE, PROGRESS_FILE, TENSORBOARD_DIR


def rank_stores(payload: dict[str, Any]) -> tuple[Store, Store]:
    """``(OUT, OUT's checkpoint directory)`` as this rank reaches them."""
    out, ckpt = str(payload["out"]).rstrip("/"), str(payload["checkpoint_dir"]).rstrip("/")
    ticket = payload.get("sink")
    if not ticket:
        return LocalStore(out), LocalStore(ckpt)
    store = SinkStore(ticket)
    if not ckpt.startswith(out + "/"):
        raise ValueError(f"checkpoint_dir {ckpt} is not inside out {out}")
    return store, store.child(ckpt[len(out) + 1 :])


def result_file(key: str) -> str:
    """The file in ``OUT`` of a rank's result blob: ``weights`` is the model directory's weights."""
    return WEIGHTS if key == "weights" else f"{key}.safetensors"


def upload_results(store: Store, blobs: dict[str, bytes]) -> dict[str, str]:
    """Write each blob to :func:`result_file` in ``store`` (in chunks; each replaces its file
    whole); returns the blob names' files, for the driver."""
    files = {}
    for key, data in blobs.items():
        write_bytes(store, result_file(key), data)
        files[key] = result_file(key)
    return files


def prepare_outputs(store: Store, resume: bool, where: str) -> None:
    """A fresh run removes an earlier run's checkpoints and logs (a relaunched job would resume
    them); a resumed one needs a checkpoint. ``where`` names ``OUT`` in the error."""
    if not resume:
        for stale in (CHECKPOINT_DIR, TENSORBOARD_DIR, METRICS_FILE, PROGRESS_FILE):
            store.delete(stale)
    elif not list_checkpoints(store.child(CHECKPOINT_DIR)):
        raise ParamError(
            "resume", f"no checkpoint in {where}/{CHECKPOINT_DIR} to resume from; start without resume"
        )
