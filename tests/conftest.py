"""Shared fixtures: one local[2] SparkSession per test session, and tiny synthetic images."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from connect_server import connect_server  # noqa: F401  (the `connect` tests' Spark Connect server)
from PIL import Image
from standalone import standalone_cluster  # noqa: F401  (the `cluster` tests' Spark standalone cluster)

os.environ.setdefault("SPARKVISION_PROGRESS", "0")
# Every JVM the tests start (drivers, executors, the standalone cluster's daemons, the Connect
# server) inherits this: the tests' JVMs live seconds to minutes, where C2 compiler threads and the
# parallel collector cost more CPU than they give back on a 2-core machine (about 20% of the
# standalone flow's time). The JVM notes it on stderr ("Picked up JDK_JAVA_OPTIONS").
os.environ.setdefault("JDK_JAVA_OPTIONS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")


@pytest.fixture(scope="session")
def spark():
    from sparkvision.spark.session import get_spark, stop_spark

    stop_spark()
    s = get_spark("local[2]", {"spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g"})
    yield s
    stop_spark()


def make_image(
    kind: int, size: int = 16, mode: str = "L", fmt: str = "PNG", seed: int = 0, noise: float = 8.0
) -> bytes:
    """A small image whose class is visible: class k draws a bright bar at row/column 2k (mod size)."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(40, noise, (size, size)).clip(0, 255)
    pos = (2 * kind + 2) % size
    if kind % 2 == 0:
        arr[pos : pos + 3, :] = 220
    else:
        arr[:, pos : pos + 3] = 220
    img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if mode != "L":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_image_folder(root, classes: dict[str, int], size: int = 16, fmt: str = "PNG", start_seed: int = 0):
    """``root/<class>/<i>.png`` with ``classes[name]`` images each; returns the root path."""
    seed = start_seed
    for k, (name, n) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        ext = "jpg" if fmt == "JPEG" else fmt.lower()
        for i in range(n):
            (d / f"{i}.{ext}").write_bytes(make_image(k, size=size, fmt=fmt, seed=seed))
            seed += 1
    return root


def write_tiny_model(
    path, classes: list[str], metrics: dict | None = None, mean: float = 0.2, std: float = 0.3
):
    """A freshly initialised 16x16 grayscale ``cnn`` model directory (seed 0) for ``classes``."""
    from sparkvision.models import create_model
    from sparkvision.models.modeldir import ModelSpec, Preprocess, save_model_dir

    torch.manual_seed(0)
    model = create_model("cnn", num_classes=len(classes), in_channels=1, image_size=16)
    save_model_dir(
        str(path),
        model,
        ModelSpec("cnn", len(classes), 1, {"image_size": 16}),
        list(classes),
        Preprocess(channels=1, size=(16, 16), mean=(mean,), std=(std,)),
        metrics or {},
    )
    return str(path)


@pytest.fixture(scope="session")
def tiny_table(spark, tmp_path_factory):
    """A labelled 4-class image table (train 64 + test 32 rows of 16x16 grayscale PNGs)."""
    from sparkvision.data.ingest import ingest

    root = tmp_path_factory.mktemp("tiny_images")
    classes = {"a": 0, "b": 0, "c": 0, "d": 0}
    for split, n, seed in (("train", 16, 0), ("test", 8, 10_000)):
        write_image_folder(root / split, {k: n for k in classes}, start_seed=seed)
    table = str(tmp_path_factory.mktemp("tables") / "tiny")
    ingest(spark, str(root), table)
    return table


# ----------------------------------------------------------------------------- PostgreSQL
# The job registry must work on PostgreSQL as well as SQLite. ``postgres_server`` starts one
# throwaway server for the whole session (see tests/pg_server.py); ``postgres_url`` gives each test
# its own fresh database on it. Without the server binaries or psycopg the PostgreSQL tests skip;
# set SPARKVISION_TEST_POSTGRES=require (as CI should) to make that a failure instead.


def _pg_unavailable(reason: str):
    if os.environ.get("SPARKVISION_TEST_POSTGRES", "").lower() == "require":
        pytest.fail(f"SPARKVISION_TEST_POSTGRES=require but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    from pg_server import PgServer, find_pg_bin

    try:
        import psycopg  # noqa: F401
    except ImportError:
        _pg_unavailable("psycopg is not installed (pip install 'psycopg[binary]', the postgres/test extras)")
    bindir = find_pg_bin()
    if bindir is None:
        _pg_unavailable(
            "PostgreSQL server binaries (initdb, postgres) not found: apt-get install "
            "postgresql, or set SPARKVISION_PG_BIN"
        )
    server = PgServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A ``postgresql+psycopg://`` URL of a new, empty database, dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def job_db_url(request, tmp_path):
    """A job-registry URL on each backend: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres_url")


# The files that start clusters or servers run longest; handed to the two xdist workers first
# (with --dist loadfile a file goes where it first appears), they overlap with the quick files
# instead of ending the run one after another.
# (--no-loadscope-reorder: xdist would otherwise order files by their number of tests.)
SLOW_FILES = (
    "test_standalone.py",
    "test_outputs.py",
    "test_detect_train.py",
    "test_ingest_cluster.py",
    "test_connect.py",
    "test_recovery.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: every file keeps its own order
