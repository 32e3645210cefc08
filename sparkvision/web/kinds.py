"""The job kinds: each maps a pydantic params model to one library call, the same one the CLI makes.

A kind names which of its params are server-side paths (``inputs`` must exist, ``outputs`` may
not yet), so the API can confine every one of them to the data roots before a job is queued.
Kinds whose library module is not in this build are listed with ``available: false`` and a
reason, and submitting one is a 422.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestParams(Params):
    source: str = Field(description="Folder, IDX files or image table to read (inside a data root).")
    table: str = Field(description="Image table to write (inside a data root).")
    kind: Literal["auto", "folder", "idx", "table"] = "auto"
    split: Literal["train", "test", "val", "unlabeled"] | None = None
    labeled: bool = True
    mode: Literal["append", "overwrite"] = "append"
    max_pixels: int = Field(64_000_000, ge=1)


class TrainParams(Params):
    table: str = Field(description="Image table (its train split).")
    out: str = Field(description="Model directory to write.")
    model: str = "cnn"
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    workers: int = Field(1, ge=1, le=1024)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(2e-3, gt=0, le=10)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_epochs: float = Field(0.0, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augment: str | None = Field(None, description="e.g. 'hflip=0.5,crop_padding=2' or 'none'.")
    seed: int = 0
    eval_split: str | None = "test"
    image_size: int | None = Field(None, ge=4, le=4096)
    channels: Literal[1, 3] | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    resume: bool = False


class EvaluateParams(Params):
    model_dir: str
    table: str
    split: str | None = "test"
    batch_size: int = Field(512, ge=1, le=65_536)


class PredictParams(Params):
    model_dir: str
    table: str
    out: str
    top_k: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(512, ge=1, le=65_536)
    split: str | None = None


class EmbedParams(Params):
    model_dir: str
    table: str
    out: str
    bits: Literal[32, 64, 128] | None = None
    code_method: Literal["deepbit", "itq", "lsh"] = "deepbit"
    sample: int = Field(100_000, ge=1)
    split: str | None = None
    batch_size: int = Field(512, ge=1, le=65_536)


class IndexParams(Params):
    features: str = Field(description="Features table from an embed job.")
    out: str = Field(description="Index directory to write.")
    kind: Literal["auto", "flat", "ivf", "ivfpq", "hnsw", "binary_flat", "binary_ivf"] = "auto"
    codes: bool = False
    nprobe: int | None = Field(None, ge=1)
    ef_search: int | None = Field(None, ge=1)


class DedupParams(Params):
    table: str
    out: str
    model_dir: str | None = None
    threshold: float | None = Field(None, ge=-1, le=1)
    keep: Literal["largest", "earliest"] = "largest"
    k: int = Field(16, ge=2, le=1000)
    exact_only: bool = False
    split: str | None = None


class PretrainParams(Params):
    table: str = Field(description="Image table (its pool_split rows; labels ignored).")
    out: str = Field(description="Encoder model directory to write.")
    method: Literal["improved-simclr", "simsiam", "simclr"] | None = None
    preset: str = Field("cpu-small", description="sparkvision.ssl.presets name; fields below override it.")
    epochs: int | None = Field(None, ge=1, le=100_000)
    batch_size: int | None = Field(None, ge=2, le=65_536)
    workers: int | None = Field(None, ge=1, le=1024)
    pool_split: str | None = None
    monitor_split: str | None = None
    resume: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict, description="Other PretrainConfig fields.")


class FinetuneParams(Params):
    table: str = Field(description="Labelled image table.")
    out: str = Field(description="Classifier model directory to write.")
    encoder: str | None = Field(None, description="Pretrained encoder model dir (none: from scratch).")
    label_fraction: float = Field(1.0, gt=0, le=1)
    linear: bool = False
    model: str = "cnn"
    epochs: int = Field(40, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    lr: float = Field(2e-3, gt=0, le=10)
    encoder_lr_scale: float = Field(0.1, ge=0, le=10)
    consistency_weight: float = Field(0.0, ge=0, le=100, description="FixMatch on unlabeled_split (0 = off).")
    unlabeled_split: str = "unlabeled"
    workers: int = Field(1, ge=1, le=1024)
    eval_split: str | None = "test"
    eval_every: int = Field(5, ge=1)
    resume: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict, description="Other FinetuneConfig fields.")


class DistillParams(Params):
    teacher: str = Field(description="Classifier model dir whose soft labels train the student.")
    table: str = Field(description="Image table holding the unlabelled pool.")
    out: str = Field(description="Student classifier model directory to write.")
    encoder: str | None = Field(None, description="Model dir initialising the student (none: random weights).")
    unlabeled_split: str = "unlabeled"
    label_fraction: float = Field(1.0, gt=0, le=1)
    distill_temperature: float = Field(1.0, gt=0, le=100)
    model: str = "cnn"
    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(256, ge=1, le=65_536)
    lr: float = Field(2e-3, gt=0, le=10)
    encoder_lr_scale: float = Field(1.0, ge=0, le=10)
    workers: int = Field(1, ge=1, le=1024)
    eval_split: str | None = "test"
    resume: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict, description="Other FinetuneConfig fields.")


@dataclass
class JobContext:
    """What a running job can tell the runner: progress, live metrics, log lines; and ask: cancelled?"""

    progress: Callable[[float, str], None]
    metrics: Callable[[dict[str, Any]], None]
    log: Callable[[str], None]
    check_cancelled: Callable[[], None]


@dataclass
class Kind:
    name: str
    params: type[Params]
    run: Callable[[Any, Params, JobContext], dict[str, Any]]  # (spark, params, ctx) -> summary
    inputs: tuple[str, ...] = ()  # params that name existing server-side paths
    outputs: tuple[str, ...] = ()  # params that name paths the job writes
    module: str = "sparkvision"  # the library module it needs
    description: str = ""
    result_key: str | None = None  # the output param (where the results are)
    check: Callable[[Any], None] | None = None  # the library's own config validation, run at submit
    extra: dict[str, Any] = field(default_factory=dict)

    def unavailable(self) -> str | None:
        try:
            found = importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            found = False
        return None if found else f"job kind {self.name!r} is not available in this build (no {self.module})"

    def describe(self) -> dict[str, Any]:
        why = self.unavailable()
        return {"kind": self.name, "description": self.description, "available": why is None, "reason": why,
                "inputs": list(self.inputs), "outputs": list(self.outputs),
                "schema": self.params.model_json_schema()}


# ----------------------------------------------------------------------------- the calls


def _ingest(spark, p: IngestParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.data.ingest import ingest

    return ingest(spark, p.source, p.table, kind=p.kind, split=p.split, labeled=p.labeled, mode=p.mode,
                  max_pixels=p.max_pixels).to_json()


def _train_config(p: TrainParams):
    from sparkvision.train import TrainConfig, parse_augment

    return TrainConfig(
        model=p.model, epochs=p.epochs, batch_size=p.batch_size, workers=p.workers, optimizer=p.optimizer, lr=p.lr,
        schedule=p.schedule, warmup_epochs=p.warmup_epochs, weight_decay=p.weight_decay, momentum=p.momentum,
        label_smoothing=p.label_smoothing, augment=parse_augment(p.augment), seed=p.seed,
        eval_split=None if p.eval_split in (None, "none") else p.eval_split,
        image_size=(p.image_size, p.image_size) if p.image_size else None, channels=p.channels, resume=p.resume,
        model_kwargs=dict(p.model_kwargs),
    )


def _check_train(p: TrainParams) -> None:
    from sparkvision.models import list_models

    if p.model not in list_models():
        raise ValueError(f"model {p.model!r} is not registered; choose from {', '.join(list_models())}")
    _train_config(p).validate()


def _train(spark, p: TrainParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.train import train as run_train

    return run_train(spark, p.table, p.out, _train_config(p))


def _evaluate(spark, p: EvaluateParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.inference.evaluate import evaluate

    return evaluate(spark, p.model_dir, p.table, None if p.split in (None, "all") else p.split, None, p.batch_size)


def _predict(spark, p: PredictParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.inference.runtime import predict_table

    out = predict_table(spark, p.model_dir, p.table, p.out, top_k=p.top_k, batch_size=p.batch_size, split=p.split)
    write_source_note(p.out, p.table)
    return {**out, "source_table": p.table}


SOURCE_NOTE = "_sparkvision_source.json"  # beside a derived table: which image table it came from


def write_source_note(out: str, table: str) -> None:
    """Lets the table browser find thumbnails for a prediction table (it keeps ids, not bytes)."""
    import json
    import os

    local = out.removeprefix("file://").removeprefix("file:")
    if os.path.isdir(local):
        with open(os.path.join(local, SOURCE_NOTE), "w") as f:
            json.dump({"table": table}, f)


def _embed(spark, p: EmbedParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.retrieval.embed import embed_with_codes

    return embed_with_codes(spark, p.model_dir, p.table, p.out, bits=p.bits, method=p.code_method, sample=p.sample,
                            split=p.split, batch_size=p.batch_size)


def _counting_progress(ctx: JobContext, total: int | None):
    done = [0]

    def progress(n: int, note: str = "") -> None:
        ctx.check_cancelled()  # cooperative cancel for work outside Spark (FAISS, driver loops)
        done[0] += n
        ctx.progress(100.0 * done[0] / total if total else 0.0, note)

    return progress


def _index(spark, p: IndexParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.retrieval.index import build_index, count_rows

    params: dict[str, int] = {}
    if p.nprobe is not None:
        params["nprobe"] = p.nprobe
    if p.ef_search is not None:
        params["efSearch"] = p.ef_search
    return build_index(p.features, p.out, column="code" if p.codes or p.kind.startswith("binary") else None,
                       kind=p.kind.removeprefix("binary_") if p.codes else p.kind, params=params,
                       progress=_counting_progress(ctx, count_rows(p.features)))


def _dedup(spark, p: DedupParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.retrieval.dedup import dedup_table

    return dedup_table(spark, p.table, p.out, model_dir=p.model_dir, threshold=p.threshold, keep=p.keep, split=p.split,
                       k=p.k, exact_only=p.exact_only, progress=_counting_progress(ctx, None))


def _pretrain_overrides(p: PretrainParams) -> dict[str, Any]:
    named = {k: v for k, v in p.model_dump(exclude={"table", "out", "method", "preset", "overrides"}).items()
             if v is not None}
    return {**p.overrides, **named}


def _check_pretrain(p: PretrainParams) -> None:
    from sparkvision.ssl.presets import resolve

    resolve(p.preset, method=p.method, **_pretrain_overrides(p)).validate()


def _pretrain(spark, p: PretrainParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.ssl.pretrain import pretrain

    return pretrain(spark, p.table, p.out, method=p.method, preset=p.preset, **_pretrain_overrides(p))


def _finetune_config(p: FinetuneParams):
    from sparkvision.ssl.config import FinetuneConfig

    fields = p.model_dump(exclude={"table", "out", "encoder", "eval_every", "overrides"})
    return _config_from(FinetuneConfig, {**p.overrides, **fields})


def _config_from(cls, d: dict[str, Any]):
    """``cls.from_json`` (nested augment dicts become AugmentConfig) that names unknown keys."""
    unknown = sorted(set(d) - set(cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) in overrides: {', '.join(unknown)}")
    return cls.from_json(d)


def _finetune(spark, p: FinetuneParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.ssl.finetune import finetune

    return finetune(spark, p.table, p.out, encoder=p.encoder, cfg=_finetune_config(p), eval_every=p.eval_every)


def _distill_config(p: DistillParams):
    from sparkvision.ssl.config import FinetuneConfig

    fields = p.model_dump(exclude={"teacher", "table", "out", "encoder", "overrides"})
    return _config_from(FinetuneConfig, {"label_smoothing": 0.0, **p.overrides, **fields})


def _distill(spark, p: DistillParams, ctx: JobContext) -> dict[str, Any]:
    from sparkvision.ssl.finetune import finetune

    return finetune(spark, p.table, p.out, encoder=p.encoder, cfg=_distill_config(p), eval_every=1, teacher=p.teacher)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("ingest", IngestParams, _ingest, inputs=("source",), outputs=("table",), module="sparkvision.data.ingest",
             description="Ingest a folder / IDX files / table into an image table.", result_key="table"),
        Kind("train", TrainParams, _train, inputs=("table",), outputs=("out",), module="sparkvision.train.engine",
             description="Train a classifier data-parallel (DDP on Spark barrier tasks).", result_key="out",
             check=_check_train),
        Kind("pretrain", PretrainParams, _pretrain, inputs=("table",),
             outputs=("out",), module="sparkvision.ssl.pretrain",
             description="Self-supervised pretraining on unlabelled images.", result_key="out",
             check=_check_pretrain),
        Kind("finetune", FinetuneParams, _finetune,
             inputs=("table",), outputs=("out",), module="sparkvision.ssl.finetune",
             description="Fine-tune a pretrained backbone on labelled images.", result_key="out",
             check=lambda p: _finetune_config(p).validate()),
        Kind("distill", DistillParams, _distill,
             inputs=("teacher", "table"), outputs=("out",), module="sparkvision.ssl.finetune",
             description="Distil a fine-tuned teacher into a student on unlabelled images (SimCLRv2).",
             result_key="out", check=lambda p: _distill_config(p).validate()),
        Kind("evaluate", EvaluateParams, _evaluate, inputs=("model_dir", "table"), module="sparkvision.inference.evaluate",
             description="Accuracy, per-class metrics and confusion matrix (written into the model dir).",
             result_key="model_dir"),
        Kind("predict", PredictParams, _predict, inputs=("model_dir", "table"), outputs=("out",),
             module="sparkvision.inference.runtime", description="Classify every row of a table.", result_key="out"),
        Kind("embed", EmbedParams, _embed, inputs=("model_dir", "table"), outputs=("out",),
             module="sparkvision.retrieval.embed", description="Backbone features (and binary codes) of a table.",
             result_key="out"),
        Kind("index", IndexParams, _index, inputs=("features",), outputs=("out",), module="sparkvision.retrieval.index",
             description="Build a FAISS index from a features table.", result_key="out"),
        Kind("dedup", DedupParams, _dedup, inputs=("table",), outputs=("out",), module="sparkvision.retrieval.dedup",
             description="Exact and near-duplicate groups of an image table.", result_key="out"),
    )
}
# Optional inputs: confined to the data roots when given.
KINDS["dedup"].extra["optional_inputs"] = ("model_dir",)
KINDS["finetune"].extra["optional_inputs"] = ("encoder",)
KINDS["distill"].extra["optional_inputs"] = ("encoder",)
