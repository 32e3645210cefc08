"""The batch-inference hot path gives the numbers and rows the reference path gives.

fastdecode.preprocess_arrow against preprocess_batch on every kind of row (the libpng rows and
all the ones that must go to PIL); predict_columns against the per-row reading of the same
top-k. No Spark: these are the executors' pure functions.
"""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import make_image
from PIL import Image

from sparkvision.inference.predict import predict_columns
from sparkvision.inference.runtime import KEEP_COLUMNS, vectors_column
from sparkvision.models.modeldir import Preprocess
from sparkvision.transforms.fastdecode import binary_parts, png_decoder_available, png_rows, preprocess_arrow
from sparkvision.transforms.preprocess import preprocess_batch


def same(errors: list[str | None]) -> list[str | None]:
    """Errors without the object addresses PIL puts in some of them."""
    return [None if e is None else re.sub(r" at 0x[0-9a-f]+", "", e) for e in errors]


def png(arr: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def with_chunk(data: bytes, kind: bytes, body: bytes, crc_delta: int = 0) -> bytes:
    """``data`` with a chunk inserted after IHDR (its CRC off by ``crc_delta``)."""
    crc = (zlib.crc32(kind + body) + crc_delta) & 0xFFFFFFFF
    return data[:33] + struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc) + data[33:]


def mixed_rows(size: int) -> list[bytes | None]:
    """Every kind of row a model may meet: the PNGs libpng takes and all the others."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (size, size), dtype=np.uint8)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: PIL turns it upright
    good = png(gray)
    return [
        good,
        png(rng.integers(0, 256, (size, size), dtype=np.uint8), optimize=True),
        with_chunk(good, b"gAMA", struct.pack(">I", 45455)),
        png(gray, transparency=0),  # gray + tRNS
        png(rgb),  # colour type 2 for a gray model: PIL's luma
        png(gray[: size // 2]),  # another size: resized
        make_image(1, size, "P"),  # palette
        make_image(2, size, "LA"),
        make_image(3, size, "RGB", fmt="JPEG"),
        png(gray.astype(np.uint16) * 257),  # 16-bit
        good[:60],  # header fine, body cut: truncated
        good[:8] + b"\x00" * 30,  # a signature and nothing else
        b"",
        None,
        b"not an image at all, but long enough to have a header",
        png(gray, exif=exif.tobytes()),  # an EXIF orientation
        with_chunk(good, b"gAMA", struct.pack(">I", 45455), crc_delta=1),  # a damaged chunk
        with_chunk(good, b"gAMA", b"\x00\x01"),  # a chunk of the wrong length
        png(rgb),
    ]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_preprocess_arrow_is_preprocess_batch(channels, threads):
    size = 12
    rows = mixed_rows(size) * 3
    pre = Preprocess(channels, (size, size), (0.3,) * channels, (0.4,) * channels)
    arrow = pa.array(rows, pa.binary())
    x, errors = preprocess_arrow(arrow.slice(1), pre, threads=threads)  # a slice: offsets not at 0
    ref, ref_errors = preprocess_batch(rows[1:], pre)
    assert same(errors) == same(ref_errors)
    assert torch.equal(x, ref)
    assert x.is_contiguous(memory_format=torch.channels_last)
    floats = Preprocess(channels, (size, size), (0.3,) * channels, (0.4,) * channels, pixel_dtype="float32")
    x2, errors2 = preprocess_arrow(arrow, floats)  # a float table's model: every row through PIL
    ref2, ref_errors2 = preprocess_batch(rows, floats)
    assert torch.equal(x2, ref2) and same(errors2) == same(ref_errors2)


@pytest.mark.skipif(not png_decoder_available(), reason="torchvision without image ops")
def test_only_8bit_pngs_of_the_size_and_colour_type_take_libpng():
    rows = mixed_rows(12)
    offsets, data, valid = binary_parts(pa.array(rows, pa.binary()))
    assert png_rows(offsets, data, valid, 1, (12, 12)).tolist() == [0, 1, 2, 3, 10, 15, 16, 17]
    assert png_rows(offsets, data, valid, 3, (12, 12)).tolist() == [4, 18]
    assert png_rows(offsets, data, valid, 1, (6, 12)).tolist() == [5]


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
