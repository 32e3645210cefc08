"""Label-fraction sampling is stratified, seeded, reproducible and nested; Spark agrees."""

from __future__ import annotations

from collections import Counter

import pytest

from sparkvision.ssl.sampling import class_quota, sample_label_fraction, stratified_sample

ROWS = [(f"id{i}", i % 4 if i < 360 else 3) for i in range(400)]  # classes 0-2: 90 rows, class 3: 130


def test_stratified_counts():
    kept = stratified_sample(ROWS, 0.1, seed=0)
    labels = dict(ROWS)
    assert Counter(labels[i] for i in kept) == {0: 9, 1: 9, 2: 9, 3: 13}


def test_reproducible_seeded_and_order_free():
    a = stratified_sample(ROWS, 0.05, seed=1)
    assert a == stratified_sample(list(reversed(ROWS)), 0.05, seed=1)
    assert set(a) != set(stratified_sample(ROWS, 0.05, seed=2))


def test_nested_fractions_and_minimum_one():
    small, big = set(stratified_sample(ROWS, 0.01)), set(stratified_sample(ROWS, 0.1))
    assert small <= big
    assert len(small) == 4  # at least one per class
    assert len(stratified_sample(ROWS, 1.0)) == 400


def test_bad_fraction():
    with pytest.raises(ValueError, match="label fraction"):
        class_quota(10, 0.0)


def test_spark_sampling_is_stratified_and_reproducible(spark):
    df = spark.createDataFrame(ROWS + [("unl", None)], "content_id string, label int")
    a = sample_label_fraction(df, 0.1, seed=0)
    got = Counter(r.label for r in a.collect())
    assert got == {0: 9, 1: 9, 2: 9, 3: 13}
    ids = sorted(r.content_id for r in a.collect())
    assert ids == sorted(
        r.content_id for r in sample_label_fraction(df.repartition(3), 0.1, seed=0).collect()
    )
    assert ids != sorted(r.content_id for r in sample_label_fraction(df, 0.1, seed=5).collect())
    assert sample_label_fraction(df, 1.0).count() == 400
