"""RP: re-partitioning against skew, before a stage whose tasks each run a model over their rows.

A stage lasts as long as its slowest task. A table written as one big file (or one big Parquet
row group) and a few small ones is read as one large partition beside small ones, and batch
inference then runs on one core while the others idle. Spark's adaptive execution splits skewed
partitions only in sort-merge joins; a map-only stage such as ``mapInArrow`` is left as it is.

The logic is pure and tested without Spark: :func:`skew_stats` (rows and bytes per partition,
max/median, the largest partition's share), :func:`stage_slowdown` and :func:`decide` (is it worth
a shuffle?), :func:`split_points` (the rule behind range partitioning). The Spark side only
measures and re-partitions:

- :func:`measure_skew` counts rows per partition with ``spark_partition_id()`` and a ``groupBy``:
  no column is read, so a Parquet scan answers it from its metadata, which is cheaper than any
  sample (Spark samples after the scan). Bytes need the column read; they come from a Bernoulli
  sample of the rows (``F.length`` of the image column), scaled to each partition's row count.
- :func:`rebalance` re-partitions into one partition per task slot when :func:`decide` says so,
  and logs one line either way. Barrier training needs nothing of this: its driver deals the
  rows round-robin to the ranks already (:func:`sparkvision.train.driver.deal`).

Why round robin (``repartition(n)``) by default and not ``repartitionByRange(n, "content_id")``,
although range partitioning is what the split points describe: a range exchange first runs a
sampling job over its whole input (the image bytes included, since the sample is drawn from the
rows the exchange will move), then the shuffle reads it again; round robin reads it once and
gives every partition the same rows to within one per input partition, while a sample of split
points leaves a few percent either way (measured on a 20,000-row table with 80% of the rows in one
partition, local[2]: 10,000/10,000 rows by round robin, 9,392/10,608 by range, and range took
longer). ``key=`` asks for range partitioning by a column instead, for a caller that wants rows
placed by key (the same row lands in the same partition however the input was split).

Settings are Spark conf keys (the CLI's ``--conf``, ``get_spark(conf=...)``, ``spark.conf.set``):
``sparkvision.skew.rebalance`` (``true``; ``false`` leaves partitions alone),
``sparkvision.skew.threshold`` (1.5: rebalance when the stage would take at least this many times
as long as an even spread over the task slots) and ``sparkvision.skew.minRows`` (10,000: smaller
inputs are left alone: a model runs over them in seconds, about what the measuring job and the
shuffle cost; a 2,500-row table on two slots ran slower rebalanced).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkvision.errors import ParamError
from sparkvision.spark.compat import default_parallelism

log = logging.getLogger(__name__)

CONF_REBALANCE = "sparkvision.skew.rebalance"
CONF_THRESHOLD = "sparkvision.skew.threshold"
CONF_MIN_ROWS = "sparkvision.skew.minRows"
DEFAULT_THRESHOLD = 1.5
DEFAULT_MIN_ROWS = 10_000


@dataclass(frozen=True)
class SkewStats:
    """Rows (and bytes, when measured) of each non-empty partition, in partition order.

    Empty partitions do not show in a ``groupBy`` of partition ids and cost a task nothing, so
    max/median is over the partitions that hold rows.
    """

    rows: tuple[int, ...]
    bytes: tuple[int, ...] | None = None

    @property
    def partitions(self) -> int:
        return len(self.rows)

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def max_over_median(self) -> float:
        return max(self.rows) / statistics.median(self.rows) if self.rows else 1.0

    @property
    def largest_share(self) -> float:
        """The largest partition's share of the rows (1.0 for a single partition)."""
        return max(self.rows) / self.total_rows if self.rows else 0.0

    @property
    def bytes_max_over_median(self) -> float | None:
        if not self.bytes:
            return None
        median = statistics.median(self.bytes)
        return max(self.bytes) / median if median > 0 else None

    def describe(self) -> str:
        text = (
            f"{self.partitions} partitions of {self.total_rows:,} rows "
            f"(max/median {self.max_over_median:.2f}, largest {self.largest_share:.0%}"
        )
        by_bytes = self.bytes_max_over_median
        return text + (f", bytes max/median {by_bytes:.2f})" if by_bytes is not None else ")")


def skew_stats(rows: Sequence[int], bytes_: Sequence[int] | None = None) -> SkewStats:
    """:class:`SkewStats` of per-partition counts; partitions with no rows are dropped."""
    if bytes_ is not None and len(bytes_) != len(rows):
        raise ValueError(f"{len(rows)} row counts but {len(bytes_)} byte counts")
    keep = [i for i, r in enumerate(rows) if r > 0]
    return SkewStats(
        tuple(int(rows[i]) for i in keep),
        None if bytes_ is None else tuple(int(bytes_[i]) for i in keep),
    )


def stage_slowdown(rows: Sequence[int], slots: int) -> float:
    """How many times longer a stage over these partitions takes than an even spread over ``slots``.

    Spark hands tasks to free slots in partition order; with time proportional to rows, the stage
    ends when the last slot does (list scheduling). This counts what max/median misses: a second
    wave (17 equal partitions on 16 slots take twice an even spread) and too few partitions (two
    on sixteen slots) as well as one large partition (which matters little among many on few slots).
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    total = sum(rows)
    if total == 0:
        return 1.0
    finish = [0.0] * slots
    for r in rows:
        heapq.heapreplace(finish, finish[0] + r)  # the slot that frees first takes the next task
    return max(finish) / (total / slots)


def round_robin_bound(rows: Sequence[int], n: int) -> float:
    """Max/median after ``repartition(n)`` at worst: each input partition deals its rows in turn
    from a random start, so an output holds the floor shares plus at most one row per input."""
    floor = sum(r // n for r in rows)
    extra = sum(1 for r in rows if r % n)
    return (floor + extra) / floor if floor else float(max(1, extra))


def decide(stats: SkewStats, slots: int, threshold: float, min_rows: int) -> tuple[bool, str]:
    """``(rebalance?, why)``: worth a shuffle when the input is not tiny and the stage would take
    ``threshold`` times an even spread over the slots or longer."""
    if stats.total_rows < max(min_rows, 1):
        return False, f"{stats.total_rows:,} rows, below {CONF_MIN_ROWS}={min_rows:,}"
    slow = stage_slowdown(stats.rows, slots)
    if slow < threshold:
        return False, f"stage {slow:.2f}x an even spread over {slots} slots, below {threshold}"
    return True, f"stage {slow:.2f}x an even spread over {slots} slots"


def split_points(sample: Sequence[Any], n: int) -> list[Any]:
    """The ``n - 1`` boundaries that cut the sorted ``sample`` of a sort key into ``n`` runs of
    equal size; a row with key ``k`` goes to partition :func:`partition_of` ``(k, points)`` (keys
    equal to a boundary go below it). A boundary equal to the one before is skipped, so a key
    with many equal values yields fewer, larger ranges rather than empty ones. This is the rule
    of Spark's own range partitioner (``RangePartitioner.determineBounds`` with equal weights),
    which ``repartitionByRange`` applies to a sample of its own when :func:`rebalance` gets a
    ``key``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ordered = sorted(sample)
    step = len(ordered) / n
    target, seen = step, 0
    points: list[Any] = []
    for k in ordered:
        if len(points) == n - 1:
            break
        seen += 1
        if seen >= target and (not points or k > points[-1]):
            points.append(k)
            target += step
    return points


def partition_of(key: Any, points: Sequence[Any]) -> int:
    """The range partition of ``key`` under :func:`split_points`' boundaries."""
    return bisect.bisect_left(points, key)


def measure_skew(
    df: DataFrame, bytes_column: str | None = None, fraction: float = 0.05, seed: int = 0
) -> SkewStats:
    """Rows per partition of ``df`` (counted: no column is read), and with ``bytes_column`` the
    bytes per partition estimated from a ``fraction`` sample of the rows. Two tiny results come
    back to the driver (a count per partition); never the rows."""
    if not 0 < fraction <= 1:
        raise ParamError("fraction", f"must be in (0, 1], got {fraction}")
    pid = F.spark_partition_id().alias("p")
    counts = {int(r.p): int(r["count"]) for r in df.select(pid).groupBy("p").count().collect()}
    order = sorted(counts)
    rows = [counts[p] for p in order]
    if bytes_column is None:
        return skew_stats(rows)
    sampled = (
        df.sample(fraction=fraction, seed=seed)
        .select(pid, F.length(bytes_column).alias("b"))
        .groupBy("p")
        .agg(F.count("*").alias("n"), F.sum("b").alias("b"))
        .collect()
    )
    per_row = {int(r.p): float(r.b or 0) / int(r.n) for r in sampled if r.n}
    total_n = sum(int(r.n) for r in sampled)
    overall = sum(float(r.b or 0) for r in sampled) / total_n if total_n else 0.0
    return skew_stats(rows, [round(counts[p] * per_row.get(p, overall)) for p in order])


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    threshold: float = DEFAULT_THRESHOLD
    min_rows: int = DEFAULT_MIN_ROWS


def read_settings(spark: SparkSession) -> Settings:
    """:class:`Settings` from the session's ``sparkvision.skew.*`` keys; a bad value names its key."""

    def get(key: str, default: Any) -> str:
        return str(spark.conf.get(key, str(default)))

    enabled = get(CONF_REBALANCE, "true").strip().lower()
    if enabled not in ("true", "false"):
        raise ParamError("conf", f"{CONF_REBALANCE} must be true or false, got {enabled!r}")
    try:
        threshold = float(get(CONF_THRESHOLD, DEFAULT_THRESHOLD))
        min_rows = int(get(CONF_MIN_ROWS, DEFAULT_MIN_ROWS))
    except ValueError as e:
        raise ParamError("conf", f"{CONF_THRESHOLD} / {CONF_MIN_ROWS}: {e}") from None
    if threshold < 1:
        raise ParamError("conf", f"{CONF_THRESHOLD} must be >= 1 (1 = always even out), got {threshold}")
    if min_rows < 0:
        raise ParamError("conf", f"{CONF_MIN_ROWS} must be >= 0, got {min_rows}")
    return Settings(enabled == "true", threshold, min_rows)


@dataclass(frozen=True)
class Rebalanced:
    """What :func:`rebalance` did: the DataFrame to use, the partitioning it found, and the plan."""

    df: DataFrame
    before: SkewStats | None
    applied: bool
    partitions: int
    reason: str
    after_bound: float | None = None  # max/median after, at worst (round robin)


def rebalance(
    spark: SparkSession,
    df: DataFrame,
    label: str,
    *,
    slots: int | None = None,
    key: str | None = None,
    settings: Settings | None = None,
) -> Rebalanced:
    """``df`` re-partitioned into one partition per task slot when its partitions would hold a
    stage up (see :func:`decide`), else ``df`` itself; one log line says which and why.

    ``slots`` defaults to the cluster's task slots now; ``key`` picks range partitioning by that
    column instead of round robin; ``settings`` default to the session's ``sparkvision.skew.*``.
    """
    settings = settings or read_settings(spark)
    if not settings.enabled:
        return Rebalanced(df, None, False, 0, f"{CONF_REBALANCE}=false")
    if df.isStreaming:  # a stream's partitions are its micro-batches', not known up front
        return Rebalanced(df, None, False, 0, "a streaming DataFrame")
    n = slots if slots is not None else default_parallelism(spark)
    before = measure_skew(df)
    go, why = decide(before, n, settings.threshold, settings.min_rows)
    if not go:
        log.info("%s: left %s as they are: %s", label, before.describe(), why)
        return Rebalanced(df, before, False, before.partitions, why)
    if key is not None:
        out, how, bound = df.repartitionByRange(n, F.col(key)), f"range of {key}", None
    else:
        out, how, bound = df.repartition(n), "round robin", round_robin_bound(before.rows, n)
    after = f", max/median after <= {bound:.2f}" if bound is not None else ""
    log.info("%s: rebalanced %s into %d by %s (%s%s)", label, before.describe(), n, how, why, after)
    return Rebalanced(out, before, True, n, why, bound)
