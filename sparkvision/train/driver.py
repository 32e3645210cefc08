"""The driver's side of a training run on Spark, shared by training, pretraining and fine-tuning.

:func:`prepare_out` readies the output directory (a fresh run clears stale outputs, ``resume``
needs a checkpoint), :func:`infer_image_spec` reads the input size from the data when the config
leaves it open, :func:`launch` writes the run's config beside its outputs and runs the ranks in a
barrier job with a live progress bar fed by the ``progress.json`` rank 0 writes, and
:func:`save_trained` turns rank 0's weights into the model directory. :func:`run_metrics` gives
the facts every run reports the same way.

Spark does not retry a failed barrier stage, so :func:`launch` does what Ray Train's
``FailureConfig(max_failures)`` does: when a rank is lost with its executor or Python worker
(:class:`~sparkvision.spark.distributed.LostRanks`), it waits for the cluster to offer enough
slots again and relaunches the job with ``resume`` set, so every rank restarts from the last
checkpoint. After ``max_restarts`` the user gets one line saying how to continue by hand.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from safetensors.torch import load as st_load

from sparkvision.errors import JobFailed, ParamError
from sparkvision.models.modeldir import ModelSpec, Preprocess, save_model_dir
from sparkvision.spark import distributed as D
from sparkvision.spark.progress import Timer, step_progress
from sparkvision.train.checkpoint import list_checkpoints
from sparkvision.train.loop import METRICS_FILE, PROGRESS_FILE

log = logging.getLogger(__name__)

# How long a relaunch waits for the cluster to offer a slot per rank again (a standalone or YARN
# master replaces a dead executor in seconds; a new Kubernetes pod may take a minute).
RESTART_WAIT_S = float(os.environ.get("SPARKVISION_RESTART_WAIT_S", "300"))


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
        raise ParamError("resume", f"no checkpoint in {ckpt_dir} to resume from; start without resume")
    os.makedirs(out, exist_ok=True)
    return out, ckpt_dir


def infer_image_spec(
    df: DataFrame, channels: int | None = None, size: tuple[int, int] | None = None
) -> tuple[int, tuple[int, int]]:
    """``(channels, size)``: the given ones, else from the data (a tiny aggregate): the most common
    size, and 1 channel if every image is greyscale, else 3."""
    if channels is None or size is None:
        agg = df.groupBy("height", "width").agg(F.count("*").alias("n"), F.max("channels").alias("c"))
        rows = agg.orderBy(F.desc("n")).limit(1).collect()
        if not rows:
            raise ValueError("the table has no rows to train on")
        if size is None:
            size = (int(rows[0].height), int(rows[0].width))
        if channels is None:
            top = df.agg(F.max("channels")).first()
            assert top is not None  # a global aggregate has exactly one row
            max_c = top[0]
            channels = 1 if max_c == 1 else 3
    return int(channels), (int(size[0]), int(size[1]))


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
            advance(
                completed=done,
                note=f"epoch {p['epoch']}/{p['epochs']} loss {p['loss']:.3f} {p['images_per_s']:.0f} img/s",
            )


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
        return D.run_on_barrier(
            spark, df, workers, rank_fn, payload, threads_per_rank=threads_per_rank, repartition=repartition
        )
    finally:
        stop.set()
        follower.join(timeout=2)


def rank_payload(
    cfg: Any,
    out: str,
    checkpoint_dir: str,
    channels: int,
    size: tuple[int, int],
    num_classes: int,
    **extra: Any,
) -> dict[str, Any]:
    """What every rank of :class:`sparkvision.train.rank.RankTraining` reads, plus the method's ``extra``."""
    return {
        "cfg": cfg.to_json(),
        "out": out,
        "checkpoint_dir": checkpoint_dir,
        "channels": channels,
        "size": list(size),
        "num_classes": num_classes,
        **extra,
    }


def launch(
    spark: SparkSession,
    df: DataFrame,
    cfg: Any,
    rank_fn: Callable[..., bytes | None],
    payload: dict[str, Any],
    config_file: str,
    config: dict[str, Any],
    label: str = "train",
    repartition: bool = True,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Write ``config`` to ``payload["out"]/config_file`` (what was run, beside what it produced),
    run ``rank_fn`` on ``cfg.workers`` ranks over ``df``'s image rows and return rank 0's decoded
    result ``(info, blobs)``. The rank threads come from ``cfg.threads_per_rank`` (None: the
    cores of a task), handed to the ranks as an argument."""
    out = payload["out"]
    with open(os.path.join(out, config_file), "w") as f:
        json.dump(config, f, indent=2)
    max_restarts = int(getattr(cfg, "max_restarts", 0))
    lost: list[str] = []
    waited_since: float | None = None
    while True:
        try:
            result = run_with_progress(
                spark,
                df.select("image", "label", "split"),
                cfg.workers,
                rank_fn,
                payload,
                out,
                threads_per_rank=cfg.threads_per_rank,
                repartition=repartition,
                label=label,
            )
            break
        except D.LostRanks as e:
            if e.slots_short and waited_since is not None:  # still waiting for executors to return
                if time.monotonic() - waited_since > RESTART_WAIT_S:
                    raise JobFailed(
                        f"{label}: {e.reason} for {cfg.workers} ranks after waiting {RESTART_WAIT_S:.0f} s "
                        f"for lost executors to come back; add executors and run again with --resume "
                        f"(checkpoints in {payload['checkpoint_dir']})"
                    ) from None
                time.sleep(2)
                continue
            where = _last_epoch(out)
            if len(lost) >= max_restarts:
                raise JobFailed(
                    f"{label}: {e.reason} during epoch {where}, after {len(lost)} restart(s) "
                    f"(--max-restarts {max_restarts}); run it again with --resume to continue from the "
                    f"last checkpoint in {payload['checkpoint_dir']}"
                ) from None
            lost.append(f"{e.reason} during epoch {where}")
            log.warning(
                "%s: %s; relaunching from the last checkpoint (%d/%d)",
                label,
                lost[-1],
                len(lost),
                max_restarts,
            )
            payload = {**payload, "resume": True}
            waited_since = time.monotonic()
            wait_for_slots(spark, cfg.workers, RESTART_WAIT_S)
    info, blobs = D.decode_result(result)
    info["restarts"] = len(lost)
    if lost:
        log.warning(
            "%s: recovered from %s; resumed from the checkpoint of epoch %d",
            label,
            "; ".join(lost),
            info["start_epoch"],
        )
    return info, blobs


def _last_epoch(out: str) -> int | str:
    """The epoch rank 0 last reported in its progress file ("?" before the first report)."""
    try:
        with open(os.path.join(out, PROGRESS_FILE)) as f:
            return int(json.load(f)["epoch"])
    except (OSError, ValueError, KeyError):
        return "?"


def wait_for_slots(spark: SparkSession, workers: int, timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) until the cluster offers ``workers`` task slots again; Spark's
    own barrier check then waits for the slots to be free."""
    deadline = time.monotonic() + timeout_s
    while D.barrier_slots(spark) < workers and time.monotonic() < deadline:
        time.sleep(2)


def run_metrics(info: dict[str, Any], timer: Timer, workers: int) -> dict[str, Any]:
    """What every run reports about itself: epochs, throughput, time, ranks, resume point."""
    history = info["history"]
    speeds = [
        h["images_per_s"] for h in history if "images_per_s" in h
    ]  # older fine-tuning checkpoints: none
    return {
        "epochs": len(history),
        "images_per_s": round(sum(speeds) / max(1, len(speeds)), 1),
        "data_load_s": info["load_s"],
        "wall_s": round(timer.elapsed, 3),
        "workers": workers,
        "threads_per_rank": info["threads_per_rank"],
        "resumed_from_epoch": info["start_epoch"],
        "restarts": info.get("restarts", 0),
    }


def save_trained(
    out: str,
    spec: ModelSpec,
    weights: bytes,
    class_names: list[str],
    size: tuple[int, int],
    info: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the model directory ``out`` from rank 0's ``weights`` and pixel statistics."""
    model = spec.build()
    model.load_state_dict(st_load(weights))
    preprocess = Preprocess(
        channels=spec.in_channels, size=size, mean=tuple(info["mean"]), std=tuple(info["std"])
    )
    save_model_dir(out, model, spec, class_names, preprocess, metrics, extra=extra)
