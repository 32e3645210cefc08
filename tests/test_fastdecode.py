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


def test_predict_columns_match_the_per_row_reading():
    n, names = 5, ["a", "b", "c"]  # 4 model outputs, 3 names: class 3 has no name
    batch = pa.RecordBatch.from_pydict(
        {
            c: pa.array([f"{c}{i}" for i in range(n)]) if c != "label" else pa.array(range(n), pa.int32())
            for c in KEEP_COLUMNS
        }
    )
    logits = torch.tensor(
        [[0, 1, 2, 9], [5, 1, 0, 0], [0, 0, 3, 1], [1, 2, 3, 4], [0, 7, 0, 0]], dtype=torch.float32
    )
    errors = [None, "truncated: x", None, None, None]
    out = predict_columns(batch, logits, errors, 2, names).to_pydict()
    probs = torch.softmax(logits, 1)
    p, idx = probs.topk(2, 1)
    for i in range(n):
        for c in KEEP_COLUMNS:
            assert out[c][i] == batch.column(c)[i].as_py()
        if errors[i]:
            assert [
                out[c][i] for c in ("pred_label", "pred_name", "confidence", "topk_labels", "topk_probs")
            ] == [None] * 5
            assert out["error"][i] == errors[i]
            continue
        assert out["pred_label"][i] == int(idx[i, 0])
        assert out["pred_name"][i] == (names[idx[i, 0]] if idx[i, 0] < 3 else None)
        assert out["confidence"][i] == pytest.approx(float(p[i, 0]), rel=1e-6)
        assert out["topk_labels"][i] == idx[i].tolist()
        assert out["topk_probs"][i] == pytest.approx(p[i].tolist(), rel=1e-6)
        assert out["error"][i] is None
    assert out["pred_name"][0] is None  # class 3: no name


def test_vectors_column_nulls_error_rows():
    v = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert vectors_column(v, [None, "x", None]).to_pylist() == [[0.0, 1.0], None, [4.0, 5.0]]
    assert vectors_column(v, [None] * 3).to_pylist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
