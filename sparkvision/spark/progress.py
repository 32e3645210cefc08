"""Live progress for long Spark work, read from Spark's own status tracker.

Spark's console progress bar is switched off (it interleaves with our output and cannot be
parsed); instead a daemon thread polls ``statusTracker()`` and drives a rich progress bar on
stderr, so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


@contextmanager
def spark_progress(spark: SparkSession, description: str, interval: float = 0.5) -> Iterator[None]:
    """Show the tasks done / total of the stages Spark is running while the body executes."""
    tracker = spark.sparkContext.statusTracker()
    stop = threading.Event()
    progress = _make_progress()
    task = progress.add_task(description, total=None, note="")

    def poll() -> None:
        while not stop.wait(interval):
            try:
                done = total = 0
                for sid in tracker.getActiveStageIds():
                    info = tracker.getStageInfo(sid)
                    if info is not None:
                        done += info.numCompletedTasks
                        total += info.numTasks
                if total:
                    progress.update(task, completed=done, total=total, note="tasks")
            except Exception:  # noqa: BLE001 - a progress bar must never break the job
                pass

    thread = threading.Thread(target=poll, daemon=True)
    with progress:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2)


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
