"""Batch classification, embedding and evaluation on the executors."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from pyspark import cloudpickle
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from sparkvision.data.schema import IMAGE_SCHEMA
from sparkvision.data.table import TableMeta, read_meta, read_table, write_meta
from sparkvision.inference.embed import embed_table
from sparkvision.inference.evaluate import evaluate, metrics_from_confusion
from sparkvision.inference.predict import predict_batches, predict_df, predict_table
from sparkvision.inference.runtime import (
    KEEP_COLUMNS,
    cpu_call_rows,
    image_source,
    read_blob,
    run_model,
    run_model_in_calls,
)
from sparkvision.train import AugmentConfig, TrainConfig, train
from sparkvision.transforms.preprocess import preprocess_batch
from sparkvision.web.batching import Classifier

FAST = dict(
    batch_size=16,
    lr=3e-3,
    model_kwargs={"widths": [8, 16], "hidden": 32, "dropout": 0.0},
    augment=AugmentConfig.none(),
)


@pytest.fixture(scope="module")
def model_dir(spark, tiny_table, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("model") / "m")
    train(spark, tiny_table, out, TrainConfig(epochs=5, workers=1, **FAST))
    return out


@pytest.fixture(scope="module")
def table_with_corrupt_row(spark, tiny_table, tmp_path_factory):
    """The tiny test split plus one row whose bytes are not an image (as an old table might hold)."""
    path = str(tmp_path_factory.mktemp("corrupt") / "t")
    good = read_table(spark, tiny_table, "test")
    bad = spark.createDataFrame(
        [("deadbeef", "file:/broken.png", b"\x89PNG\r\n\x1a\n garbage", "PNG", 16, 16, 1, 0, "a", "test")],
        IMAGE_SCHEMA,
    )
    good.unionByName(bad, allowMissingColumns=True).write.parquet(path)  # old rows: no original_mode
    write_meta(spark, path, TableMeta(class_names=read_meta(spark, tiny_table).class_names))
    return path


def test_predict_writes_rows_and_an_error_for_the_corrupt_one(
    spark, model_dir, table_with_corrupt_row, tmp_path
):
    out = str(tmp_path / "pred")
    s = predict_table(spark, model_dir, table_with_corrupt_row, out, top_k=2)
    assert s["rows"] == 33 and s["errors"] == 1
    df = spark.read.parquet(out)
    bad = df.where("path = 'file:/broken.png'").first()
    assert bad.error.startswith("truncated") or bad.error.startswith("not_an_image")
    assert bad.pred_label is None
    good = df.where("error is null")
    row = good.first()
    assert len(row.topk_probs) == 2 and row.topk_probs[0] >= row.topk_probs[1]
    assert row.pred_name in read_meta(spark, table_with_corrupt_row).class_names
    assert s["accuracy_on_labelled_rows"] >= 0.7  # chance is 0.25


def test_evaluate_writes_json_and_png(spark, model_dir, table_with_corrupt_row, tmp_path):
    r = evaluate(spark, model_dir, table_with_corrupt_row, "test", out=str(tmp_path))
    assert r["rows"] == 32 and r["undecodable_rows"] == 1
    assert r["accuracy"] >= 0.7
    assert os.path.getsize(tmp_path / "confusion_matrix.png") > 1000
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert sum(map(sum, saved["confusion_matrix"])) == 32
    assert set(saved["per_class"]) == set(read_meta(spark, table_with_corrupt_row).class_names)


def test_embed_is_l2_normalised(spark, model_dir, tiny_table, tmp_path):
    s = embed_table(spark, model_dir, tiny_table, str(tmp_path / "emb"), split="test")
    assert s["rows"] == 32 and s["dim"] == 32 and s["errors"] == 0
    v = np.array(spark.read.parquet(str(tmp_path / "emb")).first().embedding)
    assert abs(np.linalg.norm(v) - 1) < 1e-4


def test_metrics_from_confusion_matches_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    m = metrics_from_confusion(confusion_matrix(y, p), ["a", "b", "c"])
    pr, rc, f1, _ = precision_recall_fscore_support(y, p)
    assert m["per_class"]["b"]["precision"] == pytest.approx(pr[1], abs=1e-5)
    assert m["per_class"]["c"]["recall"] == pytest.approx(rc[2], abs=1e-5)
    assert m["per_class"]["a"]["f1"] == pytest.approx(f1[0], abs=1e-5)
    assert m["accuracy"] == pytest.approx((y == p).mean())


def test_predict_bad_parameters(spark, model_dir, tiny_table, tmp_path):
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        predict_table(spark, model_dir, tiny_table, str(tmp_path / "p"), top_k=0)
    with pytest.raises(FileNotFoundError, match="not a sparkvision model directory"):
        predict_table(spark, str(tmp_path), tiny_table, str(tmp_path / "p"))


def test_web_and_batch_inference_feed_the_model_the_same_numbers(spark, model_dir, tiny_table):
    images = [r.image for r in read_table(spark, tiny_table, "test").select("image").limit(5).collect()]
    clf = Classifier(model_dir)
    x_batch, errors = preprocess_batch(images, clf.pre)
    x_web = clf.inputs([clf.preprocess(b) for b in images])
    assert errors == [None] * 5 and x_web.shape == (5, *x_batch.shape[1:])
    assert torch.equal(x_web, x_batch)  # bit for bit: one transform for training, batch inference and the web
    assert x_web.is_contiguous(memory_format=torch.channels_last)


def test_torch_threads_travel_inside_the_task_function(spark, model_dir, tiny_table):
    """The thread count reaches the executor in the pickled task function, not the driver's environment."""
    env = dict(os.environ)
    predict_df(spark, model_dir, image_source(spark, tiny_table, "test"))
    assert dict(os.environ) == env
    rows = [r.asDict() for r in image_source(spark, tiny_table, "test").limit(4).collect()]
    batch = pa.RecordBatch.from_pylist(rows)
    broadcast = SimpleNamespace(value=read_blob(model_dir))  # what a task sees of a Broadcast
    shipped = cloudpickle.loads(cloudpickle.dumps(predict_batches(broadcast, 1, 8, threads=3)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out = pa.Table.from_batches(list(shipped(iter([batch]))))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert out.num_rows == 4 and out.column("error").null_count == 4
    assert set(out.column_names) >= set(KEEP_COLUMNS)


def test_model_calls_on_a_cpu_take_a_bounded_input_and_give_the_single_calls_numbers():
    assert cpu_call_rows(torch.zeros(512, 1, 28, 28)) == 64  # 3,136 bytes a row: 83 -> a power of two
    assert cpu_call_rows(torch.zeros(512, 3, 224, 224)) == 8  # large rows: never under 8
    assert cpu_call_rows(torch.zeros(0, 1, 28, 28)) >= 8
    calls: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.flatten(1).sum(1, keepdim=True)

    x = torch.randn(150, 1, 28, 28)
    y = run_model_in_calls(fn, x)
    if not torch.cuda.is_available():
        assert calls == [64, 64, 22]
    assert torch.allclose(y, x.flatten(1).sum(1, keepdim=True), atol=1e-4)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3)
    )
    net(x[:1])
    net.eval()
    assert torch.allclose(run_model_in_calls(net, x), run_model(net, x), atol=1e-5)
