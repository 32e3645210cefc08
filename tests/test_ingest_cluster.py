"""Ingestion on ``local-cluster[2,1,1024]``: two executors in their own JVMs, each with its own
Python workers, so nothing can lean on state shared with the driver process.

The cluster runs in a child process with its own SparkSession (one JVM per Python process can hold
only one SparkContext), which leaves the shared ``local[2]`` session of the other tests untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import write_image_folder

from sparkvision.data.table import read_table

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from sparkvision.data.ingest import ingest
    from sparkvision.spark.session import get_spark

    src, table = sys.argv[1:3]
    spark = get_spark("local-cluster[2,1,1024]", {"spark.sql.shuffle.partitions": "4"})
    sc = spark.sparkContext
    import time
    deadline = time.time() + 120
    while sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < 2 and time.time() < deadline:
        time.sleep(0.5)  # executors register asynchronously
    executors = sc._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus the driver
    worker_pids = sc.parallelize(range(8), 8).map(lambda _: os.getpid()).distinct().collect()
    summary = ingest(spark, src, table, max_pixels=1_000_000)
    print(json.dumps({"master": sc.master, "executors": executors, "driver_pid": os.getpid(),
                      "worker_pids": worker_pids, "summary": summary.to_json()}))
    spark.stop()
    """
)


@pytest.mark.cluster
def test_ingest_on_local_cluster(spark, tmp_path):
    root = write_image_folder(tmp_path / "src", {"a": 5, "b": 3}, fmt="PNG")
    write_image_folder(tmp_path / "src" / "test", {"a": 2, "b": 2}, fmt="JPEG", start_seed=100)
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "notes.jpg").write_text("not an image")
    (root / "b" / "twin.png").write_bytes((root / "a" / "0.png").read_bytes())
    table = str(tmp_path / "table")

    env = {**os.environ, "SPARKVISION_DRIVER_MEMORY": "1g", "SPARKVISION_PROGRESS": "0"}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(root), table], capture_output=True, text=True, timeout=400, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    assert out["master"] == "local-cluster[2,1,1024]" and out["executors"] == 2
    assert out["driver_pid"] not in out["worker_pids"]  # the decoding ran in other processes
    s = out["summary"]
    assert s["rows_by_split"] == {"test": 4, "train": 8}
    assert s["rows_by_class"] == {"a": 7, "b": 5}
    assert s["rejects_by_reason"] == {"duplicate": 1, "empty_file": 1, "not_an_image": 1}
    # What the cluster wrote is an ordinary table for any other session.
    assert read_table(spark, table).count() == 12
