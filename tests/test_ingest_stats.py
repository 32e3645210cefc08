"""decoded_stats: the one counting job of an ingest, and the duplicate test that lets it skip ranking."""

from __future__ import annotations

import pytest

from sparkvision.data.sources import decoded_stats

COLS = "split string, label_name string, reason string, content_id string"


@pytest.mark.parametrize(
    "rows, duplicates",
    [
        ([("train", "a", None, "x"), ("train", "a", None, "y")], False),
        ([("train", "a", None, "x"), ("train", "b", None, "x")], True),  # across classes
        ([("train", "a", None, "x"), ("test", "a", None, "x")], True),  # across splits
        # rejects have no content id, or one a good row has (a COCO size mismatch): not duplicates
        ([("train", "a", None, "x"), ("train", "a", "truncated", None), ("train", "a", "x", "x")], False),
        ([("unlabeled", None, None, "x"), ("unlabeled", None, None, "x")], True),
    ],
)
def test_duplicates_are_seen_wherever_they_are(spark, rows, duplicates):
    assert decoded_stats(spark.createDataFrame(rows, COLS)).duplicates is duplicates


def test_counts_per_split_class_and_reason(spark):
    rows = [("train", "a", None, "1"), ("train", "a", None, "2"), ("train", "b", "truncated", None)]
    rows += [("unlabeled", None, None, "3"), ("train", "a", "not_an_image", None)]
    stats = decoded_stats(spark.createDataFrame(rows, COLS))
    assert sorted(stats.counts, key=str) == sorted(
        [
            ("train", "a", None, 2),
            ("train", "b", "truncated", 1),
            ("unlabeled", None, None, 1),
            ("train", "a", "not_an_image", 1),
        ],
        key=str,
    )
    assert stats.rows == 5 and stats.label_names == ["a", "b"] and not stats.duplicates


def test_an_empty_source_has_no_counts(spark):
    stats = decoded_stats(spark.createDataFrame([], COLS))
    assert stats.counts == [] and stats.rows == 0 and not stats.duplicates
