"""Small files beside tables (metadata JSON), read and written through Hadoop's FileSystem.

Going through the JVM's FileSystem (not Python's ``open``) means a table on ``hdfs://`` or
``s3a://`` gets its metadata written with the cluster's own connectors and credentials, exactly
like the Parquet files Spark writes next to it.

A Spark Connect client has no JVM: there the same operations go through ``pyarrow.fs`` (local
disk, ``s3://``, ``gs://``, ``hdfs://`` with libhdfs), from the client's side. So over Connect a
table's path must name storage the client and the server both see: an object store, HDFS, or a
disk they share (the client on the server's machine).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.fs as pafs
from pyspark.sql import SparkSession

from sparkvision.spark.session import is_connect


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


def hadoop_fs(spark: SparkSession, uri: str) -> tuple[Any, Any]:
    """``(Hadoop FileSystem, Path)`` of ``uri`` in the driver's JVM (classic sessions), with the
    session's Hadoop configuration (``spark.hadoop.*``)."""
    return _fs_and_path(spark, uri)


def arrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path on it)`` for ``uri``: a Spark Connect client's stand-in for Hadoop's.

    Local paths are taken literally (as Hadoop does: ``file:///a b`` is the file ``/a b``, where
    pyarrow's URI parser would refuse the space); other schemes go to ``FileSystem.from_uri``, with
    Hadoop's names for S3 (``s3a://``, ``s3n://``) read as pyarrow's ``s3://``.
    """
    q = qualify(uri)
    if q.startswith("file:"):
        return pafs.LocalFileSystem(), "/" + q[len("file:") :].lstrip("/")
    scheme, sep, rest = q.partition("://")
    if scheme in ("s3a", "s3n"):
        q = "s3" + sep + rest
    try:
        return pafs.FileSystem.from_uri(q)
    except (ValueError, OSError) as e:
        raise ValueError(f"{uri}: not reachable from this Spark Connect client ({e})") from None


def _arrow_info(uri: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, path = arrow_fs(uri)
    return fs, path, fs.get_file_info(path)


def exists(spark: SparkSession, uri: str) -> bool:
    if is_connect(spark):
        return _arrow_info(uri)[2].type != pafs.FileType.NotFound
    fs, p = _fs_and_path(spark, uri)
    return bool(fs.exists(p))


def is_dir(spark: SparkSession, uri: str) -> bool:
    if is_connect(spark):
        return _arrow_info(uri)[2].type == pafs.FileType.Directory
    fs, p = _fs_and_path(spark, uri)
    return bool(fs.exists(p) and fs.getFileStatus(p).isDirectory())


def file_size(spark: SparkSession, uri: str) -> int:
    """Bytes in the file at ``uri``; raises (a Py4J error, or FileNotFoundError over Connect) when
    it is gone or cannot be read."""
    if is_connect(spark):
        info = _arrow_info(uri)[2]
        if info.type == pafs.FileType.NotFound or info.size is None:
            raise FileNotFoundError(uri)
        return int(info.size)
    fs, p = _fs_and_path(spark, uri)
    return int(fs.getFileStatus(p).getLen())


def read_text(spark: SparkSession, uri: str) -> str:
    if is_connect(spark):
        fs, path = arrow_fs(uri)
        with fs.open_input_stream(path) as f:
            return bytes(f.read()).decode("utf-8")
    fs, p = _fs_and_path(spark, uri)
    stream = fs.open(p)
    try:
        jvm = spark.sparkContext._jvm
        assert jvm is not None  # set while the SparkContext is running
        return str(jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
    finally:
        stream.close()


def write_text(spark: SparkSession, uri: str, text: str) -> None:
    if is_connect(spark):
        fs, path = arrow_fs(uri)
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))
        return
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
    if is_connect(spark):
        fs, path, info = _arrow_info(uri)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type != pafs.FileType.NotFound:
            fs.delete_file(path)
        return
    fs, p = _fs_and_path(spark, uri)
    if fs.exists(p):
        fs.delete(p, True)


def rename(spark: SparkSession, src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (absent) on the same filesystem: one rename on local disks and HDFS."""
    if is_connect(spark):
        fs, p = arrow_fs(src)
        _, q, info = _arrow_info(dst)
        if info.type != pafs.FileType.NotFound:
            raise OSError(f"could not move {src} to {dst}: it exists")
        fs.move(p, q)
        return
    fs, p = _fs_and_path(spark, src)
    _, q = _fs_and_path(spark, dst)
    if not fs.rename(p, q):
        raise OSError(f"could not move {src} to {dst}")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
