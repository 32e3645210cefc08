"""A directory of outputs on any storage Spark writes, as a small store of files.

A training run writes a handful of files under ``--out`` (checkpoints, ``metrics.jsonl``, the
progress file, TensorBoard events, the model directory), and ``--out`` may be a local path, a
``file://`` URI or any URI Hadoop's client knows (``hdfs://``, ``s3a://``, ``abfss://``, ``gs://``,
or a scheme a cluster configures itself). :class:`Store` is the few operations those writes need,
on paths relative to a root, with three implementations chosen by :func:`driver_store`:

* :class:`LocalStore`: plain files (a local path or ``file:`` URI), through ``os``;
* :class:`HadoopStore`: Hadoop's FileSystem through the driver's JVM (a classic session), with
  the cluster's own connectors, credentials and ``spark.hadoop.*`` settings;
* :class:`ArrowStore`: ``pyarrow.fs`` on a Spark Connect client, which has no JVM.

Executors' Python has no JVM either, so a rank never holds one of the last two: it reaches them
through the driver's output sink (:mod:`sparkvision.spark.sink`), which implements the same
protocol over a socket.

Writes replace a file whole: a reader never sees half of it. Where the store renames atomically
(local disks, HDFS) the bytes go to a temporary sibling renamed into place; on object stores
(``s3a``, ``gs``, ``abfss``...) an object appears only when its upload completes and a rename is a
copy, so the bytes go straight to the final name. Callers that need a set of files to appear
together (a checkpoint) write a small file last that names the others (see ``train.checkpoint``).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import pyarrow.fs as pafs
from pyspark.sql import SparkSession

from sparkvision.spark import storage
from sparkvision.spark.session import is_connect

CHUNK = 4 << 20  # bytes per read/write call: bounds memory per transfer, whatever the file's size
# File systems where an object appears only when its upload completes, and rename is a copy.
OBJECT_STORES = frozenset({"s3", "s3a", "s3n", "gs", "abfs", "abfss", "wasb", "wasbs", "oss", "cos", "cosn"})
TMP_MARK = ".tmp-"  # in the name of a file being written (left over only by a crash)
_SEGMENT = re.compile(r"[A-Za-z0-9_.=+-]+")

Write = Callable[[bytes], object]


class Store(Protocol):
    """Files under ``root``, named by relative ``/``-separated paths."""

    root: str

    def child(self, rel: str) -> Store:
        """The store rooted at ``rel`` under this one."""
        ...

    def reader(self, rel: str) -> Iterator[bytes]:
        """The file's bytes in chunks of at most :data:`CHUNK`; FileNotFoundError if absent."""
        ...

    def writer(self, rel: str) -> AbstractContextManager[Write]:
        """A ``write(chunk)`` function; on a clean exit the file replaces ``rel`` whole, on an
        exception nothing is left at ``rel`` that was not there before."""
        ...

    def list(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and directories); [] when it does not exist."""
        ...

    def delete(self, rel: str) -> None:
        """Remove the file or directory tree ``rel``, if it exists."""
        ...

    def exists(self, rel: str) -> bool: ...


def check_rel(rel: str) -> str:
    """``rel`` if it is a plain relative path (no ``..``, no absolute path, no odd characters):
    what the sink accepts from a rank, so a token holder cannot write outside the run's root."""
    if rel == "":
        return rel
    parts = rel.split("/")
    if any(p in ("", ".", "..") or not _SEGMENT.fullmatch(p) for p in parts):
        raise ValueError(f"not a relative output path: {rel!r}")
    return rel


def join(root: str, rel: str) -> str:
    if not root or not rel:
        return rel or root
    return root.rstrip("/") + "/" + rel


def local_path(uri: str) -> str | None:
    """The local filesystem path of ``uri`` (a plain path or ``file:`` URI), else None."""
    if uri.startswith("file://"):
        return uri[len("file://") :] or "/"
    if uri.startswith("file:"):
        return "/" + uri[len("file:") :].lstrip("/")
    if "://" in uri:
        return None
    return os.path.abspath(os.path.expanduser(uri))


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


class _Rooted:
    root: str

    def child(self, rel: str) -> Any:
        other = copy.copy(self)
        other.root = join(self.root, check_rel(rel))
        return other

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"


class LocalStore(_Rooted):
    """Files on this machine's file system."""

    def __init__(self, root: str) -> None:
        self.root = local_path(root) or root

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, check_rel(rel)) if rel else self.root

    def reader(self, rel: str) -> Iterator[bytes]:
        with open(self._path(rel), "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    @contextmanager
    def writer(self, rel: str) -> Iterator[Write]:
        final = self._path(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = final + TMP_MARK + uuid.uuid4().hex[:8]
        try:
            with open(tmp, "wb") as f:
                yield f.write
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def list(self, rel: str = "") -> list[str]:
        path = self._path(rel)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def delete(self, rel: str) -> None:
        path = self._path(rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._path(rel))


class HadoopStore(_Rooted):
    """Files through Hadoop's FileSystem in the driver's JVM (classic sessions only)."""

    def __init__(self, spark: SparkSession, root: str) -> None:
        self.spark, self.root = spark, root.rstrip("/")
        self.direct = _scheme(root) in OBJECT_STORES

    def _fs(self, rel: str) -> tuple[Any, Any]:
        return storage.hadoop_fs(self.spark, join(self.root, check_rel(rel)))

    def reader(self, rel: str) -> Iterator[bytes]:
        fs, p = self._fs(rel)
        if not fs.exists(p):
            raise FileNotFoundError(join(self.root, rel))
        left = int(fs.getFileStatus(p).getLen())
        jvm = self.spark.sparkContext._jvm
        assert jvm is not None  # set while the SparkContext is running
        stream = fs.open(p)
        try:
            while left > 0:
                n = min(CHUNK, left)
                yield bytes(jvm.org.apache.commons.io.IOUtils.toByteArray(stream, n))
                left -= n
        finally:
            stream.close()

    @contextmanager
    def writer(self, rel: str) -> Iterator[Write]:
        fs, final = self._fs(rel)
        target = final if self.direct else self._fs(rel + TMP_MARK + uuid.uuid4().hex[:8])[1]
        out = fs.create(target, True)
        try:
            yield lambda chunk: out.write(bytearray(chunk))
        except BaseException:
            _abort(out)
            fs.delete(target, False)
            raise
        out.close()
        if not self.direct:
            if fs.exists(final):
                fs.delete(final, False)
            if not fs.rename(target, final):
                fs.delete(target, False)
                raise OSError(f"could not move {target.toString()} to {final.toString()}")

    def list(self, rel: str = "") -> list[str]:
        fs, p = self._fs(rel)
        if not fs.exists(p):
            return []
        if not fs.getFileStatus(p).isDirectory():
            return []
        return sorted(str(s.getPath().getName()) for s in fs.listStatus(p))

    def delete(self, rel: str) -> None:
        fs, p = self._fs(rel)
        if fs.exists(p):
            fs.delete(p, True)

    def exists(self, rel: str) -> bool:
        fs, p = self._fs(rel)
        return bool(fs.exists(p))


def _abort(stream: Any) -> None:
    """Drop a Hadoop output stream without publishing it: an object store's upload is completed by
    ``close()``, so an abandoned write is aborted where the stream can (Hadoop's ``Abortable``)."""
    try:
        stream.abort()
    except Exception:  # noqa: BLE001 - not Abortable: close, and the caller deletes the file
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - already broken
            pass


class ArrowStore(_Rooted):
    """Files through ``pyarrow.fs``: a Spark Connect client's stand-in for Hadoop's FileSystem."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.direct = _scheme(root) in OBJECT_STORES

    def _fs(self, rel: str) -> tuple[pafs.FileSystem, str]:
        return storage.arrow_fs(join(self.root, check_rel(rel)))

    def reader(self, rel: str) -> Iterator[bytes]:
        fs, path = self._fs(rel)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(join(self.root, rel))
        with fs.open_input_stream(path) as f:
            while chunk := f.read(CHUNK):
                yield bytes(chunk)

    @contextmanager
    def writer(self, rel: str) -> Iterator[Write]:
        fs, final = self._fs(rel)
        parent = final.rsplit("/", 1)[0]
        if parent and not self.direct:
            fs.create_dir(parent, recursive=True)
        target = final if self.direct else final + TMP_MARK + uuid.uuid4().hex[:8]
        try:
            with fs.open_output_stream(target) as f:
                yield f.write
        except BaseException:
            if fs.get_file_info(target).type != pafs.FileType.NotFound:
                fs.delete_file(target)
            raise
        if not self.direct:
            fs.move(target, final)

    def list(self, rel: str = "") -> list[str]:
        fs, path = self._fs(rel)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))

    def delete(self, rel: str) -> None:
        fs, path = self._fs(rel)
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind != pafs.FileType.NotFound:
            fs.delete_file(path)

    def exists(self, rel: str) -> bool:
        fs, path = self._fs(rel)
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def driver_store(spark: SparkSession | None, uri: str) -> Store:
    """The store for ``uri`` on the driver: local paths through ``os``, other URIs through Hadoop's
    FileSystem (classic) or ``pyarrow.fs`` (Spark Connect)."""
    local = local_path(uri)
    if local is not None:
        return LocalStore(local)
    if spark is None:
        raise ValueError(f"{uri}: a URI needs a Spark session to reach it")
    return ArrowStore(uri) if is_connect(spark) else HadoopStore(spark, uri)


def scratch_dir() -> str | None:
    """Where an executor's Python stages files: Spark's local dirs (``SPARK_LOCAL_DIRS``, set for
    Python workers: the disks Spark itself spills to), else the system's temporary directory."""
    dirs = spark_local_dirs()
    return dirs[0] if dirs else None


def spark_local_dirs() -> list[str]:
    """Spark's local dirs for this executor (``SPARK_LOCAL_DIRS``, which Spark sets for its Python
    workers from ``spark.local.dir`` or the cluster manager's) that exist here."""
    return [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d and os.path.isdir(d)]


# ----------------------------------------------------------------------------- whole files
def read_bytes(store: Store, rel: str) -> bytes:
    return b"".join(store.reader(rel))


def write_bytes(store: Store, rel: str, data: bytes) -> None:
    with store.writer(rel) as write:
        for i in range(0, len(data), CHUNK):
            write(data[i : i + CHUNK])


def upload(store: Store, rel: str, path: str) -> tuple[int, str]:
    """Copy the local file ``path`` to ``rel`` in chunks; ``(bytes, sha256)`` of what was sent."""
    digest, size = hashlib.sha256(), 0
    with store.writer(rel) as write, open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            write(chunk)
    return size, digest.hexdigest()


def download(store: Store, rel: str, path: str) -> tuple[int, str]:
    """Copy ``rel`` to the local file ``path`` in chunks; ``(bytes, sha256)`` of what arrived."""
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for chunk in store.reader(rel):
            digest.update(chunk)
            size += len(chunk)
            f.write(chunk)
    return size, digest.hexdigest()
