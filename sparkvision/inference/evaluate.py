"""Evaluate a model on a table split: accuracy, per-class precision/recall/F1, confusion matrix.

Predictions run distributed (the same path as ``predict``); only the K x K confusion counts come
back to the driver.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.data.table import read_meta, read_table
from sparkvision.inference.modelref import model_dir_here
from sparkvision.inference.predict import predict_df
from sparkvision.spark.filestore import driver_store, local_path, upload
from sparkvision.spark.progress import Timer, spark_progress


def metrics_from_confusion(cm: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy and per-class precision / recall / F1 from a confusion matrix (rows = truth)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    per_class = {
        name: {
            "precision": round(float(p), 5),
            "recall": round(float(r), 5),
            "f1": round(float(f), 5),
            "support": int(s),
        }
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    }
    return {
        "accuracy": round(float(tp.sum() / total), 5) if total else None,
        "macro_f1": round(float(f1[support > 0].mean()), 5) if (support > 0).any() else None,
        "rows": int(total),
        "per_class": per_class,
    }


def plot_confusion(
    cm: np.ndarray, class_names: list[str], path: str, title: str = "Confusion matrix"
) -> None:
    """Row-normalised confusion matrix as a PNG, counts written in the cells.

    Matplotlib's object API (a bare ``Figure``) needs no backend switch or pyplot state. Imported
    here: 0.8 s measured, which every importer of this module (the web's job kinds, the CLI) would
    otherwise pay for one plot at the end of a job.
    """
    from matplotlib.figure import Figure

    k = len(class_names)
    fig = Figure(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), dpi=110)
    ax = fig.subplots()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    fig.savefig(path)


def evaluate(
    spark: SparkSession,
    model_dir: str,
    table: str,
    split: str | None = "test",
    out: str | None = None,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Write ``evaluation.json`` and ``confusion_matrix.png`` into ``out`` (default the model dir);
    either may be any URI Spark writes (read and written through the session's file systems)."""
    timer = Timer()
    meta = read_meta(spark, table)
    with model_dir_here(spark, model_dir) as here:
        with open(os.path.join(here, "classes.json")) as f:
            model_classes = json.load(f)
        df = read_table(spark, table, split).where(F.col("label").isNotNull())
        preds = predict_df(
            spark,
            here,
            df.select("image", "content_id", "path", "split", "label", "label_name"),
            top_k=1,
            batch_size=batch_size,
        )
    # Map the table's label names onto the model's class indices (tables may order classes differently).
    index = {n: i for i, n in enumerate(model_classes)}
    unknown = sorted(set(meta.class_names) - set(index))
    true_idx = F.create_map(*[x for n, i in index.items() for x in (F.lit(n), F.lit(i))])[F.col("label_name")]
    with spark_progress(spark, "evaluate"):
        counts = (
            preds.where("error is null")
            .select(true_idx.alias("t"), F.col("pred_label").alias("p"))
            .where("t is not null")
            .groupBy("t", "p")
            .count()
            .collect()
        )
        errors = preds.where("error is not null").count()
    k = len(model_classes)
    cm = np.zeros((k, k), dtype=np.int64)
    for r in counts:
        cm[int(r.t), int(r.p)] += r["count"]
    result = metrics_from_confusion(cm, model_classes)
    result.update(
        {
            "split": split,
            "table": table,
            "model_dir": model_dir,
            "undecodable_rows": errors,
            "classes_not_in_model": unknown,
            "confusion_matrix": cm.tolist(),
            "class_names": model_classes,
            "elapsed_s": round(timer.elapsed, 3),
        }
    )
    out = out or model_dir
    title = f"{os.path.basename(model_dir.rstrip('/'))} on {split or 'all'}: acc {result['accuracy']}"
    with tempfile.TemporaryDirectory(prefix="sparkvision-eval-") as tmp:
        local = local_path(out) or tmp  # a URI: written here, then copied there
        os.makedirs(local, exist_ok=True)
        with open(os.path.join(local, "evaluation.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot_confusion(cm, model_classes, os.path.join(local, "confusion_matrix.png"), title)
        if local == tmp:
            store = driver_store(spark, out)
            for name in ("evaluation.json", "confusion_matrix.png"):
                upload(store, name, os.path.join(tmp, name))
    result["confusion_matrix_png"] = os.path.join(out, "confusion_matrix.png")
    result["evaluation_json"] = os.path.join(out, "evaluation.json")
    return result
