"""How a model directory reaches the executors' batch-inference tasks.

Classic Spark broadcasts the :class:`~sparkvision.inference.runtime.ModelBlob` (its safetensors
bytes): model directories are read on the driver, and a broadcast needs no storage shared with the
executors (a YARN or Kubernetes node does not see the driver's disk). A Spark Connect client
cannot broadcast, and its tasks' functions travel in each query's plan, where weights would make
every request as large as the model. So over Connect the task carries a :class:`PathModel`: the
directory's path and what the driver checked (the weights' SHA-1, the spec, preprocessing and
class names), and each Python worker reads the weights itself, once, and keeps them. That needs
the directory at the same path on the executors: the client on the server's machine, or a disk
they share: :func:`ship_model` checks that with a one-row job (which also leaves the weights
loaded in that worker), so a path the executors cannot read is one line before any work starts.

Either way a task reads ``ref.value`` (a :class:`ModelBlob`) and builds the model once per worker
process (:func:`~sparkvision.inference.runtime.worker_model`).

A model directory on a URI only Spark's file systems reach (``hdfs://``, ``s3a://``, a training
run's ``--out``) is read on the driver through them (:func:`model_dir_here`): its few files are
copied to a local temporary directory, checked and broadcast as usual.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
from pyspark.sql import SparkSession

from sparkvision.errors import ParamError
from sparkvision.inference.runtime import ModelBlob, read_blob
from sparkvision.models.modeldir import REQUIRED_FILES, WEIGHTS
from sparkvision.spark.filestore import download, driver_store, local_path
from sparkvision.spark.session import is_connect

MODEL_FILES = (*REQUIRED_FILES, "classes.json", "metrics.json")


class ModelRef(Protocol):
    """What a task's function holds: a broadcast or a :class:`PathModel`; ``.value`` is the blob."""

    @property
    def value(self) -> ModelBlob: ...


# The blob a Python worker read by path, by weights digest: one model per worker at a time.
_LOADED: dict[str, ModelBlob] = {}


@dataclass(frozen=True)
class PathModel:
    """A model directory the executors read by its path (pickled into the task: small)."""

    path: str
    key: str  # SHA-1 of the weights the driver checked
    spec: dict[str, Any]
    preprocess: dict[str, Any]
    class_names: list[str]

    @property
    def value(self) -> ModelBlob:
        hit = _LOADED.get(self.key)
        if hit is not None:
            return hit
        weights_path = os.path.join(self.path, WEIGHTS)
        try:
            with open(weights_path, "rb") as f:
                weights = f.read()
        except OSError as e:
            raise FileNotFoundError(
                f"model_dir {self.path}: the executors cannot read {WEIGHTS} ({e.strerror}); over Spark "
                "Connect they read the model directory by its path, so it must be on storage they share"
            ) from None
        if hashlib.sha1(weights).hexdigest() != self.key:
            raise ValueError(f"model_dir {self.path}: {WEIGHTS} changed while the job ran; run it again")
        blob = ModelBlob(self.key, weights, self.spec, self.preprocess, self.class_names)
        _LOADED.clear()  # as worker_model: memory stays flat across jobs
        _LOADED[self.key] = blob
        return blob


@contextmanager
def model_dir_here(spark: SparkSession, model_dir: str, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """A local path to ``model_dir``: itself when local, else a copy of its files (and of those of
    ``extra`` it has) fetched through the session's file systems, removed on exit. A missing
    directory or file is a :class:`FileNotFoundError` naming ``model_dir``, as for a local one."""
    if local_path(model_dir) is not None:
        yield model_dir
        return
    store = driver_store(spark, model_dir)
    names = set(store.list())
    if not names:
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    for name in REQUIRED_FILES:
        if name not in names:
            raise FileNotFoundError(f"{model_dir} is not a sparkvision model directory: {name} is missing")
    with tempfile.TemporaryDirectory(prefix="sparkvision-model-") as here:
        for name in (*MODEL_FILES, *extra):
            if name in names:
                download(store, name, os.path.join(here, name))
        yield here


def ship_model(spark: SparkSession, model_dir: str) -> ModelRef:
    """Read and check ``model_dir`` on the driver, and give the tasks their way to it."""
    if is_connect(spark) and local_path(model_dir) is None:
        raise ParamError(
            "model_dir",
            f"{model_dir}: over Spark Connect the executors read a model directory by its path; "
            "give one on a disk they share",
        )
    with model_dir_here(spark, model_dir) as here:
        blob = read_blob(here)
    if not is_connect(spark):
        return spark.sparkContext.broadcast(blob)
    ref = PathModel(os.path.abspath(model_dir), blob.key, blob.spec, blob.preprocess, blob.class_names)
    rows = spark.range(1).mapInArrow(_probe(ref), "error string").collect()
    errors = [r.error for r in rows if r.error]
    if errors:
        raise FileNotFoundError(errors[0])
    return ref


def _probe(ref: PathModel) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: load ``ref`` on an executor; its error message as data, or null."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        try:
            _ = ref.value
            error = None
        except (OSError, ValueError) as e:
            error = str(e)
        yield pa.RecordBatch.from_pydict({"error": pa.array([error], pa.string())})

    return run
