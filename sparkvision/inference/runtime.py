"""The batch-inference runtime shared by predict, embed, dedup and search: load, rebatch, run.

Runs as ``mapInArrow`` on the executors: Arrow batches of encoded images in, Arrow batches of
results out, the model in calls of bounded size per batch. The model travels as a broadcast of
its safetensors bytes (:class:`ModelBlob`: no shared file system needed, no pickle of code) and is
built once per Python worker process (:func:`worker_model`), then frozen with TorchScript (conv+BN
folded, channels_last), which is what makes a small CNN run 2-3x faster than eager PyTorch on a
CPU. The input transform is
:mod:`sparkvision.transforms.preprocess`, the same one training and the web server use (with
libpng for the PNGs where that gives the same pixels: :mod:`sparkvision.transforms.fastdecode`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from safetensors.torch import load as st_load

from sparkvision.data.table import read_table
from sparkvision.models import ImageModel
from sparkvision.models.modeldir import (
    WEIGHTS,
    ModelSpec,
    Preprocess,
    check_files,
    checked_model,
    read_classes,
    read_preprocess,
    read_spec,
    read_weights,
)
from sparkvision.spark.progress import Timer
from sparkvision.spark.taskclock import task_clock
from sparkvision.transforms.fastdecode import preprocess_arrow

KEEP_COLUMNS = ("content_id", "path", "split", "label", "label_name")

ModelFn = Callable[[torch.Tensor], torch.Tensor]
_CHECKED: set[tuple[str, str, str]] = set()  # models read_blob has checked in this process


@dataclass(frozen=True)
class ModelBlob:
    """What a worker needs to rebuild the model: plain bytes and JSON, small enough to broadcast."""

    key: str
    weights: bytes
    spec: dict[str, Any]
    preprocess: dict[str, Any]
    class_names: list[str]


def read_blob(model_dir: str, param: str = "model_dir") -> ModelBlob:
    """Read a model directory into a :class:`ModelBlob`, checked on this (the driver's) side.

    A missing file is a :class:`FileNotFoundError`; weights that are corrupt or do not fit the
    architecture, or a broken config, are a :class:`~sparkvision.errors.ParamError` on ``param``
    (see :func:`~sparkvision.models.modeldir.checked_model`), raised before any Spark job starts
    and before anything is written, instead of a traceback from every executor task.
    """
    check_files(model_dir)
    with open(os.path.join(model_dir, WEIGHTS), "rb") as f:
        weights = f.read()
    spec, _ = read_spec(model_dir, param)
    pre = read_preprocess(model_dir, param)
    key = hashlib.sha1(weights).hexdigest()
    checked = (key, json.dumps(spec.__dict__, sort_keys=True, default=str), json.dumps(pre.to_json()))
    if checked not in _CHECKED:  # a search request reads the blob each time: check a model once
        checked_model(model_dir, spec, read_weights(model_dir, weights, param), pre, param)
        _CHECKED.add(checked)
    return ModelBlob(key, weights, spec.__dict__, pre.to_json(), read_classes(model_dir, param))


def optimize_for_cpu_inference(model: torch.nn.Module, example: torch.Tensor) -> ModelFn:
    """Freeze with TorchScript (folds BN into conv, pre-packs weights); eager if tracing fails."""
    model = model.eval().to(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example.contiguous(memory_format=torch.channels_last))
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception:  # noqa: BLE001 - some user models do not trace; eager is still correct
        return model


class FeatureModel(torch.nn.Module):
    """A classifier's backbone features, L2-normalised: what embed, search and dedup compare."""

    def __init__(self, model: ImageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D), L2-normalised
        return torch.nn.functional.normalize(self.model.forward_features(x).float(), dim=1)


# One entry per Python worker process; Spark reuses workers across tasks.
_MODELS: dict[tuple[str, str], tuple[ModelFn, Preprocess]] = {}


def worker_model(blob: ModelBlob, mode: str, threads: int | None = None) -> tuple[ModelFn, Preprocess]:
    """The model for ``mode`` ('logits' or 'features') and its preprocessing, built once per worker
    process and frozen for the CPU (or moved to the GPU when there is one).

    ``threads`` (from :func:`task_threads` on the driver) is set on this process's torch at every
    call, since a reused Python worker may run tasks of jobs with other settings; ``None`` (the
    driver, the web server) leaves the process's own setting alone.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    cache_key = (blob.key, mode)
    hit = _MODELS.get(cache_key)
    if hit is not None:
        return hit
    model = ModelSpec(**blob.spec).build()
    model.load_state_dict(st_load(blob.weights))
    model.eval()
    pre = Preprocess.from_json(blob.preprocess)
    net: torch.nn.Module = model if mode == "logits" else FeatureModel(model)
    example = torch.zeros(8, pre.channels, *pre.size)
    fn = optimize_for_cpu_inference(net, example) if not torch.cuda.is_available() else net.cuda()
    _MODELS.clear()  # one model per worker at a time keeps memory flat across jobs
    _MODELS[cache_key] = (fn, pre)
    return fn, pre


def run_model(fn: ModelFn, x: torch.Tensor) -> torch.Tensor:
    """One inference call; on a GPU in bfloat16 autocast, the result always back on the CPU."""
    with torch.inference_mode():
        if torch.cuda.is_available():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(x.cuda(non_blocking=True)).float().cpu()
        return fn(x)


# On a CPU a model call takes at most this many bytes of input: for small images a 512-row call
# streams its first activations through main memory, and 64-row calls (28x28 gray: 200 KiB in)
# ran the same rows 1.1-1.3x faster (cnn, one thread). At least 8 rows, a power of two.
CPU_CALL_BYTES = 256 << 10


def cpu_call_rows(x: torch.Tensor) -> int:
    """Rows per model call on a CPU for input ``x`` (B, C, H, W): :data:`CPU_CALL_BYTES` of it."""
    per_row = max(1, x[0].numel() * x.element_size()) if len(x) else 1
    rows = max(8, CPU_CALL_BYTES // per_row)
    return 1 << (rows.bit_length() - 1)


def run_model_in_calls(fn: ModelFn, x: torch.Tensor) -> torch.Tensor:
    """:func:`run_model` over a batch, in calls of :func:`cpu_call_rows` rows on a CPU (one call
    on a GPU). The Arrow batch and ``--batch-size`` stay as they are. A row's result does not
    depend on its neighbours (inference mode: no batch statistics), but like any change of batch
    size it may differ from a single call's in the last bits."""
    n = len(x) if torch.cuda.is_available() else cpu_call_rows(x)
    if len(x) <= n:
        return run_model(fn, x)
    return torch.cat([run_model(fn, x[i : i + n]) for i in range(0, len(x), n)])


def rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Model-sized batches regardless of how Spark chunked the Arrow stream."""
    pending: list[pa.RecordBatch] = []
    n = 0
    for b in batches:
        pending.append(b)
        n += b.num_rows
        while n >= size:
            t = pa.Table.from_batches(pending).combine_chunks()
            yield t.slice(0, size).to_batches()[0]
            rest = t.slice(size)
            pending = rest.to_batches() if rest.num_rows else []
            n = rest.num_rows
    if n:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


# What a mapInArrow body adds to a batch from the model's output: (batch, output, per-row errors,
# the model's blob) -> the output batch.
Columns = Callable[[pa.RecordBatch, torch.Tensor, list[str | None], ModelBlob], pa.RecordBatch]


def model_batches(
    model: Any, mode: str, batch_size: int, threads: int, clock: str | None, body: str, columns: Columns
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The mapInArrow body every model pass shares (predict, embed): the model built once per
    worker from ``model.value`` (a :class:`~sparkvision.inference.modelref.ModelRef`), rows
    rebatched to ``batch_size``, decoded and preprocessed, the model in calls of bounded size
    (:func:`run_model_in_calls`), then
    ``columns``; each stage timed on the task clock named ``clock`` (nothing when None)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        t = task_clock(clock, body)
        try:
            blob = model.value
            fn, pre = worker_model(blob, mode, threads)
            t.lap("model_load")
            for batch in rebatch(t.inputs(batches), batch_size):
                t.lap("rebatch")
                x, errors = preprocess_arrow(batch.column("image"), pre, threads)
                t.lap("preprocess")
                y = run_model_in_calls(fn, x)
                t.lap("model")
                out = columns(batch, y, errors, blob)
                t.lap("columns")
                t.rows(batch.num_rows)
                yield out
                t.lap("output")
        finally:
            t.close()

    return run


def error_mask(errors: pa.Array) -> np.ndarray | None:
    """Rows with an error as a numpy bool mask for ``pa.array(..., mask=)``; None when none has one."""
    if errors.null_count == len(errors):
        return None
    return errors.is_valid().to_numpy(zero_copy_only=False)


def rows_column(values: np.ndarray, bad: np.ndarray | None, value_type: pa.DataType) -> pa.Array:
    """``(B, K)`` values -> an Arrow ``list<value_type>`` column in one piece, null where ``bad``.

    Built from the flat buffer and fixed offsets, with no Python object per row; a null row's
    offsets still span its K (ignored) values, which Arrow allows.
    """
    n, k = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), value_type)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32), pa.int32())
    return pa.ListArray.from_arrays(offsets, flat, mask=None if bad is None else pa.array(bad))


def vectors_column(vectors: np.ndarray, errors: Sequence[str | None]) -> pa.Array:
    """``(B, D)`` float vectors -> an Arrow ``list<float>`` column, null on rows with an error."""
    return rows_column(
        np.asarray(vectors, np.float32), error_mask(pa.array(errors, pa.string())), pa.float32()
    )


def task_threads(spark: SparkSession) -> int:
    """Threads for one task's torch or FAISS: the cores Spark gives a task (``spark.task.cpus``).

    Read on the driver when a job is planned and passed to the executors inside the task's
    function (which Spark pickles), never through the environment: the driver's environment does
    not reach the executors of a cluster.
    """
    return max(1, int(cast(str, spark.conf.get("spark.task.cpus", "1"))))  # str: a default is given


def configure_workers(spark: SparkSession, batch_size: int) -> int:
    """Arrow batches of ``batch_size`` rows; returns :func:`task_threads`, for the task's function."""
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    return task_threads(spark)


def image_source(spark: SparkSession, table: str | DataFrame, split: str | None) -> DataFrame:
    """The columns batch inference reads: ``image`` plus :data:`KEEP_COLUMNS`."""
    df = read_table(spark, table, split) if isinstance(table, str) else table
    return df.select("image", *KEEP_COLUMNS)


def summarise_output(
    spark: SparkSession, out: str, timer: Timer, kind: str, extra: dict[str, Column] | None = None
) -> dict[str, Any]:
    """Rows, error rows and throughput of a written result table, and the ``extra`` aggregates
    (a caller's accuracy, dimension...) in the same single pass over it: one job, not one each."""
    aggs = [F.count("*").alias("rows"), F.count("error").alias("errors")]
    aggs += [col.alias(name) for name, col in (extra or {}).items()]
    agg = spark.read.parquet(out).agg(*aggs).first()
    assert agg is not None  # a global aggregate has exactly one row
    elapsed = timer.elapsed
    summary = {
        "output": out,
        "kind": kind,
        "rows": int(agg.rows),
        "errors": int(agg.errors),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(agg.rows / max(elapsed, 1e-9), 1),
    }
    summary.update({name: agg[name] for name in extra or {}})
    return summary
