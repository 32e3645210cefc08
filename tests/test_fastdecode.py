"""The batch-inference hot path gives the numbers and rows the reference path gives.

predict_columns against the per-row reading of the same top-k. No Spark: these are the
executors' pure functions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from sparkvision.inference.predict import predict_columns
from sparkvision.inference.runtime import KEEP_COLUMNS, vectors_column


def keep_columns(n: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            c: pa.array([f"{c}{i}" for i in range(n)]) if c != "label" else pa.array(range(n), pa.int32())
            for c in KEEP_COLUMNS
        }
    )


@pytest.mark.parametrize("errors", [[None, "truncated: x", None, None, None], [None] * 5, ["x"] * 5])
def test_predict_columns_match_the_per_row_reading(errors):
    n, names = 5, ["a", "b", "c"]  # 4 model outputs, 3 names: class 3 has no name
    batch = keep_columns(n)
    logits = torch.tensor(
        [[0, 1, 2, 9], [5, 1, 0, 0], [0, 0, 3, 1], [1, 2, 3, 4], [0, 7, 0, 0]], dtype=torch.float32
    )
    got = predict_columns(batch, logits, errors, 2, names)
    assert got.schema.field("pred_label").type == pa.int32()
    assert got.schema.field("topk_probs").type == pa.list_(pa.float32())
    out = got.to_pydict()
    p, idx = torch.softmax(logits, 1).topk(2, 1)
    for i in range(n):
        for c in KEEP_COLUMNS:
            assert out[c][i] == batch.column(c)[i].as_py()
        assert out["error"][i] == errors[i]
        if errors[i]:
            assert [
                out[c][i] for c in ("pred_label", "pred_name", "confidence", "topk_labels", "topk_probs")
            ] == [None] * 5
            continue
        assert out["pred_label"][i] == int(idx[i, 0])
        assert out["pred_name"][i] == (names[idx[i, 0]] if idx[i, 0] < 3 else None)
        assert out["confidence"][i] == pytest.approx(float(p[i, 0]), rel=1e-6)
        assert out["topk_labels"][i] == idx[i].tolist()
        assert out["topk_probs"][i] == pytest.approx(p[i].tolist(), rel=1e-6)
    if errors[0] is None:
        assert out["pred_name"][0] is None  # class 3: no name


def test_top_k_beyond_the_classes_and_no_names():
    out = predict_columns(keep_columns(2), torch.tensor([[1.0, 2.0], [3.0, 0.0]]), [None, None], 5, [])
    assert out.column("topk_labels").to_pylist() == [[1, 0], [0, 1]]
    assert out.column("pred_name").to_pylist() == [None, None]


def test_vectors_column_nulls_error_rows():
    v = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert vectors_column(v, [None, "x", None]).to_pylist() == [[0.0, 1.0], None, [4.0, 5.0]]
    assert vectors_column(v, [None] * 3).to_pylist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
