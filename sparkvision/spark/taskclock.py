"""Where an executor-side ``mapInArrow`` body spends a task's time, when a profile asks.

Batch inference and ingest run as Arrow bodies on the executors. Spark's own task metrics see a
task as one block of Python time; a profile needs it split: waiting for the next input batch
(JVM -> Arrow -> Python: the scan, decompression, the Arrow stream), the body's own stages
(rebatch, decode, model, output columns) and waiting for the consumer to take an output batch
(Python -> Arrow -> JVM, and there the Parquet writer, which runs on the same task's thread).

:func:`task_clock` is what a body calls at its start. With ``path`` None (the default: the
driver read no :data:`CLOCK_ENV`) it returns :data:`NO_CLOCK`, whose methods do nothing and whose
:meth:`~NullClock.inputs` hands the iterator back untouched, so a job without a profile pays one
no-op call per batch. With a path, each task appends one JSON line to that file when its body
ends: the file must be on a disk the executors write, so this is for profiles on one machine
(``benchmarks/profile_paths.py``), never for results a job depends on.

The path is read on the driver (:func:`clock_path`) and travels inside the task's function, like
every other setting of a task here: the driver's environment does not reach a cluster's executors.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any, TypeVar

from pyspark import TaskContext

CLOCK_ENV = "SPARKVISION_TASK_CLOCK"

T = TypeVar("T")


def clock_path() -> str | None:
    """The JSON-lines file profiles ask tasks to append to (:data:`CLOCK_ENV`), None when unset."""
    return os.environ.get(CLOCK_ENV) or None


class NullClock:
    """The clock of a job without a profile: every call does nothing."""

    def lap(self, stage: str) -> None:
        """Nothing: no profile."""

    def rows(self, n: int) -> None:
        """Nothing: no profile."""

    def inputs(self, batches: Iterator[T]) -> Iterator[T]:
        return batches  # the same object: nothing added when no profile runs

    def close(self) -> None:
        """Nothing: no profile."""


class TaskClock(NullClock):
    """Wall and CPU time per stage of one task's body: :meth:`lap` charges the time since the
    last lap. CPU time is this worker process's (all its threads): on a machine shared with other
    work it says what a stage costs when wall time only says how long it waited."""

    def __init__(self, path: str, body: str) -> None:
        self.path, self.body = path, body
        self.stages: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.n_rows = 0
        self.n_batches = 0
        self.start = self.mark = time.perf_counter()
        self.cpu_start = self.cpu_mark = time.process_time()
        self.wall_start = time.time()

    def lap(self, stage: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self.mark
        self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu - self.cpu_mark
        self.mark, self.cpu_mark = now, cpu

    def rows(self, n: int) -> None:
        self.n_rows += n
        self.n_batches += 1

    def inputs(self, batches: Iterator[T]) -> Iterator[T]:
        """``batches``, with the wait for each one charged to ``input``."""
        for b in batches:
            self.lap("input")
            yield b

    def close(self) -> None:
        """Append this task's line; the last stretch (since the last lap) is charged to ``output``."""
        self.lap("output")
        ctx = TaskContext.get()
        line: dict[str, Any] = {
            "body": self.body,
            "pid": os.getpid(),
            "stage_id": ctx.stageId() if ctx else None,
            "partition": ctx.partitionId() if ctx else None,
            "attempt": ctx.attemptNumber() if ctx else None,
            "start": self.wall_start,
            "wall_s": time.perf_counter() - self.start,
            "cpu_s": time.process_time() - self.cpu_start,
            "rows": self.n_rows,
            "batches": self.n_batches,
            "stages": self.stages,
            "cpu_stages": self.cpu,
        }
        with open(self.path, "a") as f:  # one short append per task: lines do not interleave
            f.write(json.dumps(line) + "\n")


NO_CLOCK = NullClock()


def task_clock(path: str | None, body: str) -> NullClock:
    """The clock a body uses for one task: :data:`NO_CLOCK` unless a profile gave a ``path``."""
    return NO_CLOCK if path is None else TaskClock(path, body)
