"""Live progress for long Spark work, read from Spark's own status tracker.

Spark's console progress bar is switched off (it interleaves with our output and cannot be
parsed); instead a daemon thread polls ``statusTracker()`` and drives a rich progress bar on
stderr, so ``--json`` output on stdout stays clean. A Spark Connect client has no status tracker:
there :class:`TaskCounts` listens to the progress the server streams with each query's results.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from pyspark.sql import SparkSession
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sparkvision.spark.session import is_connect

stderr_console = Console(stderr=True)


def progress_enabled() -> bool:
    """On for a terminal; ``SPARKVISION_PROGRESS=1`` forces it on, ``0`` off."""
    setting = os.environ.get("SPARKVISION_PROGRESS")
    if setting is not None:
        return setting != "0"
    return sys.stderr.isatty()


def _make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=stderr_console,
        transient=True,
        disable=not progress_enabled(),
    )


class TaskCounts:
    """Tasks done and in all of the Spark stages of some work, on classic Spark and Spark Connect.

    Classic: the status tracker's stages, either those running now or, with ``job_group``, those
    of every job of that group. Spark Connect: the stages the server reported for this session's
    queries since :meth:`start` (it reports them every couple of seconds while a query runs), the
    running ones only unless ``job_group`` is given (any value: a Connect session runs one job's
    queries at a time here).
    """

    def __init__(self, spark: SparkSession, job_group: str | None = None) -> None:
        self.spark = spark
        self.job_group = job_group
        self.connect = is_connect(spark)
        self._stages: dict[tuple[str | None, int], tuple[int, int]] = {}  # (operation, stage) -> counts
        self._lock = threading.Lock()

    def start(self) -> TaskCounts:
        if self.connect:
            cast(Any, self.spark).registerProgressHandler(self._on_progress)
        return self

    def stop(self) -> None:
        if self.connect:
            try:
                cast(Any, self.spark).removeProgressHandler(self._on_progress)
            except Exception:  # noqa: BLE001 - the session may be stopping
                pass

    def _on_progress(
        self, stages: Any = None, inflight_tasks: int = 0, operation_id: str | None = None, done: bool = False
    ) -> None:
        with self._lock:
            if done and self.job_group is None:  # only what runs now counts
                self._stages = {k: v for k, v in self._stages.items() if k[0] != operation_id}
                return
            for st in stages or ():
                self._stages[(operation_id, st.stage_id)] = (st.num_completed_tasks, st.num_tasks)

    def counts(self) -> tuple[int, int]:
        """``(tasks done, tasks in all)``; ``(0, 0)`` before any stage is known."""
        if self.connect:
            with self._lock:
                return sum(d for d, _ in self._stages.values()), sum(t for _, t in self._stages.values())
        tracker = self.spark.sparkContext.statusTracker()
        if self.job_group is None:
            stage_ids = list(tracker.getActiveStageIds())
        else:
            stage_ids = []
            for jid in tracker.getJobIdsForGroup(self.job_group):
                job = tracker.getJobInfo(jid)
                if job is not None:
                    stage_ids.extend(job.stageIds)
        done = total = 0
        for sid in stage_ids:
            info = tracker.getStageInfo(sid)
            if info is not None:
                done += info.numCompletedTasks
                total += info.numTasks
        return done, total


@contextmanager
def spark_progress(spark: SparkSession, description: str, interval: float = 0.5) -> Iterator[None]:
    """Show the tasks done / total of the stages Spark is running while the body executes."""
    if not progress_enabled():
        yield
        return
    counter = TaskCounts(spark)
    stop = threading.Event()
    progress = _make_progress()
    task = progress.add_task(description, total=None, note="")

    def poll() -> None:
        while not stop.wait(interval):
            try:
                done, total = counter.counts()
                if total:
                    progress.update(task, completed=done, total=total, note="tasks")
            except Exception:  # noqa: BLE001 - a progress bar must never break the job
                pass

    thread = threading.Thread(target=poll, daemon=True)
    with progress:
        counter.start()
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2)
            counter.stop()


@contextmanager
def step_progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A plain progress bar for work we count ourselves (epochs, batches)."""
    progress = _make_progress()
    task = progress.add_task(description, total=total, note="")
    with progress:

        def advance(n: int = 1, note: str = "", completed: int | None = None) -> None:
            if completed is not None:
                progress.update(task, completed=completed, note=note)
            else:
                progress.update(task, advance=n, note=note)

        yield advance


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
