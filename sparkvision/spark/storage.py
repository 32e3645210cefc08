"""Small files beside tables (metadata JSON), read and written through Hadoop's FileSystem.

Going through the JVM's FileSystem (not Python's ``open``) means a table on ``hdfs://`` or
``s3a://`` gets its metadata written with the cluster's own connectors and credentials, exactly
like the Parquet files Spark writes next to it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pyspark.sql import SparkSession


def qualify(path: str) -> str:
    """A bare local path becomes an absolute ``file:`` URI; URIs are left alone.

    Executors on a real cluster resolve relative paths against their own working directory, so
    every path handed to Spark is made absolute on the driver first.
    """
    if "://" in path or path.startswith("file:"):
        return path
    return "file://" + os.path.abspath(os.path.expanduser(path))


def _fs_and_path(spark: SparkSession, uri: str):
    jvm = spark.sparkContext._jvm
    assert jvm is not None  # set while the SparkContext is running
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    jpath = jvm.org.apache.hadoop.fs.Path(qualify(uri))
    return jpath.getFileSystem(hconf), jpath


def exists(spark: SparkSession, uri: str) -> bool:
    fs, p = _fs_and_path(spark, uri)
    return bool(fs.exists(p))


def is_dir(spark: SparkSession, uri: str) -> bool:
    fs, p = _fs_and_path(spark, uri)
    return bool(fs.exists(p) and fs.getFileStatus(p).isDirectory())


def file_size(spark: SparkSession, uri: str) -> int:
    """Bytes in the file at ``uri``; raises (a Py4J error) when it is gone or cannot be read."""
    fs, p = _fs_and_path(spark, uri)
    return int(fs.getFileStatus(p).getLen())


def read_text(spark: SparkSession, uri: str) -> str:
    fs, p = _fs_and_path(spark, uri)
    stream = fs.open(p)
    try:
        jvm = spark.sparkContext._jvm
        assert jvm is not None  # set while the SparkContext is running
        return str(jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
    finally:
        stream.close()


def write_text(spark: SparkSession, uri: str, text: str) -> None:
    fs, p = _fs_and_path(spark, uri)
    out = fs.create(p, True)
    try:
        out.write(bytearray(text.encode("utf-8")))
    finally:
        out.close()


def read_json(spark: SparkSession, uri: str) -> dict[str, Any]:
    return json.loads(read_text(spark, uri))


def write_json(spark: SparkSession, uri: str, obj: dict[str, Any]) -> None:
    write_text(spark, uri, json.dumps(obj, indent=2, sort_keys=True))


def delete(spark: SparkSession, uri: str) -> None:
    fs, p = _fs_and_path(spark, uri)
    if fs.exists(p):
        fs.delete(p, True)


def rename(spark: SparkSession, src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (absent) on the same filesystem: one rename on local disks and HDFS."""
    fs, p = _fs_and_path(spark, src)
    _, q = _fs_and_path(spark, dst)
    if not fs.rename(p, q):
        raise OSError(f"could not move {src} to {dst}")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
