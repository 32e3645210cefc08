"""Stratified, seeded label-fraction sampling of the labelled training rows.

The rule, shared by the pure function and the Spark version: in each class of ``n`` rows keep
the ``max(1, round(fraction * n))`` rows whose seeded hash of the row id is smallest. The result
is stratified (every class at the same fraction), reproducible (a function of the ids and the
seed only, not of partitioning or row order), and nested (the 1% sample is inside the 5% one).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Hashable, Iterable

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F


def class_quota(n: int, fraction: float) -> int:
    """Rows kept from a class of ``n`` rows."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    return n if fraction >= 1 else min(n, max(1, round(fraction * n)))


def _key(seed: int, row_id: Hashable) -> bytes:
    return hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()


def stratified_sample(rows: Iterable[tuple[Hashable, int]], fraction: float, seed: int = 0) -> list[Hashable]:
    """``(id, label)`` pairs -> the ids kept, sorted by class then hash."""
    by_class: dict[int, list[Hashable]] = defaultdict(list)
    for row_id, label in rows:
        by_class[label].append(row_id)
    kept: list[Hashable] = []
    for label in sorted(by_class):
        ids = sorted(by_class[label], key=lambda i: _key(seed, i))
        kept += ids[: class_quota(len(ids), fraction)]
    return kept


def sample_label_fraction(
    df: DataFrame, fraction: float, seed: int = 0, id_col: str = "content_id", label_col: str = "label"
) -> DataFrame:
    """The Spark version over labelled rows of ``df``: nothing is collected to the driver.

    Only ``(id, label)`` is shuffled to rank rows within their class by a seeded xxhash64; the
    chosen ids are then semi-joined back to the full rows.
    """
    class_quota(1, fraction)  # validates
    labelled = df.where(F.col(label_col).isNotNull() & (F.col(label_col) >= 0))
    if fraction >= 1:
        return labelled
    keys = labelled.select(id_col, label_col).withColumn(
        "_h", F.xxhash64(F.col(id_col).cast("string"), F.lit(seed))
    )
    w = Window.partitionBy(label_col).orderBy("_h", id_col)
    ranked = keys.withColumn("_r", F.row_number().over(w)).withColumn(
        "_n", F.count(F.lit(1)).over(Window.partitionBy(label_col))
    )
    quota = F.least(F.col("_n"), F.greatest(F.lit(1), F.round(F.col("_n") * F.lit(float(fraction)))))
    chosen = ranked.where(F.col("_r") <= quota).select(id_col)
    return labelled.join(chosen, on=id_col, how="left_semi")
