"""The background runner: one job at a time against one shared SparkSession.

Each job runs in the runner thread inside its own Spark job group
(``setJobGroup(..., interruptOnCancel=True)``), so cancelling is ``cancelJobGroup``: Spark kills
its tasks and the library call raises. A Spark Connect session has no job groups: there the
runner thread tags its queries (``addTag``) and cancelling is ``interruptTag``. Work outside
Spark (FAISS builds, driver loops) checks a cancel flag through its progress callback. A monitor
thread turns what the library reports into the job's progress %, live metrics and log tail: the
tasks of the job's Spark stages for table jobs (:class:`~sparkvision.spark.progress.TaskCounts`),
and ``progress.json`` / ``metrics.jsonl`` in the output directory for training.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sparkvision.spark.progress import TaskCounts
from sparkvision.spark.session import is_connect
from sparkvision.train.checkpoint import list_checkpoints
from sparkvision.web.jobs import JobStore
from sparkvision.web.kinds import KINDS
from sparkvision.web.routes.errors import flags_to_fields

log = logging.getLogger("sparkvision.web")


class JobCancelled(Exception):
    pass


class ProgressUpdate(Protocol):
    """:meth:`Progress.update <sparkvision.ops.base.Progress.update>` as a callable (note optional)."""

    def __call__(self, percent: float, note: str = "") -> None: ...


@dataclass
class JobProgress:
    """The :class:`~sparkvision.ops.base.Progress` a web job reports to: its row's progress % and log."""

    update: ProgressUpdate
    log: Callable[[str], None]
    check_cancelled: Callable[[], None]


EXPECTED_ERRORS = (ValueError, FileNotFoundError, KeyError, NotADirectoryError, PermissionError)


def group_of(job_id: str) -> str:
    """The Spark job group (classic) or query tag (Spark Connect) of a web job's Spark work."""
    return f"sparkvision-web-{job_id}"


def enter_group(spark: Any, job_id: str, description: str) -> None:
    """Make the Spark work this thread starts from now on part of ``job_id``'s group."""
    if is_connect(spark):
        spark.addTag(group_of(job_id))
    else:
        spark.sparkContext.setJobGroup(group_of(job_id), description, interruptOnCancel=True)


def leave_group(spark: Any, job_id: str) -> None:
    """Undo :func:`enter_group` for this thread."""
    if is_connect(spark):
        spark.removeTag(group_of(job_id))
    else:
        spark.sparkContext.setJobGroup("sparkvision-web-idle", "idle", interruptOnCancel=False)


def cancel_group(spark: Any, job_id: str) -> None:
    """Stop the Spark jobs of ``job_id`` running now (from any thread): their tasks are killed."""
    if is_connect(spark):
        spark.interruptTag(group_of(job_id))
    else:
        spark.sparkContext.cancelJobGroup(group_of(job_id))


def error_message(e: BaseException, fields: Iterable[str] = ()) -> str:
    """One line a user can act on: the library's message, or the first line of a Spark error.

    The library words its messages for the CLI (``--warmup-steps 2 is over --steps``); a job was
    submitted as JSON fields, so each flag that is one of ``fields`` is written as the field.
    """
    if isinstance(e, KeyError) and e.args:
        first = str(e.args[0])
    else:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        if not isinstance(e, EXPECTED_ERRORS):
            first = f"{type(e).__name__}: {first}"
    return flags_to_fields(first, fields)[:500]


def read_train_progress(out: str) -> tuple[float | None, dict[str, Any]]:
    """(percent, latest metrics) from a training output directory, or (None, {}) before it starts."""
    pct, metrics = None, {}
    try:
        with open(os.path.join(out, "progress.json")) as f:
            p = json.load(f)
        total = p["epochs"] * p["steps"]
        pct = 100.0 * ((p["epoch"] - 1) * p["steps"] + p["step"]) / max(total, 1)
        metrics = {
            "epoch": p["epoch"],
            "epochs": p["epochs"],
            "step": p["step"],
            "steps": p["steps"],
            "loss": round(float(p["loss"]), 5),
            "images_per_s": round(float(p["images_per_s"]), 1),
        }
    except (OSError, ValueError, KeyError, TypeError):
        pass
    history = read_metrics_history(out)
    if history:
        metrics["last_epoch"] = history[-1]
    return pct, metrics


def read_metrics_history(out: str) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue  # a line being written right now
    except OSError:
        pass
    return rows


class Runner:
    def __init__(self, store: JobStore, spark_factory: Callable[[], Any], poll_s: float = 0.5) -> None:
        self.store = store
        self.spark_factory = spark_factory
        self.poll_s = poll_s
        self._spark = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: str | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._tasks: TaskCounts | None = None  # the running job's Spark tasks

    @property
    def current_job(self) -> str | None:
        """The id of the job running now, or None when the runner is idle."""
        return self._current

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="sparkvision-runner", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        current = self._current
        if current is not None:
            self.cancel(current)
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    @property
    def spark(self):
        if self._spark is None:
            self._spark = self.spark_factory()
        return self._spark

    # ------------------------------------------------------------------ control
    def cancel(self, job_id: str) -> None:
        """Cancel the running job ``job_id`` (no-op if another job runs)."""
        with self._lock:
            if self._current != job_id:
                return
            self._cancel.set()
            if self._spark is not None:
                try:
                    cancel_group(self._spark, job_id)
                except Exception:  # noqa: BLE001 - the session may be stopping
                    log.exception("cancelling the job's Spark work failed")

    def resume_params(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """Parameters for running an interrupted job again: a resumable one picks up its last checkpoint."""
        params = dict(params)
        if "overwrite" in KINDS[kind].params.model_fields:
            # What its output holds now, this job wrote: its submit was refused had the path held data.
            params["overwrite"] = True
        if KINDS[kind].resumable:
            params["resume"] = bool(list_checkpoints(os.path.join(params["out"], "checkpoints")))
        return params

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self._execute(job.id, job.kind, job.params)

    def _execute(self, job_id: str, kind_name: str, params: dict[str, Any]) -> None:
        kind = KINDS[kind_name]
        with self._lock:
            self._current = job_id
            self._cancel.clear()
        store = self.store
        store.append_log(job_id, f"started {kind_name}")
        live: dict[str, Any] = {"progress": 0.0, "note": ""}

        def progress(percent: float, note: str = "") -> None:
            live["progress"], live["note"] = max(0.0, min(99.0, percent)), note

        job = store.get(job_id)
        assert job is not None  # claim_next() just moved this row to running, and rows are never deleted

        def check_cancelled() -> None:
            if self._cancel.is_set() or (store.get(job_id) or job).cancel_requested:
                self._cancel.set()
                raise JobCancelled()

        ctx = JobProgress(progress, lambda line: store.append_log(job_id, line), check_cancelled)
        stop_monitor = threading.Event()
        monitor = threading.Thread(
            target=self._monitor, args=(job_id, kind_name, params, live, stop_monitor), daemon=True
        )
        t0 = time.perf_counter()
        try:
            spark = self.spark
            enter_group(spark, job_id, f"{kind_name} {job_id}")
            self._tasks = TaskCounts(spark, group_of(job_id)).start()
            monitor.start()
            p = kind.validate(params)
            if (store.get(job_id) or job).cancel_requested:
                raise JobCancelled()
            result = kind.execute(spark, p, ctx)
            if self._cancel.is_set():
                raise JobCancelled()
            stop_monitor.set()
            monitor.join(5)
            metrics = self._final_metrics(kind_name, params, result)
            # The log line goes first: a client that sees the final state must also see its line.
            store.append_log(job_id, f"succeeded in {time.perf_counter() - t0:.1f} s")
            store.finish(
                job_id,
                "succeeded",
                progress=100.0,
                result=json.loads(json.dumps(result, default=str)),
                metrics=metrics,
            )
        except BaseException as e:  # noqa: BLE001 - a job's failure must never stop the runner
            stop_monitor.set()
            if monitor.is_alive():
                monitor.join(5)
            if isinstance(e, JobCancelled) or self._cancel.is_set():
                store.append_log(job_id, "cancelled")
                store.finish(job_id, "cancelled", error="cancelled by request")
            else:
                msg = error_message(e, kind.params.model_fields)
                if not isinstance(e, EXPECTED_ERRORS):
                    log.error("job %s failed:\n%s", job_id, "".join(traceback.format_exception(e)))
                store.append_log(job_id, f"failed: {msg}")
                store.finish(job_id, "failed", error=msg)
            if not isinstance(e, Exception):
                raise
        finally:
            try:
                leave_group(self.spark, job_id)
            except Exception:  # noqa: BLE001
                pass
            if self._tasks is not None:
                self._tasks.stop()
                self._tasks = None
            with self._lock:
                self._current = None
                self._cancel.clear()

    def _final_metrics(self, kind: str, params: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(result, dict):
            return {}
        if KINDS[kind].reports_epochs:
            return {k: v for k, v in result.items() if k != "history" and not isinstance(v, (dict, list))}
        return {k: result[k] for k in KINDS[kind].summary_keys if k in result}

    def _monitor(
        self, job_id: str, kind: str, params: dict[str, Any], live: dict[str, Any], stop: threading.Event
    ) -> None:
        """Every ``poll_s``: write progress %, live metrics and notable lines to the job row."""
        out = params.get("out") if KINDS[kind].reports_epochs else None
        last_note, last_epoch = None, 0
        while not stop.wait(self.poll_s):
            if self._cancel.is_set() and self._spark is not None:
                # Cancelling stops the Spark jobs running now, not those the job starts later:
                # a cancel in a job's first second (or between two of its Spark jobs) is repeated
                # until the job ends, so none of its later Spark work runs.
                try:
                    cancel_group(self._spark, job_id)
                except Exception:  # noqa: BLE001 - the session may be stopping
                    log.debug("cancelling the job's Spark work failed", exc_info=True)
            try:
                fields: dict[str, Any] = {}
                if out:
                    pct, metrics = read_train_progress(out)
                    if pct is not None:
                        fields["progress"] = min(99.0, pct)
                    if metrics:
                        fields["metrics"] = metrics
                        ep = metrics.get("last_epoch", {}).get("epoch", 0)
                        if ep > last_epoch:
                            last_epoch = ep
                            self.store.append_log(job_id, "epoch " + json.dumps(metrics["last_epoch"]))
                if "progress" not in fields and not out:  # training: only its own steps count
                    pct = self._spark_progress(job_id)
                    if live.get("progress"):
                        pct = live["progress"]
                    if pct is not None:
                        fields["progress"] = min(99.0, pct)
                if live.get("metrics"):
                    fields["metrics"] = live["metrics"]
                if fields:
                    self.store.update(job_id, **fields)
                if live.get("note") and live["note"] != last_note:
                    last_note = live["note"]
                    self.store.append_log(job_id, last_note)
            except Exception:  # noqa: BLE001 - progress must never break a job
                log.debug("monitor error", exc_info=True)

    def _spark_progress(self, job_id: str) -> float | None:
        tasks = self._tasks
        if tasks is None:
            return None
        done, total = tasks.counts()
        return 100.0 * done / total if total else None
