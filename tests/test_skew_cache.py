"""RP (re-partitioning against skew) and RC (the reuse-weighted cache planner): the pure rules
against known answers and a brute-force optimum, then on real DataFrames in the local[2] session."""

from __future__ import annotations

import logging
import random
from itertools import combinations

import pytest
from conftest import make_image, write_tiny_model
from pyspark import StorageLevel
from pyspark.sql import functions as F

from sparkvision.errors import ParamError
from sparkvision.inference.predict import predict_df
from sparkvision.spark.cache import (
    CachePlanner,
    Candidate,
    parse_bytes,
    plan_cache,
    storage_budget,
    storage_budget_bytes,
)
from sparkvision.spark.skew import (
    CONF_MIN_ROWS,
    CONF_REBALANCE,
    CONF_THRESHOLD,
    Settings,
    decide,
    measure_skew,
    partition_of,
    read_settings,
    rebalance,
    round_robin_bound,
    skew_stats,
    split_points,
    stage_slowdown,
)

NONE = StorageLevel(False, False, False, False, 1)

# ----------------------------------------------------------------------------- RP, pure


def test_skew_stats_of_known_counts():
    s = skew_stats([10, 0, 80, 10], [1000, 0, 16000, 3000])
    assert s.rows == (10, 80, 10)  # the empty partition costs no task and is dropped
    assert s.total_rows == 100
    assert s.max_over_median == 8.0
    assert s.largest_share == 0.8
    assert s.bytes_max_over_median == pytest.approx(16000 / 3000)
    assert "largest 80%" in s.describe()
    with pytest.raises(ValueError, match="2 byte counts"):
        skew_stats([1, 2, 3], [1, 2])


def test_stage_slowdown_counts_slots_not_just_the_median():
    assert stage_slowdown([50, 50], 2) == 1.0
    assert stage_slowdown([90, 10], 2) == pytest.approx(1.8)  # max/median says 1.8 too
    assert stage_slowdown([100], 16) == 16.0  # one partition: one core busy
    assert stage_slowdown([10] * 17, 16) == pytest.approx(2 * 16 / 17)  # a second wave
    # one partition 5x the median among 200 on 4 slots: max/median 5, the stage barely longer
    rows = [10] * 100 + [50] + [10] * 99
    assert skew_stats(rows).max_over_median == 5.0
    assert stage_slowdown(rows, 4) < 1.1


def test_decide_leaves_small_or_even_inputs_alone():
    skewed = skew_stats([9000, 500, 500])
    assert decide(skewed, 2, 1.5, 2048)[0]
    ok, why = decide(skew_stats([90, 5, 5]), 2, 1.5, 2048)
    assert not ok and "below" in why and "minRows" in why
    ok, why = decide(skew_stats([5000, 5000]), 2, 1.5, 0)
    assert not ok and "1.00x" in why


def test_round_robin_bound():
    assert round_robin_bound([9000, 500, 500], 2) == 1.0  # even counts deal evenly
    assert round_robin_bound([9001, 501, 500], 2) == pytest.approx(5002 / 5000)


def test_split_points_give_equal_ranges():
    rng = random.Random(0)
    keys = [rng.random() for _ in range(10_000)]
    points = split_points(keys[:400], 8)  # from a 4% sample
    assert len(points) == 7 and points == sorted(points)
    counts = [0] * 8
    for k in keys:
        counts[partition_of(k, points)] += 1
    assert max(counts) / min(counts) < 1.5
    assert split_points([3, 1, 2, 4], 2) == [2]  # keys <= 2 below, the rest above
    assert split_points(["b", "a"], 1) == []


def test_split_points_skip_repeated_keys():
    points = split_points([1] * 90 + list(range(2, 12)), 4)
    assert points == sorted(set(points))  # no empty range between equal boundaries
    assert points[0] == 1


def test_settings_from_conf(spark):
    assert read_settings(spark) == Settings()
    spark.conf.set(CONF_THRESHOLD, "x")
    try:
        with pytest.raises(ParamError, match=CONF_THRESHOLD):
            read_settings(spark)
    finally:
        spark.conf.unset(CONF_THRESHOLD)
    spark.conf.set(CONF_REBALANCE, "sometimes")
    try:
        with pytest.raises(ParamError, match="true or false"):
            read_settings(spark)
    finally:
        spark.conf.unset(CONF_REBALANCE)


# ----------------------------------------------------------------------------- RP, on Spark


def skewed_df(spark, rows: int = 2000):
    """90% of the rows in one partition (a repartition onto a constant), the rest in three."""
    ids = spark.range(rows).withColumn("content_id", F.sha2(F.col("id").cast("string"), 256))
    ids = ids.withColumn("image", F.unhex(F.col("content_id")))
    big = ids.where(F.col("id") < rows * 9 // 10).repartition(1, F.lit(0))
    return big.unionByName(ids.where(F.col("id") >= rows * 9 // 10).repartition(3))


def checksum(df):
    """Count, sum and a sum of hashes of the ids: equal for the same rows in any order."""
    hashed = F.pmod(F.xxhash64("id"), F.lit(1 << 31))
    row = df.agg(F.count("*").alias("n"), F.sum("id").alias("s"), F.sum(hashed).alias("h")).first()
    return row.n, row.s, row.h


def test_rebalance_evens_out_a_skewed_dataframe(spark, caplog):
    df = skewed_df(spark)
    before = measure_skew(df, bytes_column="image", fraction=0.5)
    assert before.largest_share == 0.9 and before.total_rows == 2000
    assert before.bytes is not None and sum(before.bytes) == 2000 * 32  # sha256: 32 bytes a row
    with caplog.at_level(logging.INFO, logger="sparkvision.spark.skew"):
        out = rebalance(spark, df, "test", settings=Settings(min_rows=100))
    assert out.applied and out.partitions == 2  # the local[2] session's task slots
    after = measure_skew(out.df)
    assert after.partitions == 2 and after.max_over_median < 1.01
    assert checksum(out.df) == checksum(spark.range(2000))  # the same ids, each once
    assert "rebalanced 4 partitions of 2,000 rows" in caplog.text and "into 2" in caplog.text


def test_rebalance_by_key_and_switched_off(spark):
    df = skewed_df(spark)
    out = rebalance(spark, df, "test", key="content_id", slots=4, settings=Settings(min_rows=100))
    after = measure_skew(out.df)
    assert after.partitions == 4 and after.max_over_median < 1.5
    assert checksum(out.df) == checksum(spark.range(2000))  # the same ids, each once
    off = rebalance(spark, df, "test", settings=Settings(enabled=False))
    assert not off.applied and off.df is df
    small = rebalance(spark, df, "test")  # 2,000 rows: below the default minRows
    assert not small.applied and small.df is df


def test_predict_rebalances_its_input(spark, tmp_path, caplog):
    """The hook in batch inference: a skewed image DataFrame is spread over the slots before the
    model's mapInArrow (checked in the plan; running the model would start torch in the workers,
    and the rows were shown kept above)."""
    model = write_tiny_model(tmp_path / "m", ["a", "b"])
    schema = "content_id string, path string, image binary, split string, label int, label_name string"
    rows = [(f"id{i:03d}", f"p{i}", make_image(i % 2, seed=i), "test", i % 2, "ab"[i % 2]) for i in range(60)]
    df = spark.createDataFrame(rows, schema).repartition(1, F.lit(0))
    spark.conf.set(CONF_MIN_ROWS, "0")
    try:
        with caplog.at_level(logging.INFO, logger="sparkvision.spark.skew"):
            preds = predict_df(spark, model, df, batch_size=8)
    finally:
        spark.conf.unset(CONF_MIN_ROWS)
    assert "predict: rebalanced 1 partitions of 60 rows" in caplog.text
    plan = preds._jdf.queryExecution().optimizedPlan().toString()
    assert plan.index("MapInArrow") < plan.index("Repartition 2, true")  # the model reads the dealt rows
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparkvision.spark.skew"):
        predict_df(spark, model, df, batch_size=8)  # 60 rows: below the default minRows
    assert "predict: left 1 partitions" in caplog.text


# ----------------------------------------------------------------------------- RC, pure


def brute_force(cands, budget):
    best = 0.0
    for k in range(len(cands) + 1):
        for subset in combinations(cands, k):
            if sum(c.size_bytes for c in subset) <= budget:
                best = max(best, sum(c.saving_s for c in subset))
    return best


def test_plan_is_within_budget_and_close_to_optimal():
    rng = random.Random(0)
    ratios = []
    for _ in range(300):
        cands = [
            Candidate(f"d{i}", rng.randint(0, 8), rng.randint(1, 100), rng.uniform(0.1, 10))
            for i in range(rng.randint(1, 9))
        ]
        budget = rng.randint(1, 300)
        plan = plan_cache(cands, budget)
        by_name = {c.name: c for c in cands}
        assert plan.used_bytes == sum(by_name[n].size_bytes for n in plan.keep) <= budget
        assert plan.saving_s == pytest.approx(sum(by_name[n].saving_s for n in plan.keep))
        opt = brute_force(cands, budget)
        assert plan.saving_s >= 0.5 * opt - 1e-9  # the guarantee of greedy + best single
        ratios.append(plan.saving_s / opt if opt else 1.0)
    assert sum(ratios) / len(ratios) > 0.95
    assert sum(r > 0.999 for r in ratios) / len(ratios) > 0.7  # mostly the optimum itself


def test_plan_orders_by_weight_and_skips_what_saves_nothing():
    cands = [
        Candidate("big", 4, 80, 1.0),  # 4 s saved, 0.05 s/byte
        Candidate("hot", 9, 30, 1.0),  # 9 s, 0.3 s/byte
        Candidate("once", 0, 1, 100.0),  # read once: nothing to save
    ]
    assert plan_cache(cands, 100).keep == ("hot",)
    assert plan_cache(cands, 110).keep == ("hot", "big")
    tie = [Candidate("x", 2, 10, 1.0), Candidate("y", 2, 10, 1.0)]
    assert plan_cache(tie, 10).keep == ("x",) and plan_cache(tie[::-1], 10).keep == ("y",)
    # one candidate worth more than the greedy's pick alone
    assert plan_cache([Candidate("a", 1, 1, 2.0), Candidate("b", 1, 100, 100.0)], 100).keep == ("b",)


def test_budget_from_memory_settings(spark):
    assert (
        parse_bytes("4g") == 4 << 30 and parse_bytes("512m") == 512 << 20 and parse_bytes("1024") == 1 << 30
    )
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")
    assert storage_budget_bytes(4 << 30, 2) == int(((4 << 30) - (300 << 20)) * 0.3) * 2
    assert storage_budget(spark) == storage_budget_bytes(2 << 30, 1)  # the fixture's driver memory


# ----------------------------------------------------------------------------- RC, on Spark


def test_planner_persists_the_most_reused_and_evicts_the_least(spark, caplog):
    a = spark.range(100).withColumn("x", F.lit("a"))
    b = spark.range(100).withColumn("x", F.lit("b"))
    c = spark.range(100).withColumn("x", F.lit("c"))
    with caplog.at_level(logging.INFO, logger="sparkvision.spark.cache"):
        with CachePlanner(spark, budget_bytes=2000, label="t") as cache:
            cache.offer("a", a, reuse=2, size_bytes=1000, cost_s=1.0)
            cache.offer("b", b, reuse=5, size_bytes=1000, cost_s=1.0)
            assert a.storageLevel == b.storageLevel == StorageLevel.MEMORY_AND_DISK
            cache.offer("c", c, reuse=9, size_bytes=1000, cost_s=1.0)  # over budget: a goes
            assert a.storageLevel == NONE
            assert c.storageLevel == StorageLevel.MEMORY_AND_DISK
            assert cache.held == ("b", "c")
            assert c.count() == 100  # fills the cache, still the same rows
            for _ in range(6):  # b's first read and its five reuses
                cache.used("b")
            assert b.storageLevel == NONE  # done, and a gets the room back
            assert a.storageLevel == StorageLevel.MEMORY_AND_DISK
            assert cache.held == ("a", "c")
            for _ in range(9):  # c is held: a read fewer leaves it in front of a (reuse 2)
                cache.used("c")
            assert cache.held == ("a", "c")
            cache.used("c")  # its last read
            assert c.storageLevel == NONE
        assert a.storageLevel == NONE  # let go on the way out
    text = caplog.text
    assert "t: unpersist a" in text and "t: persist c" in text
    assert "unpersist c: its reads are done" in text and "unpersist a: the job is done" in text


def test_planner_sizes_from_the_plan_or_rows(spark):
    df = spark.range(1000)
    with CachePlanner(spark, budget_bytes=10, label="t") as cache:
        cache.offer("plan", df, reuse=3)  # Spark's estimate: 8 bytes a row, over 10 bytes
        assert df.storageLevel == NONE
        other = spark.range(10)
        cache.offer("rows", other, reuse=1, rows=1, row_bytes=8)
        assert other.storageLevel == StorageLevel.MEMORY_AND_DISK
        with pytest.raises(ValueError, match="offered already"):
            cache.offer("rows", other, reuse=1, rows=1, row_bytes=8)
