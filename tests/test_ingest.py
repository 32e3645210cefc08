"""Ingestion on Spark (the shared local[2] session): folders, IDX files, tables, appends, rejects, CLI.

Every image is made by the test, a few bytes each; nothing touches the network.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_image, write_image_folder
from PIL import Image
from typer.testing import CliRunner

from sparkvision.cli import app
from sparkvision.data.ingest import ingest
from sparkvision.data.schema import REJECT_REASONS, TABLE_SCHEMA
from sparkvision.data.sources import detect_source_kind
from sparkvision.data.table import read_meta, read_table, write_meta

# --------------------------------------------------------------------------- helpers


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rows(spark, table):
    return {
        r.path.rsplit("/", 1)[-1] if "#" not in r.path else r.path.rsplit("/", 1)[-1]: r
        for r in read_table(spark, table).drop("image").collect()
    }


def _rejects(spark, rejects_table) -> dict[str, tuple[str, str]]:
    """file name -> (reason, detail) from a rejects table."""
    return {
        r.path.rsplit("/", 1)[-1]: (r.reason, r.detail) for r in spark.read.parquet(rejects_table).collect()
    }


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    """An IDX file (the MNIST format): magic 0x0000 0x08 ndim, big-endian dims, uint8 data."""
    data = (
        bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    )
    path.write_bytes(gzip.compress(data) if gz else data)


# --------------------------------------------------------------------------- a folder full of bad files

# file (relative to the root) -> the reason it must be rejected with
BAD_FILES = {
    "cat/empty.png": "empty_file",
    "cat/half.png": "truncated",
    "dog/half.jpg": "truncated",
    "dog/notes.jpg": "not_an_image",
    "cat/lab.tif": "unsupported_mode",
    "cat/bomb.png": "too_many_pixels",
    "dog/vanished.png": "unreadable",
    "cat/copy_of_0.png": "duplicate",
}
GOOD = {"cat": 6, "dog": 4}


def _write_bad_files(root) -> None:
    big = make_image(3, size=64, mode="RGB", fmt="PNG", noise=60)
    big_jpg = make_image(3, size=64, mode="RGB", fmt="JPEG", noise=60)
    content = {
        "cat/empty.png": b"",
        "cat/half.png": big[: len(big) // 2],
        "dog/half.jpg": big_jpg[: len(big_jpg) // 2],
        "dog/notes.jpg": b"shopping list: milk, eggs\n",
        "cat/lab.tif": _save(
            Image.new("LAB", (8, 8)), "TIFF"
        ),  # 16-bit and CMYK are read: test_hardening_input
        "cat/bomb.png": _save(Image.new("L", (4000, 4000)), "PNG"),  # 16 Mpx in a few kB
        "dog/vanished.png": make_image(1, seed=99),
        "cat/copy_of_0.png": (root / "cat" / "0.png").read_bytes(),
    }
    assert content.keys() == BAD_FILES.keys()
    for rel, data in content.items():
        (root / rel).write_bytes(data)


@pytest.fixture(scope="module")
def corrupt_ingest(spark, tmp_path_factory):
    """One ingest of a labelled folder holding good images and one file of every bad kind."""
    root = tmp_path_factory.mktemp("corrupt")
    write_image_folder(root, {"cat": GOOD["cat"]}, fmt="PNG")
    write_image_folder(root, {"dog": GOOD["dog"]}, fmt="JPEG", start_seed=50)
    # write_image_folder names classes by position; dog images draw class-0 bars, which is fine here.
    _write_bad_files(root)
    table = str(tmp_path_factory.mktemp("out") / "corrupt")

    def remove_after_listing() -> None:  # we run as root, so chmod 000 would not stop a read
        os.remove(root / "dog" / "vanished.png")

    summary = ingest(spark, str(root), table, max_pixels=1_000_000, on_listed=remove_after_listing)
    return summary, table


def test_corrupt_folder_keeps_every_good_image(spark, corrupt_ingest):
    summary, table = corrupt_ingest
    rows = _rows(spark, table)
    assert summary.rows_written == len(rows) == sum(GOOD.values())
    assert summary.rows_by_class == GOOD
    assert summary.rows_by_split == {"train": 10}
    assert not set(rows) & {n.rsplit("/", 1)[-1] for n in BAD_FILES}
    assert {r.format for r in rows.values()} == {"PNG", "JPEG"}
    assert summary.class_names == ["cat", "dog"] == read_meta(spark, table).class_names
    assert all(r.label == summary.class_names.index(r.label_name) for r in rows.values())


def test_summary_counts_every_reject_by_reason(corrupt_ingest):
    summary, _ = corrupt_ingest
    expected: dict[str, int] = {}
    for reason in BAD_FILES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert summary.rejects_by_reason == dict(sorted(expected.items()))
    assert summary.duplicates_in_source == 1
    assert set(summary.rejects_by_reason) <= set(REJECT_REASONS)


@pytest.mark.parametrize(
    ("name", "reason"), sorted(BAD_FILES.items()), ids=lambda v: str(v).replace("/", "_")
)
def test_bad_file_is_in_rejects_table_with_its_reason(spark, corrupt_ingest, name, reason):
    summary, _ = corrupt_ingest
    rejects = _rejects(spark, summary.rejects_table)
    assert rejects[name.rsplit("/", 1)[-1]][0] == reason


def test_duplicate_reject_names_the_kept_copy(spark, corrupt_ingest):
    summary, _ = corrupt_ingest
    reason, detail = _rejects(spark, summary.rejects_table)["copy_of_0.png"]
    assert reason == "duplicate" and detail.endswith("/cat/0.png")


def test_rejects_table_schema(spark, corrupt_ingest):
    summary, _ = corrupt_ingest
    df = spark.read.parquet(summary.rejects_table)
    assert {"path", "reason", "detail", "size_bytes", "source", "ingested_at"} <= set(df.columns)
    sizes = {r.path.rsplit("/", 1)[-1]: r.size_bytes for r in df.collect()}
    assert sizes["empty.png"] == 0


# --------------------------------------------------------------------------- layouts


def test_labelled_class_folders(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"shirt": 3, "shoe": 5, "bag": 1})
    s = ingest(spark, str(root), str(tmp_path / "t"))
    assert s.source_kind == "folder"
    assert s.rows_by_class == {"bag": 1, "shirt": 3, "shoe": 5}  # class imbalance is reported as is
    assert s.rows_by_split == {"train": 9}
    df = read_table(spark, str(tmp_path / "t"))
    assert [(f.name, f.dataType) for f in df.schema] == [(f.name, f.dataType) for f in TABLE_SCHEMA]
    names = read_meta(spark, str(tmp_path / "t")).class_names
    for r in df.collect():
        assert names[r.label] == r.label_name == r.path.split("/")[-2]
        assert (r.height, r.width, r.channels, r.original_mode) == (16, 16, 1, "L")
        assert (
            r.image == (root / r.label_name / r.path.rsplit("/", 1)[-1]).read_bytes()
        )  # bytes kept as they came


def test_split_then_class_folders(spark, tmp_path):
    root = tmp_path / "src"
    write_image_folder(root / "train", {"a": 3, "b": 2})
    write_image_folder(root / "test", {"a": 1, "b": 2}, start_seed=100)
    write_image_folder(root / "val", {"b": 1}, start_seed=200)
    s = ingest(spark, str(root), str(tmp_path / "t"))
    assert s.rows_by_split == {"test": 3, "train": 5, "val": 1}
    assert s.rows_by_class == {"a": 4, "b": 5}
    assert s.class_names == ["a", "b"]  # split names are never taken for classes
    rows = read_table(spark, str(tmp_path / "t"), split="test").collect()
    assert sorted(r.label_name for r in rows) == ["a", "b", "b"]


def test_flat_folder_is_unlabelled(spark, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(make_image(i, seed=i))
    s = ingest(spark, str(root), str(tmp_path / "t"))
    assert s.rows_by_split == {"unlabeled": 4}
    assert s.class_names == []
    rows = read_table(spark, str(tmp_path / "t")).collect()
    assert {(r.label, r.label_name, r.split) for r in rows} == {(None, None, "unlabeled")}


def test_unlabeled_flag_and_forced_split(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    s = ingest(spark, str(root), str(tmp_path / "t"), labeled=False, split="val")
    assert s.rows_by_split == {"val": 4}
    assert {r.label for r in read_table(spark, str(tmp_path / "t")).collect()} == {None}


def test_glob_filters_files(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"a": 2})
    (root / "a" / "README.txt").write_text("not an image, and not matched")
    s = ingest(spark, str(root), str(tmp_path / "t"), glob="*.png")
    assert s.rows_written == 2 and s.rejects_by_reason == {}


# --------------------------------------------------------------------------- IDX


@pytest.fixture
def idx_arrays():
    rng = np.random.default_rng(0)
    return {
        "train": (rng.integers(0, 256, (7, 5, 4), dtype=np.uint8), rng.integers(0, 3, 7, dtype=np.uint8)),
        "test": (rng.integers(0, 256, (3, 5, 4), dtype=np.uint8), np.array([2, 0, 1], dtype=np.uint8)),
    }


def test_idx_gzipped_and_raw_with_labels(spark, tmp_path, idx_arrays):
    src = tmp_path / "idx"
    src.mkdir()
    (train_x, train_y), (test_x, test_y) = idx_arrays["train"], idx_arrays["test"]
    write_idx(src / "train-images-idx3-ubyte.gz", train_x, gz=True)
    write_idx(src / "train-labels-idx1-ubyte.gz", train_y, gz=True)
    write_idx(src / "t10k-images-idx3-ubyte", test_x, gz=False)
    write_idx(src / "t10k-labels-idx1-ubyte", test_y, gz=False)
    assert detect_source_kind(spark, str(src)) == "idx"
    s = ingest(spark, str(src), str(tmp_path / "t"), class_names=["x", "y", "z"])
    assert s.source_kind == "idx"
    assert s.rows_by_split == {"test": 3, "train": 7}
    assert s.class_names == ["x", "y", "z"]
    for r in read_table(spark, str(tmp_path / "t")).collect():
        name, index = r.path.rsplit("/", 1)[-1].split("#")
        x, y = (train_x, train_y) if name.startswith("train") else (test_x, test_y)
        assert (r.height, r.width, r.channels, r.format) == (5, 4, 1, "PNG")
        assert r.split == ("train" if name.startswith("train") else "test")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.image))), x[int(index)])
        assert r.label == int(y[int(index)]) and r.label_name == "xyz"[r.label]


def test_idx_images_without_labels(spark, tmp_path, idx_arrays):
    src = tmp_path / "idx"
    src.mkdir()
    write_idx(src / "t10k-images-idx3-ubyte.gz", idx_arrays["test"][0], gz=True)
    s = ingest(spark, str(src / "t10k-images-idx3-ubyte.gz"), str(tmp_path / "t"))  # a single file works too
    assert s.rows_written == 3
    assert {(r.label, r.label_name) for r in read_table(spark, str(tmp_path / "t")).collect()} == {
        (None, None)
    }


# --------------------------------------------------------------------------- appends and duplicates


def test_append_skips_content_already_in_the_table(spark, tmp_path):
    first = write_image_folder(tmp_path / "first", {"a": 3, "b": 2})
    table = str(tmp_path / "t")
    assert ingest(spark, str(first), table).rows_written == 5
    # The second source holds the first one's images (under other names) plus three new ones.
    second = write_image_folder(tmp_path / "second", {"a": 3, "b": 2})
    write_image_folder(tmp_path / "second", {"c": 3}, start_seed=500)
    s = ingest(spark, str(second), table)
    assert s.rows_written == 3
    assert s.duplicates_of_table == 5 and s.duplicates_in_source == 0
    assert s.rejects_by_reason == {"duplicate": 5}
    assert s.class_names == ["a", "b", "c"]  # old classes keep their indices
    df = read_table(spark, table)
    assert df.count() == 8 == df.select("content_id").distinct().count()
    assert _rejects(spark, s.rejects_table)["0.png"] == ("duplicate", "content already in the table")
    # Re-running the same ingest adds nothing.
    assert ingest(spark, str(second), table).rows_written == 0
    assert read_table(spark, table).count() == 8


def test_overwrite_replaces_the_table(spark, tmp_path):
    table = str(tmp_path / "t")
    ingest(spark, str(write_image_folder(tmp_path / "a", {"a": 3})), table)
    s = ingest(
        spark, str(write_image_folder(tmp_path / "b", {"b": 2}, start_seed=9)), table, mode="overwrite"
    )
    assert s.rows_written == 2 == read_table(spark, table).count()


def test_exact_duplicates_in_one_source_are_reported(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"a": 2})
    data = (root / "a" / "0.png").read_bytes()
    (root / "a" / "again.png").write_bytes(data)
    (root / "a" / "and_again.png").write_bytes(data)
    s = ingest(spark, str(root), str(tmp_path / "t"))
    assert s.rows_written == 2
    assert s.duplicates_in_source == 2 and s.rejects_by_reason == {"duplicate": 2}


def test_table_source_copies_rows_and_class_names(spark, tmp_path):
    src_table = str(tmp_path / "src_table")
    ingest(spark, str(write_image_folder(tmp_path / "src", {"p": 2, "q": 1})), src_table)
    assert detect_source_kind(spark, src_table) == "table"
    s = ingest(spark, src_table, str(tmp_path / "copy"))
    assert s.source_kind == "table" and s.rows_written == 3 and s.class_names == ["p", "q"]
    a = {r.content_id: (r.label_name, r.original_mode) for r in read_table(spark, src_table).collect()}
    b = {
        r.content_id: (r.label_name, r.original_mode)
        for r in read_table(spark, str(tmp_path / "copy")).collect()
    }
    assert a == b and {m for _, m in a.values()} == {"L"}


def test_a_table_written_before_original_mode_reads_and_appends(spark, tmp_path):
    """Older tables have no original_mode column: it reads as null, and appending to such a
    table, or copying it, works."""
    new, table = str(tmp_path / "new"), str(tmp_path / "old")
    ingest(spark, str(write_image_folder(tmp_path / "src", {"p": 2})), new)
    spark.read.parquet(new).drop("original_mode").write.parquet(table)
    write_meta(spark, table, read_meta(spark, new))
    assert {r.original_mode for r in read_table(spark, table).collect()} == {None}
    s = ingest(spark, str(write_image_folder(tmp_path / "more", {"p": 1}, start_seed=50)), table)
    assert s.rows_written == 1
    assert sorted(map(str, (r.original_mode for r in read_table(spark, table).collect()))) == [
        "L",
        "None",
        "None",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "nonsense"}, "split 'nonsense'"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"kind": "zip"}, "kind 'zip'"),
        ({"mode": "merge"}, "mode 'merge'"),
        ({"max_side": 0}, "max_side"),
        ({"max_side": -3}, "max_side"),
    ],
)
def test_bad_arguments_name_the_parameter(spark, tmp_path, kwargs, message):
    root = write_image_folder(tmp_path / "src", {"a": 1})
    with pytest.raises(ValueError, match=message):
        ingest(spark, str(root), str(tmp_path / "t"), **kwargs)


def test_missing_source_names_the_path(spark, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ingest(spark, str(tmp_path / "nowhere"), str(tmp_path / "t"))


# --------------------------------------------------------------------------- CLI

runner = CliRunner()
SPARKVISION = os.path.join(os.path.dirname(sys.executable), "sparkvision")  # the console script


def test_cli_json_prints_one_object(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"a": 2, "b": 1})
    (root / "a" / "bad.png").write_bytes(b"")
    result = runner.invoke(app, ["ingest", str(root), str(tmp_path / "t"), "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["rows_written"] == 3 and summary["rejects_by_reason"] == {"empty_file": 1}
    assert summary["rows_by_class"] == {"a": 2, "b": 1}


def test_cli_human_summary(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"a": 2})
    result = runner.invoke(app, ["ingest", str(root), str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split())  # a long path may wrap in the table's cell
    for text in ("rows per split", "rows per class", "images/s", str(tmp_path / "t")):
        assert "".join(text.split()) in flat


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--split", "nonsense"], "--split"),
        (["--max-pixels", "0"], "--max-pixels"),
        (["--kind", "zip"], "--kind"),
        (["--max-side", "0"], "--max-side"),
        (["--max-side", "-5"], "--max-side"),
    ],
)
def test_cli_bad_parameter_exits_2_naming_it(spark, tmp_path, args, named):
    root = write_image_folder(tmp_path / "src", {"a": 1})
    result = runner.invoke(app, ["ingest", str(root), str(tmp_path / "t"), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert named in result.output
    if named == "--max-side":  # the error is one line
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_cli_missing_source_exits_2(spark, tmp_path):
    result = runner.invoke(
        app, ["ingest", str(tmp_path / "nowhere"), str(tmp_path / "t")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "nowhere" in result.output and "does not exist" in result.output


def test_cli_missing_source_json_is_an_error_object(spark, tmp_path):
    result = runner.invoke(app, ["ingest", str(tmp_path / "nowhere"), str(tmp_path / "t"), "--json"])
    assert result.exit_code == 2
    assert "does not exist" in json.loads(result.stdout)["error"]


def test_datasets_fashion_mnist_says_how_to_get_the_data():
    result = subprocess.run(
        [SPARKVISION, "datasets", "fashion-mnist", "/tmp/never-written", "--source", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "/nonexistent" in result.stderr and "that folder as source" in result.stderr


def test_cli_subprocess_json_stdout_is_clean(tmp_path):
    """A real process: JVM banners and progress must stay off stdout, which holds one JSON object."""
    root = write_image_folder(tmp_path / "src", {"a": 2})
    result = subprocess.run(
        [
            SPARKVISION,
            "ingest",
            str(root),
            str(tmp_path / "t"),
            "--json",
            "--master",
            "local[1]",
            "--conf",
            "spark.driver.memory=1g",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "SPARKVISION_PROGRESS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["rows_written"] == 2
