"""The contenders of ``bench_peers.py``, each what a user of that engine would write.

Every inference contender loads the same model directory (:func:`sparkvision.models.modeldir.load_model_dir`)
and feeds it the directory's own preprocessing (8-bit pixels / 255, then mean and std); peers run
the eager model, as their users would. :func:`run_contender` runs one and returns
``{"rows": ..., "seconds": ...}``; the engine's start (JVM, Ray, Daft) is not in ``seconds``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from sparkvision.inference.runtime import FeatureModel
from sparkvision.models import create_model
from sparkvision.models.modeldir import ModelSpec, Preprocess, load_model_dir, save_model_dir

CORES = os.cpu_count() or 1
# Spark's Python workers unpickle the UDFs below by reference to this module: put its folder on
# the path they inherit (local mode: the JVM starts with this process's environment).
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")) if p
)
Outputs = dict[str, np.ndarray]


def untrained_cnn(out: str) -> str:
    """A ``cnn`` model directory for Fashion-MNIST; speed does not depend on the weights."""
    save_model_dir(
        out,
        create_model("cnn", 10, 1),
        ModelSpec("cnn", 10, 1, {"image_size": 28}),
        [str(i) for i in range(10)],
        Preprocess(1, (28, 28), (0.286,), (0.353,)),
    )
    return out


def pil_pixels(images: Sequence[bytes], pre: Preprocess) -> np.ndarray:
    """Encoded images -> uint8 ``(B, H, W[, C])`` with PIL, as a user writes it."""
    mode = "L" if pre.channels == 1 else "RGB"
    h, w = pre.size
    out = []
    for data in images:
        img = Image.open(io.BytesIO(data)).convert(mode)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        out.append(np.asarray(img))
    return np.stack(out)


def model_fn(model_dir: str, task: str, threads: int) -> tuple[Callable[[np.ndarray], Outputs], Preprocess]:
    """uint8 pixels ``(B, H, W[, C])`` -> outputs: top-3 classes (predict) or features (embed)."""
    torch.set_num_threads(threads)
    lm = load_model_dir(model_dir)
    net = (lm.model if task == "predict" else FeatureModel(lm.model)).eval()
    pre = lm.preprocess

    def run(pixels: np.ndarray) -> Outputs:
        x = torch.from_numpy(pixels).float().div_(255)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (B, C, H, W)
        with torch.inference_mode():
            y = net(TF.normalize(x, list(pre.mean), list(pre.std)))
        if task == "embed":
            return {"embedding": y.numpy()}
        p, i = torch.softmax(y, 1).topk(3, 1)
        return {"pred_label": i[:, 0].numpy().astype(np.int32), "topk_probs": p.numpy()}

    return run, pre


def arrow_outputs(out: Outputs) -> dict[str, pa.Array]:
    cols: dict[str, pa.Array] = {}
    for k, v in out.items():
        if v.ndim == 1:
            cols[k] = pa.array(v)
        else:
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
    return cols


def parquet_files(data: str) -> list[str]:
    return sorted(glob.glob(os.path.join(data, "*.parquet")))


def count_rows(out: str) -> int:
    files = [f for f in glob.glob(os.path.join(out, "**", "*.parquet"), recursive=True)]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


# --------------------------------------------------------------------------- predict / embed


def sparkvision_infer(task: str, data: str, model: str, out: str, batch: int) -> Callable[[], int]:
    from sparkvision.inference.embed import embed_table
    from sparkvision.inference.predict import predict_table
    from sparkvision.spark.session import get_spark

    spark = get_spark("local[2]")
    spark.range(10).count()

    def go() -> int:
        if task == "predict":
            return int(predict_table(spark, model, data, out, batch_size=batch)["rows"])
        return int(embed_table(spark, model, data, out, batch_size=batch)["rows"])

    return go


def spark_predict_batch_udf(task: str, data: str, model: str, out: str, batch: int) -> Callable[[], int]:
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, FloatType, IntegerType, StructField, StructType

    from sparkvision.spark.session import get_spark

    spark = get_spark("local[2]")
    spark.range(10).count()

    def make_predict_fn() -> Callable[[np.ndarray], Any]:
        fn, pre = model_fn(model, task, 1)

        def predict(images: np.ndarray) -> Any:  # an object array of the rows' bytes
            res = fn(pil_pixels(list(images), pre))
            return res if task == "predict" else res["embedding"]

        return predict

    if task == "predict":
        rtype: Any = StructType(
            [StructField("pred_label", IntegerType()), StructField("topk_probs", ArrayType(FloatType()))]
        )
    else:
        rtype = ArrayType(FloatType())
    udf = predict_batch_udf(make_predict_fn, return_type=rtype, batch_size=batch)

    def go() -> int:
        df = spark.read.parquet(data).select("content_id", "image")
        df.withColumn("out", udf("image")).drop("image").write.mode("overwrite").parquet(out)
        return spark.read.parquet(out).count()

    return go


def daft_infer(task: str, data: str, model: str, out: str, batch: int) -> Callable[[], int]:
    import daft
    from daft import DataType, col

    dim = 3 if task == "predict" else None

    @daft.udf(return_dtype=DataType.list(DataType.float32()), batch_size=batch)
    class Infer:
        def __init__(self) -> None:
            self.fn, _ = model_fn(model, task, CORES)

        def __call__(self, images: Any) -> list[Any]:
            res = self.fn(np.stack(images.to_pylist()))
            if dim:  # the predicted class first, then the top-3 probabilities
                return [
                    [float(c), *p] for c, p in zip(res["pred_label"], res["topk_probs"].tolist(), strict=True)
                ]
            return list(res["embedding"])

    _, pre = model_fn(model, task, CORES)
    h, w = pre.size
    mode = "L" if pre.channels == 1 else "RGB"

    def go() -> int:
        df = daft.read_parquet(parquet_files(data)).select("content_id", "image")
        img = col("image")
        if hasattr(img, "decode_image"):  # Daft >= 0.6
            pixels = img.decode_image(mode=mode).resize(w, h)
        else:
            pixels = img.image.decode(mode=mode).image.resize(w, h)
        df = df.with_column("pixels", pixels)
        df = df.with_column("out", Infer(col("pixels"))).select("content_id", "out")
        df.write_parquet(out)
        return count_rows(out)

    return go


def ray_infer(task: str, data: str, model: str, out: str, batch: int) -> Callable[[], int]:
    import ray

    ray.init(num_cpus=CORES, include_dashboard=False, log_to_driver=False)

    class Infer:
        def __init__(self) -> None:
            self.fn, self.pre = model_fn(model, task, 1)

        def __call__(self, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"content_id": b["content_id"], **self.fn(pil_pixels(list(b["image"]), self.pre))}

    def go() -> int:
        ds = ray.data.read_parquet(parquet_files(data), columns=["content_id", "image"])
        # Half a CPU per actor: with one whole CPU each, the actors would hold every CPU Ray has
        # and its read and write tasks would never run (two cores: the job hangs).
        ds = ds.map_batches(Infer, batch_size=batch, concurrency=CORES, num_cpus=0.5, batch_format="numpy")
        ds.write_parquet(out)
        return count_rows(out)

    return go


def plain_infer(task: str, data: str, model: str, out: str, batch: int) -> Callable[[], int]:
    def go() -> int:
        fn, pre = model_fn(model, task, CORES)
        Path(out).mkdir(parents=True, exist_ok=True)
        writer = None
        n = 0
        for f in parquet_files(data):
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=["content_id", "image"]):
                cols = {"content_id": rb.column("content_id")}
                cols.update(arrow_outputs(fn(pil_pixels(rb.column("image").to_pylist(), pre))))
                t = pa.table(cols)
                writer = writer or pq.ParquetWriter(os.path.join(out, "part-0.parquet"), t.schema)
                writer.write_table(t)
                n += rb.num_rows
        if writer is not None:
            writer.close()
        return n

    return go


# --------------------------------------------------------------------------- ingest


def check_file(data: bytes) -> tuple[str | None, str | None, int | None, int | None, str | None]:
    """(sha256, format, height, width, error): what a hand-written ingest checks per file."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return hashlib.sha256(data).hexdigest(), img.format, img.height, img.width, None
    except Exception as e:  # noqa: BLE001 - a bad file is a row with its error
        return None, None, None, None, f"{type(e).__name__}: {e}"


CHECK_COLUMNS = ["content_id", "format", "height", "width", "error"]


def sparkvision_ingest(task: str, data: str, model: str, out: str, batch: int) -> Callable[[], int]:
    from sparkvision.data.ingest import ingest
    from sparkvision.spark.session import get_spark

    spark = get_spark("local[2]")
    spark.range(10).count()

    def go() -> int:
        s = ingest(spark, data, out, mode="overwrite")
        return s.rows_written + sum(s.rejects_by_reason.values())

    return go


def spark_binaryfile_udf(task: str, data: str, model: str, out: str, batch: int) -> Callable[[], int]:
    from pyspark.sql.functions import pandas_udf

    from sparkvision.spark.session import get_spark

    spark = get_spark("local[2]")
    spark.range(10).count()

    @pandas_udf("content_id string, format string, height int, width int, error string")  # type: ignore[call-overload]
    def check(content: pd.Series) -> pd.DataFrame:  # pd at module level: Spark reads the hints by name
        return pd.DataFrame([check_file(b) for b in content], columns=CHECK_COLUMNS)

    def go() -> int:
        files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(data)
        rows = files.select("path", "content", check("content").alias("m")).select("path", "content", "m.*")
        rows.write.mode("overwrite").parquet(out)
        return spark.read.parquet(out).count()

    return go


def plain_ingest(task: str, data: str, model: str, out: str, batch: int) -> Callable[[], int]:
    def go() -> int:
        rows: dict[str, list[Any]] = {c: [] for c in ["path", "content", *CHECK_COLUMNS]}
        for path in sorted(Path(data).rglob("*")):
            if path.is_file():
                content = path.read_bytes()
                rows["path"].append(str(path))
                rows["content"].append(content)
                for c, v in zip(CHECK_COLUMNS, check_file(content), strict=True):
                    rows[c].append(v)
        Path(out).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows), os.path.join(out, "part-0.parquet"))
        return len(rows["path"])

    return go


RUNNERS: dict[tuple[str, str], Callable[..., Callable[[], int]]] = {
    **{(t, "sparkvision"): sparkvision_infer for t in ("predict", "embed")},
    **{(t, "spark_predict_batch_udf"): spark_predict_batch_udf for t in ("predict", "embed")},
    **{(t, "daft"): daft_infer for t in ("predict", "embed")},
    **{(t, "ray_data"): ray_infer for t in ("predict", "embed")},
    **{(t, "plain_loop"): plain_infer for t in ("predict", "embed")},
    ("ingest", "sparkvision"): sparkvision_ingest,
    ("ingest", "spark_binaryfile_udf"): spark_binaryfile_udf,
    ("ingest", "plain_loop"): plain_ingest,
}


def run_contender(name: str, task: str, data: str, model: str, out: str, batch: int) -> dict[str, Any]:
    """Start the contender's engine (not timed), then time one run over ``data``."""
    os.environ.setdefault("SPARKVISION_PROGRESS", "0")
    go = RUNNERS[(task, name)](task, data, model, out, batch)
    t0 = time.perf_counter()
    rows = go()
    return {"rows": rows, "seconds": round(time.perf_counter() - t0, 3)}
