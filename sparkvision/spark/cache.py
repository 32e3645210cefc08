"""RC: a reuse-weighted cache planner for jobs that read the same DataFrame more than once.

Spark's cache is what the job asks for: ``persist`` marks a DataFrame, and when storage memory
runs out the block manager drops the least recently used blocks, whatever they would cost to
compute again. A multi-pass job knows better: a DBN pretrained as Spark passes re-reads each
layer's input every epoch (``benchmarks/bench_cache.py``), a planner's profile runs re-read one
sample. :class:`CachePlanner` takes the DataFrames a job will
reuse, each with how often it will be read again (``reuse``), its size and what one computation
costs, and keeps the set worth most under the storage budget::

    weight = reuse x recompute cost / size      (seconds saved per byte held)

:func:`plan_cache` is the pure choice (tested against a brute-force optimum): the knapsack greedy
by weight, then the single most valuable candidate that fits if that alone saves more (which
bounds the greedy's loss to half the optimum; on small random instances it is within a few
percent). The planner persists what the plan keeps and unpersists, least weighted first, what
it no longer keeps, logging each decision; a DataFrame whose reads are done is released at once
(:meth:`CachePlanner.used`), making room for the rest. This is the policy of MRD (ICPP 2018) and
LRC (INFOCOM 2017) — reuse counts from the job's own plan rather than recency — at the level of
DataFrames rather than Spark's blocks.

The same rule serves sparkvision's own DBN at the rank level: its layer-wise pretraining runs in
the training ranks from the shards they hold, never re-reading a DataFrame, and what it re-reads
every epoch is each layer's input derived from the pixels through the RBMs below.
:mod:`sparkvision.train.layerwise` offers :func:`plan_cache` those inputs (reuse from its epochs,
size in rank memory, cost of one pass from the pixels) under a share of the rank's memory, holds
what it keeps as tensors and releases each after its last read.

Sizes: given in bytes, or rows x average row bytes, or else Spark's plan statistics (classic
sessions only: a Spark Connect client has no JVM to ask). Costs: given in seconds (a measured
first computation, :meth:`CachePlanner.timed`), or else the size read at
:data:`SCAN_BYTES_PER_S`, which ranks candidates by reuse alone. The budget: the storage memory
execution can never take back, ``(heap - 300 MiB) x spark.memory.fraction x
spark.memory.storageFraction`` per executor (:func:`storage_budget`), or a given number of bytes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession

from sparkvision.errors import ParamError
from sparkvision.spark.compat import default_parallelism, master_of
from sparkvision.spark.session import is_connect, is_local

log = logging.getLogger(__name__)

SCAN_BYTES_PER_S = 200e6  # a recompute cost when none is known: a Parquet scan's pace on one core
RESERVED_BYTES = 300 << 20  # the JVM heap Spark keeps for itself (UnifiedMemoryManager)
_UNITS = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


@dataclass(frozen=True)
class Candidate:
    """One DataFrame a job may cache: ``reuse`` reads after the first (what a cache saves),
    ``size_bytes`` held while cached, ``cost_s`` to compute it once."""

    name: str
    reuse: int
    size_bytes: int
    cost_s: float

    @property
    def saving_s(self) -> float:
        return max(self.reuse, 0) * self.cost_s

    @property
    def weight(self) -> float:
        """Seconds saved per byte held."""
        return self.saving_s / max(self.size_bytes, 1)


@dataclass(frozen=True)
class CachePlan:
    keep: tuple[str, ...]  # by descending weight
    saving_s: float
    used_bytes: int


def plan_cache(candidates: Sequence[Candidate], budget_bytes: int) -> CachePlan:
    """The candidates to hold within ``budget_bytes``: greedy by weight (a candidate that does not
    fit is passed over, a smaller one after it may still fit), or the single most valuable one
    that fits when it alone saves more. Candidates that save nothing are never kept; equal
    weights go to the one given first (the planner lists what it holds first, so a tie never
    swaps one cached DataFrame for another)."""
    useful = sorted((c for c in candidates if c.saving_s > 0), key=lambda c: -c.weight)
    chosen: list[Candidate] = []
    used = 0
    for c in useful:
        if used + c.size_bytes <= budget_bytes:
            chosen.append(c)
            used += c.size_bytes
    fitting = [c for c in useful if c.size_bytes <= budget_bytes]
    best = max(fitting, key=lambda c: c.saving_s, default=None)
    if best is not None and best.saving_s > sum(c.saving_s for c in chosen):
        chosen, used = [best], best.size_bytes
    return CachePlan(tuple(c.name for c in chosen), sum(c.saving_s for c in chosen), used)


def nbytes(n: float) -> str:
    """``n`` bytes for a log line: 1.5 GiB, 20 MiB, 300 B."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """A JVM memory string (``4g``, ``512m``, ``1536``: MiB, as ``spark.executor.memory`` reads
    a bare number) in bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtp]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a memory size such as 4g or 512m")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def storage_budget_bytes(
    heap_bytes: int, executors: int, memory_fraction: float = 0.6, storage_fraction: float = 0.5
) -> int:
    """Storage memory that execution can never evict, over all executors."""
    return int(max(heap_bytes - RESERVED_BYTES, 0) * memory_fraction * storage_fraction) * max(executors, 1)


def storage_budget(spark: SparkSession) -> int:
    """:func:`storage_budget_bytes` from the session's settings: on a local master the driver's
    heap (the executor runs in it), else ``spark.executor.memory`` times the executors
    (``spark.executor.instances``, or the task slots over ``spark.executor.cores``)."""

    def conf(key: str, default: str) -> str:
        return str(spark.conf.get(key, default))

    try:
        if is_local(master_of(spark)):
            heap, executors = parse_bytes(conf("spark.driver.memory", "1g")), 1
        else:
            heap = parse_bytes(conf("spark.executor.memory", "1g"))
            instances = conf("spark.executor.instances", "")
            cores = int(conf("spark.executor.cores", "0") or 0)
            executors = int(instances) if instances else max(1, default_parallelism(spark) // max(cores, 1))
        fraction = float(conf("spark.memory.fraction", "0.6"))
        storage = float(conf("spark.memory.storageFraction", "0.5"))
    except ValueError as e:
        raise ParamError("conf", f"the storage budget: {e}") from None
    return storage_budget_bytes(heap, executors, fraction, storage)


def plan_size(df: DataFrame) -> int | None:
    """Spark's estimate of ``df``'s size from its optimized plan; ``None`` on Spark Connect, whose
    client has no JVM to ask."""
    if is_connect(df.sparkSession):
        return None
    stats = df._jdf.queryExecution().optimizedPlan().stats()  # noqa: SLF001 - no public API for it
    return int(str(stats.sizeInBytes()))  # a Scala BigInt, or an int where py4j converts it


@dataclass
class _Entry:
    df: DataFrame
    candidate: Candidate
    reads_left: int
    held: bool = False
    logged: bool | None = None  # the decision last logged (held or not), so each change logs once


class CachePlanner:
    """Persist the DataFrames a job reuses most, under a storage budget, and let go of them
    when their reads are done. Use it as a context manager: everything it holds is unpersisted
    on the way out, also when the job fails."""

    def __init__(
        self,
        spark: SparkSession,
        budget_bytes: int | None = None,
        level: StorageLevel = StorageLevel.MEMORY_AND_DISK,
        label: str = "cache",
    ) -> None:
        self.budget = storage_budget(spark) if budget_bytes is None else int(budget_bytes)
        self.level = level  # with disk, an under-estimated size spills rather than recomputes
        self.label = label
        self._entries: dict[str, _Entry] = {}

    def __enter__(self) -> CachePlanner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def held(self) -> tuple[str, ...]:
        return tuple(name for name, e in self._entries.items() if e.held)

    def offer(
        self,
        name: str,
        df: DataFrame,
        reuse: int,
        *,
        size_bytes: int | None = None,
        rows: int | None = None,
        row_bytes: float | None = None,
        cost_s: float | None = None,
    ) -> DataFrame:
        """Make ``df`` a candidate, read ``reuse`` more times after its first, and plan again;
        returns ``df`` (persisted in place if kept). The size is ``size_bytes``, else ``rows`` x
        ``row_bytes``, else Spark's plan estimate; the cost ``cost_s``, else the size at
        :data:`SCAN_BYTES_PER_S`. Without a size on Spark Connect, ``df`` is returned uncached
        and not planned (a warning says so); :meth:`used` and :meth:`release` ignore its name."""
        if name in self._entries:
            raise ValueError(f"{self.label}: {name!r} is offered already")
        if reuse < 0:
            raise ValueError(f"{self.label}: reuse of {name!r} must be >= 0, got {reuse}")
        size = size_bytes
        if size is None and rows is not None and row_bytes is not None:
            size = int(rows * row_bytes)
        if size is None:
            size = plan_size(df)
        if size is None:  # a Connect client cannot ask the plan: the job runs as without a cache
            log.warning(
                "%s: not cached %s: its size is unknown (give size_bytes, or rows and row_bytes)",
                self.label,
                name,
            )
            return df
        cost = cost_s if cost_s is not None else size / SCAN_BYTES_PER_S
        self._entries[name] = _Entry(df, Candidate(name, reuse, int(size), float(cost)), reuse + 1)
        self._replan()
        return df

    def update(self, name: str, cost_s: float) -> None:
        """A better recompute cost for a candidate (a measured computation); plans again."""
        e = self._entries.get(name)
        if e is None:
            return
        e.candidate = replace(e.candidate, cost_s=float(cost_s))
        self._replan()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the block (the candidate's first computation) and take it as its recompute cost."""
        start = time.perf_counter()
        yield
        self.update(name, time.perf_counter() - start)

    def used(self, name: str) -> None:
        """One read of ``name`` is done; after its last one it is released and the room reused.
        Held, every read left comes from the cache; not held, caching it now would save all but
        the next (which fills the cache)."""
        e = self._entries.get(name)
        if e is None:
            return
        e.reads_left -= 1
        e.candidate = replace(e.candidate, reuse=max(e.reads_left - (0 if e.held else 1), 0))
        if e.reads_left <= 0:
            self.release(name, "its reads are done")
        else:
            self._replan()

    def release(self, name: str, why: str = "released") -> None:
        """Drop ``name`` from the plan (unpersisted if held) and give its room to the others."""
        e = self._entries.pop(name, None)
        if e is None:
            return
        if e.held:
            e.df.unpersist()
            log.info("%s: unpersist %s: %s", self.label, name, why)
        self._replan()

    def close(self) -> None:
        for name, e in self._entries.items():
            if e.held:
                e.df.unpersist()
                log.info("%s: unpersist %s: the job is done", self.label, name)
        self._entries.clear()

    def _replan(self) -> None:
        held_first = sorted(self._entries.values(), key=lambda e: not e.held)
        plan = plan_cache([e.candidate for e in held_first], self.budget)
        keep = set(plan.keep)
        by_weight = sorted(self._entries.values(), key=lambda e: e.candidate.weight)
        for e in by_weight:  # least weighted first: room is made before anything is added
            if e.held and e.candidate.name not in keep:
                e.df.unpersist()
                e.held = e.logged = False
                log.info("%s: unpersist %s: %s", self.label, e.candidate.name, self._why(e.candidate))
        for e in reversed(by_weight):
            c = e.candidate
            if not e.held and c.name in keep:
                e.df.persist(self.level)
                e.held = e.logged = True
                log.info("%s: persist %s: %s", self.label, c.name, self._why(c))
            elif not e.held and e.logged is not False:
                e.logged = False
                log.info("%s: not cached %s: %s", self.label, c.name, self._why(c))

    def _why(self, c: Candidate) -> str:
        return (
            f"weight {c.reuse} reuse x {c.cost_s:.3g} s / {nbytes(c.size_bytes)} = "
            f"{c.weight * 2**20:.3g} s/MiB; holding {nbytes(self._held_bytes())} of {nbytes(self.budget)}"
        )

    def _held_bytes(self) -> int:
        return sum(e.candidate.size_bytes for e in self._entries.values() if e.held)
