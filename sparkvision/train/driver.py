"""The driver's side of a training run on Spark, shared by training, pretraining and fine-tuning.

:func:`prepare_out` names the output directory and its checkpoints (a local path made absolute,
or any URI Spark writes), :func:`infer_image_spec` reads the input size from the data when the
config leaves it open, :func:`launch` readies ``OUT`` (a fresh run clears stale outputs,
``resume`` needs a checkpoint), writes the run's config beside its outputs and runs the ranks in a
barrier job while the driver's output sink (:mod:`sparkvision.spark.sink`) writes what rank 0
sends to ``OUT`` and feeds the live progress bar; :func:`save_trained` completes the model
directory around the weights rank 0 uploaded. :func:`run_metrics` gives the facts every run
reports the same way.

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
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkvision.errors import JobFailed
from sparkvision.models.modeldir import WEIGHTS, ModelSpec, Preprocess, Resize, model_dir_json
from sparkvision.spark import distributed as D
from sparkvision.spark.filestore import driver_store, local_path, write_bytes
from sparkvision.spark.progress import Timer, step_progress
from sparkvision.spark.sink import OutputSink, sink_address
from sparkvision.train.checkpoint import checkpoint_key, list_checkpoints
from sparkvision.train.loop import CHECKPOINT_DIR, PROGRESS_FILE
from sparkvision.train.outputs import prepare_outputs

log = logging.getLogger(__name__)

# The columns every training method's ranks read (``train.data.load_shard``); a method that needs
# more (a detector's boxes) passes them to :func:`launch` as ``columns``.
RANK_COLUMNS = ("image", "label", "split")

# How long a relaunch waits for the cluster to offer a slot per rank again (a standalone or YARN
# master replaces a dead executor in seconds; a new Kubernetes pod may take a minute).
RESTART_WAIT_S = float(os.environ.get("SPARKVISION_RESTART_WAIT_S", "300"))


def prepare_out(out: str, resume: bool) -> tuple[str, str]:
    """``(out, checkpoint_dir)``: a local path made absolute, a URI as given. Nothing is touched
    here: :func:`launch` readies ``out`` through the session's file systems (``resume`` is
    checked there)."""
    local = local_path(out)
    out = local if local is not None else out.rstrip("/")
    return out, out + "/" + CHECKPOINT_DIR


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


def _follow_progress(sink: OutputSink, stop: threading.Event, label: str) -> None:
    with step_progress(label, None) as advance:
        while not stop.wait(0.5):
            p = sink.progress
            if p is None:
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
    sink: OutputSink,
    threads_per_rank: int | None = None,
    repartition: bool = True,
    label: str = "train",
) -> bytes:
    """:func:`sparkvision.spark.distributed.run_on_barrier` with a progress bar fed by ``sink``."""
    stop = threading.Event()
    follower = threading.Thread(target=_follow_progress, args=(sink, stop, label), daemon=True)
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
    columns: tuple[str, ...] = RANK_COLUMNS,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Ready ``payload["out"]`` (see :func:`~sparkvision.train.outputs.prepare_outputs`), write
    ``config`` to ``config_file`` there (what was run, beside what it produced), run ``rank_fn``
    on ``cfg.workers`` ranks over ``df``'s image rows with the output sink serving ``out``, and
    return rank 0's result ``(info, files)``: ``files`` names the result files rank 0 uploaded
    into ``out`` (``weights``: the model's). The rank threads come from ``cfg.threads_per_rank``
    (None: the cores of a task), handed to the ranks as an argument. ``columns``: what the ranks
    read of ``df`` (:data:`RANK_COLUMNS` and the method's ``extra_columns``)."""
    out = payload["out"]
    store = driver_store(spark, out)
    prepare_outputs(store, bool(cfg.resume), out)
    write_bytes(store, config_file, json.dumps(config, indent=2).encode())
    with OutputSink(store, *sink_address(spark), progress_file=PROGRESS_FILE) as sink:
        payload = {**payload, "sink": sink.ticket}
        if getattr(cfg, "reshuffle", False) and cfg.workers > 1:
            info, lost = _run_reshuffling(spark, df.select(*columns), cfg, rank_fn, payload, sink, label)
        else:
            result, lost = _run_relaunching(
                spark, df.select(*columns), cfg, rank_fn, payload, sink, label, repartition
            )
            info, _ = D.decode_result(result)
    info["restarts"] = len(lost)
    for skipped in info.pop("skipped_checkpoints", None) or []:
        log.warning("%s: checkpoint %s; resumed from the one before", label, skipped)
    if lost:
        log.warning(
            "%s: recovered from %s; resumed from the checkpoint of epoch %d",
            label,
            "; ".join(lost),
            info["start_epoch"],
        )
    return info, dict(info.pop("files"))


def deal(df: DataFrame, workers: int, seed: int, epoch: int | None = None) -> DataFrame:
    """``df``'s rows dealt to ``workers`` partitions, one per rank, each in a fixed order.

    ``epoch=None`` (a run's one deal): Spark's round-robin ``repartition``, which deals every input
    partition's rows to the ranks in turn (equal shares, balanced over the table's parts). An
    ``epoch`` (``reshuffle``): the rows dealt afresh for that epoch by a hash of their image bytes
    salted with the seed and the epoch (near-equal shares: a few hundred rows apart in 60,000,
    which the equal-steps plan absorbs). Either way each rank's rows are then sorted by a salted
    hash of their bytes, so the same table, workers and seed give every rank the same rows in the
    same order whatever order Spark's shuffle fetches them in (on a cluster it fetches remote
    blocks in random order): a run resumed from a mid-epoch checkpoint, or relaunched after a lost
    executor, goes on with the very batches it was on, and no row is seen twice in that epoch.
    Spark does the moving (a shuffle that spills to disk, never through the driver)."""
    key = F.xxhash64(F.col("image"), F.lit(int(seed)), F.lit(-1 if epoch is None else int(epoch)))
    dealt = df.repartition(workers) if epoch is None else df.repartition(workers, key)
    return dealt.sortWithinPartitions(key)


def _next_epoch(spark: SparkSession, checkpoint_dir: str) -> int:
    """The epoch a resumed run goes on with: the epochs done by the newest checkpoint (0: none)."""
    names = list_checkpoints(driver_store(spark, checkpoint_dir))
    return max(((checkpoint_key(n) or (0, 0))[0] for n in names), default=0)


def _run_reshuffling(
    spark: SparkSession,
    df: DataFrame,
    cfg: Any,
    rank_fn: Callable[..., bytes | None],
    payload: dict[str, Any],
    sink: OutputSink,
    label: str,
) -> tuple[dict[str, Any], list[str]]:
    """One barrier job per epoch, each over the rows :func:`deal` gives that epoch, each resuming
    from the checkpoint the one before wrote (a lost rank relaunches the epoch's job as usual;
    ``max_restarts`` counts over the whole run). Rank 0's result of the last job, with the
    first job's start epoch and every job's load time."""
    lost: list[str] = []
    first: dict[str, Any] | None = None
    load_s, epochs_run = 0.0, 0
    while True:
        epoch = _next_epoch(spark, payload["checkpoint_dir"]) if (first or cfg.resume) else 0
        result, _ = _run_relaunching(
            spark,
            deal(df, cfg.workers, cfg.seed, epoch),
            cfg,
            rank_fn,
            {**payload, "stop_epoch": epoch + 1},
            sink,
            label,
            repartition=False,
            lost=lost,
        )
        info, _ = D.decode_result(result)
        first = first or info
        load_s += float(info["load_s"])
        epochs_run += 1
        if info.get("done", True):
            info.update(start_epoch=first["start_epoch"], load_s=round(load_s, 3), deals=epochs_run)
            return info, lost
        payload = {**payload, "resume": True, "sink": sink.renew()}


def _run_relaunching(
    spark: SparkSession,
    df: DataFrame,
    cfg: Any,
    rank_fn: Callable[..., bytes | None],
    payload: dict[str, Any],
    sink: OutputSink,
    label: str,
    repartition: bool,
    lost: list[str] | None = None,
) -> tuple[bytes, list[str]]:
    """Run the barrier job, relaunching it with ``resume`` after a lost rank (up to
    ``cfg.max_restarts``, counting the losses already in ``lost``); ``(rank 0's result, what was
    lost each time)``."""
    max_restarts = int(getattr(cfg, "max_restarts", 0))
    lost = [] if lost is None else lost
    dealt = deal(df, cfg.workers, cfg.seed) if repartition else df
    waited_since: float | None = None
    while True:
        try:
            result = run_with_progress(
                spark,
                dealt,
                cfg.workers,
                rank_fn,
                payload,
                sink,
                threads_per_rank=cfg.threads_per_rank,
                repartition=False,
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
            where = sink.progress["epoch"] if sink.progress else "?"
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
            payload = {**payload, "resume": True, "sink": sink.renew()}
            waited_since = time.monotonic()
            wait_for_slots(spark, cfg.workers, RESTART_WAIT_S)
    return result, lost


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
        "cache": info.get("cache"),  # the shard cache the ranks used: memory or stream
        "deals": info.get("deals", 1),  # how often the rows were dealt to the ranks (reshuffle: per epoch)
    }


def save_trained(
    spark: SparkSession,
    out: str,
    spec: ModelSpec,
    weights: str,
    class_names: list[str],
    size: tuple[int, int],
    info: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    resize: Resize = "stretch",
) -> None:
    """Complete the model directory ``out`` around ``weights`` (the file rank 0 uploaded there):
    its config, classes, preprocessing (rank 0's pixel statistics) and metrics. The weights are
    not read back: the model is built on the meta device only for the architecture it reports."""
    if weights != WEIGHTS:
        raise ValueError(f"rank 0 uploaded its weights to {weights}, not {WEIGHTS}")
    with torch.device("meta"):
        model = spec.build()
    preprocess = Preprocess(
        channels=spec.in_channels,
        size=size,
        mean=tuple(info["mean"]),
        std=tuple(info["std"]),
        pixel_dtype=info.get("pixel_dtype", "uint8"),  # how the rows decoded (a float table: float32)
        resize=resize,  # how they met the model's size (TrainConfig.resize_policy)
    )
    store = driver_store(spark, out)
    for name, obj in model_dir_json(model, spec, class_names, preprocess, metrics, extra).items():
        write_bytes(store, name, json.dumps(obj, indent=2).encode())
