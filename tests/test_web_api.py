"""The REST API through FastAPI's TestClient: every endpoint, and every bad input gets a 4xx JSON error."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import io
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_image, write_image_folder, write_tiny_model
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import BaseModel, PositiveInt

from sparkvision.cli.serve import serve
from sparkvision.data.images import content_id
from sparkvision.ops.base import ParamError, Params
from sparkvision.retrieval.index import build_index
from sparkvision.retrieval.search import embed_images
from sparkvision.web.app import create_app
from sparkvision.web.batching import MicroBatcher
from sparkvision.web.jobs import JobStore
from sparkvision.web.kinds import KINDS, Kind
from sparkvision.web.routes.errors import flags_to_fields, validation_message
from sparkvision.web.runner import error_message
from sparkvision.web.security import ApiError, Settings, safe_path
from sparkvision.web.uploads import parse_simple_multipart

CLASSES = ["a", "b", "c", "d"]


def write_image_table(path, n_per_class: int = 5) -> list[str]:
    """A small image table written with pyarrow (same schema as `sparkvision ingest`)."""
    rows = []
    for k, name in enumerate(CLASSES):
        for i in range(n_per_class):
            data = make_image(k, seed=100 * k + i)
            rows.append(
                {
                    "content_id": content_id(data),
                    "path": f"file:/x/{name}/{i}.png",
                    "image": data,
                    "format": "PNG",
                    "height": 16,
                    "width": 16,
                    "channels": 1,
                    "label": k,
                    "label_name": name,
                    "split": "train" if i < n_per_class - 1 else "test",
                }
            )
    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(path, "part-0.parquet"))
    with open(os.path.join(path, "_sparkvision.json"), "w") as f:
        json.dump({"class_names": CLASSES, "schema_version": 1, "sources": []}, f)
    return [r["content_id"] for r in rows]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root with a model, an image table, a prediction table, an index and an image folder."""
    root = tmp_path_factory.mktemp("webroot")
    write_tiny_model(
        root / "models" / "cnn",
        CLASSES,
        {"test_acc": 0.25, "history": [{"epoch": 1, "train_loss": 1.4, "test_acc": 0.25}]},
    )
    ids = write_image_table(str(root / "tables" / "tiny"))
    # A prediction table keeps ids, not bytes: thumbnails come from its source image table.
    preds = [
        {
            "content_id": c,
            "path": "p",
            "split": "train",
            "label": 0,
            "label_name": "a",
            "pred_label": 1,
            "pred_name": "b",
            "confidence": 0.5,
            "error": None,
        }
        for c in ids
    ]
    os.makedirs(root / "tables" / "preds")
    pq.write_table(pa.Table.from_pylist(preds), str(root / "tables" / "preds" / "part-0.parquet"))
    write_index(root / "models" / "cnn", root / "tables" / "tiny", root / "features", root / "index")
    write_image_folder(root / "folder", {"a": 3, "b": 3})
    (root / "outside_target").mkdir()
    return root


def write_index(model, table, features, index) -> None:
    """Features of an image table and their index, built with the library (no Spark needed for
    this size); the features record the model and the table (thumbnails come from it)."""
    images = pq.read_table(str(table)).to_pylist()
    feats, _ = embed_images(str(model), [r["image"] for r in images])
    os.makedirs(features)
    pq.write_table(
        pa.table(
            {
                "content_id": [r["content_id"] for r in images],
                "path": [r["path"] for r in images],
                "label_name": [r["label_name"] for r in images],
                "embedding": pa.array([list(map(float, f)) for f in feats], pa.list_(pa.float32())),
            }
        ),
        os.path.join(features, "part-0.parquet"),
    )
    with open(os.path.join(features, "_retrieval.json"), "w") as f:
        json.dump({"model_dir": str(model), "table": str(table)}, f)
    build_index(str(features), str(index))


def settings_for(root, **kw) -> Settings:
    base = dict(
        data_roots=[str(root)],
        db_url="sqlite://",
        model_dir=str(root / "models" / "cnn"),
        index_dir=str(root / "index"),
        start_runner=False,
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def client(root):
    with TestClient(create_app(settings_for(root, max_upload_bytes=200_000, max_pixels=100_000))) as c:
        yield c


def assert_error(r, status: int, fragment: str = ""):
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert fragment.lower() in body["error"].lower(), body
    assert "Traceback" not in r.text


# ----------------------------------------------------------------------------- server, docs


def test_health_openapi_docs_and_page(client):
    health = client.get("/api/health").json()
    assert health["ok"] is True and health["running_job"] is None
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/classify",
        "/api/search",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/cancel",
        "/api/jobs/{job_id}/resume",
        "/api/models",
        "/api/tables",
        "/api/tables/{name}/rows",
    ):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "sparkvision" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert_error(client.get("/api/nope"), 404)


# ----------------------------------------------------------------------------- classify


def test_classify_many_and_raw(client):
    files = [("files", (f"{k}.png", make_image(k), "image/png")) for k in range(3)]
    r = client.post("/api/classify?top_k=2", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 3 and body["latency_ms"] > 0
    for res in body["results"]:
        assert res["label"] in CLASSES and len(res["top_k"]) == 2
        assert res["top_k"][0]["prob"] >= res["top_k"][1]["prob"]
    raw = client.post("/api/classify", content=make_image(1), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and len(raw.json()["results"][0]["top_k"]) == 3
    named = client.post("/api/classify?model=models/cnn", files=files[:1])
    assert named.status_code == 200


def test_classify_bad_inputs(client, root):
    big = np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)  # 90k px, ~90 kB PNG
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG", compress_level=0)
    assert len(buf.getvalue()) < 200_000
    pixels = np.zeros((400, 400), np.uint8)  # 160k px > max_pixels 100k, small file
    pbuf = io.BytesIO()
    Image.fromarray(pixels).save(pbuf, format="PNG")
    assert_error(
        client.post("/api/classify", files=[("files", ("p.png", pbuf.getvalue(), "image/png"))]),
        413,
        "too_many_pixels",
    )
    assert_error(
        client.post("/api/classify", files=[("files", ("big.bin", b"x" * 250_000, "image/png"))]),
        413,
        "limit",
    )
    assert_error(
        client.post("/api/classify", files=[("files", ("bad.png", b"not an image at all", "image/png"))]),
        422,
        "not_an_image",
    )
    truncated = make_image(0)[:60]
    assert_error(
        client.post("/api/classify", files=[("files", ("t.png", truncated, "image/png"))]), 422, "t.png"
    )
    assert_error(
        client.post("/api/classify", content=b"", headers={"content-type": "image/png"}), 422, "empty"
    )
    assert_error(
        client.post("/api/classify?top_k=0", files=[("files", ("a.png", make_image(0), "image/png"))]),
        422,
        "top_k",
    )
    assert_error(
        client.post("/api/classify", content=b"{}", headers={"content-type": "application/json"}), 415
    )
    assert_error(
        client.post("/api/classify", files=[("other", ("a.png", make_image(0), "image/png"))]),
        422,
        "no image",
    )
    assert_error(
        client.post("/api/classify?model=../models/cnn", files=[("files", ("a.png", make_image(0)))]),
        403,
        "..",
    )
    assert_error(
        client.post("/api/classify?model=tables/tiny", files=[("files", ("a.png", make_image(0)))]),
        404,
        "not a sparkvision model",
    )
    assert_error(
        client.post(
            "/api/classify",
            content=b"--x\r\ngarbage",
            headers={"content-type": "multipart/form-data; boundary=x"},
        ),
        422,
    )
    too_many = [("files", (f"{i}.png", make_image(0), "image/png")) for i in range(65)]  # max_files 64
    assert_error(client.post("/api/classify", files=too_many), 400, "too many files")
    # Content-Length over the request limit is refused before the body is read.
    huge = client.post(
        "/api/classify", content=b"x", headers={"content-type": "image/png", "content-length": str(10**10)}
    )
    assert_error(huge, 413, "limit")


def test_classify_without_model(root):
    with TestClient(create_app(settings_for(root, model_dir=None, index_dir=None))) as c:
        assert_error(c.post("/api/classify", files=[("files", ("a.png", make_image(0)))]), 503, "--model")
        assert_error(c.post("/api/search", files=[("file", ("a.png", make_image(0)))]), 503, "--index")


def test_micro_batching_shares_model_calls():
    calls = []

    def fn(batch):
        calls.append(len(batch))
        time.sleep(0.01)
        return [x * 2 for x in batch]

    async def main():
        b = MicroBatcher(fn, max_batch=8, max_wait_ms=50)
        outs = await asyncio.gather(*(b.submit(torch.full((1,), float(i))) for i in range(20)))
        await b.close()
        return outs, b.stats

    outs, stats = asyncio.run(main())
    assert [float(o[0]) for o in outs] == [2.0 * i for i in range(20)]  # each request gets its own row
    assert stats.calls == len(calls) <= 4 and max(calls) == 8 and sum(calls) == 20


def test_classify_multipart_fast_path_and_fallback(client):
    """Plain bodies take the fast splitter; anything unusual goes through Starlette's parser, same answers."""
    img = make_image(1)
    plain = (
        b'--bnd\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        b'--bnd\r\nContent-Disposition: form-data; name="files"; filename="a;b \\"c\\".png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + img + b"\r\n--bnd--\r\n"
    )
    parts = parse_simple_multipart(plain[plain.index(b"--bnd") :], b"bnd", 64, 74)
    assert parts == [("note", None, b"hello"), ("files", 'a;b "c".png', img)]
    with_epilogue = plain + b"an epilogue"  # legal, rare: the general parser handles it
    assert parse_simple_multipart(with_epilogue, b"bnd", 64, 74) is None
    mp = {"content-type": "multipart/form-data; boundary=bnd"}
    for body in (plain, with_epilogue):
        r = client.post("/api/classify", content=body, headers=mp)
        assert r.status_code == 200, r.text
        assert [x["filename"] for x in r.json()["results"]] == ['a;b "c".png']
    # A preamble is refused by both parsers (python-multipart does not accept one either).
    assert parse_simple_multipart(b"preamble\r\n" + plain, b"bnd", 64, 74) is None
    assert_error(client.post("/api/classify", content=b"preamble\r\n" + plain, headers=mp), 400, "multipart")
    # Shapes the fast path refuses (None): no name, no Content-Disposition, no close delimiter, an
    # epilogue, more files than allowed.
    part = b'Content-Disposition: form-data; name="files"; filename="x.png"\r\n\r\nDATA\r\n'
    assert (
        parse_simple_multipart(b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--", b"b", 4, 4) is None
    )
    assert parse_simple_multipart(b"--b\r\nContent-Type: image/png\r\n\r\nx\r\n--b--", b"b", 4, 4) is None
    assert parse_simple_multipart(b"--b\r\n" + part, b"b", 4, 4) is None
    assert parse_simple_multipart(b"--b\r\n" + part + b"--b--\r\nepilogue", b"b", 4, 4) is None
    assert parse_simple_multipart(b"--b\r\n" + part + b"--b\r\n" + part + b"--b--", b"b", 1, 4) is None
    assert parse_simple_multipart(b"--b\r\n" + part + b"--b--", b"b", 1, 4) == [("files", "x.png", b"DATA")]


def test_classify_query_and_body_limits(root):
    app = create_app(settings_for(root, max_upload_bytes=1000, max_files=1))
    with TestClient(app) as c:
        assert_error(
            c.post("/api/classify?top_k=two", content=make_image(0), headers={"content-type": "image/png"}),
            422,
            "top_k",
        )
        assert_error(
            c.post("/api/classify?top_k=1001", content=make_image(0), headers={"content-type": "image/png"}),
            422,
            "top_k",
        )
        r = c.post("/api/classify?top_k=1", content=make_image(0), headers={"content-type": "image/png"})
        assert r.status_code == 200 and len(r.json()["results"][0]["top_k"]) == 1
        assert r.headers["content-type"] == "application/json"

        def chunks(first: bytes = b""):  # chunked: no Content-Length for the middleware to check
            yield first
            for _ in range(40):
                yield b"x" * 65536

        assert_error(
            c.post("/api/classify", content=chunks(), headers={"content-type": "image/png"}), 413, "limit"
        )
        start = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        assert_error(
            c.post(
                "/api/classify",
                content=chunks(start),
                headers={"content-type": "multipart/form-data; boundary=b"},
            ),
            413,
            "limit",
        )
    spec = app.openapi()["paths"]["/api/classify"]["post"]
    assert {p["name"] for p in spec["parameters"]} == {"top_k", "model"}


def test_micro_batching_deadline_and_errors():
    """A lone request waits at most max_wait; a failing model call fails every request in its batch."""

    def fail(batch):
        raise RuntimeError("model broke")

    async def main():
        b = MicroBatcher(lambda batch: [x + 1 for x in batch], max_batch=64, max_wait_ms=20)
        t0 = time.perf_counter()
        assert await b.submit(1) == 2
        lone = time.perf_counter() - t0
        await b.close()
        bad = MicroBatcher(fail, max_batch=4, max_wait_ms=5)
        outs = await asyncio.gather(*(bad.submit(i) for i in range(6)), return_exceptions=True)
        await bad.close()
        return lone, outs, bad.stats

    lone, outs, stats = asyncio.run(main())
    assert 0.015 <= lone < 1.0
    assert all(isinstance(o, RuntimeError) and "model broke" in str(o) for o in outs) and stats.calls == 0


# ----------------------------------------------------------------------------- search


def test_search(client):
    r = client.post("/api/search?k=5", files=[("file", ("q.png", make_image(2, seed=201), "image/png"))])
    assert r.status_code == 200, r.text
    hits = r.json()["neighbours"]
    assert len(hits) == 5 and hits[0]["rank"] == 1
    assert all(h["thumb"] and h["thumb"].startswith("data:image/png;base64,") for h in hits)
    assert hits[0]["score"] > 0.99  # the query is in the index
    assert_error(client.post("/api/search", files=[("file", ("q.png", b"garbage"))]), 422, "not_an_image")
    assert_error(client.post("/api/search?k=0", files=[("file", ("q.png", make_image(0)))]), 422, "k")


# ----------------------------------------------------------------------------- models and tables


def test_models_and_tables(client, root):
    models = client.get("/api/models").json()["models"]
    assert [m["name"] for m in models] == ["models/cnn"]
    assert models[0]["classes"] == CLASSES and models[0]["metrics"]["test_acc"] == 0.25
    assert client.get("/api/models/models/cnn").json()["config"]["model"] == "cnn"
    assert_error(client.get("/api/models/models/cnn/confusion.png"), 404, "evaluate")
    assert_error(client.get("/api/models/tables/tiny"), 404)
    tables = {t["name"]: t for t in client.get("/api/tables").json()["tables"]}
    assert tables["tables/tiny"]["kind"] == "image" and tables["tables/tiny"]["rows"] == 20
    assert tables["tables/preds"]["kind"] == "predictions"
    assert tables["features"]["kind"] == "features" and "index" not in tables
    page = client.get("/api/tables/tables/tiny/rows?offset=15&limit=10").json()
    assert page["total"] == 20 and len(page["rows"]) == 5
    assert all(r["thumb"].startswith("data:image/png") for r in page["rows"])
    preds = client.get("/api/tables/tables/preds/rows?limit=3&source=tables/tiny").json()
    assert (
        len(preds["rows"]) == 3
        and all(r["thumb"] for r in preds["rows"])
        and preds["rows"][0]["pred_name"] == "b"
    )
    assert client.get("/api/tables/tables/tiny").json()["class_names"] == CLASSES
    assert_error(client.get("/api/tables/tables/tiny/rows?limit=0"), 422, "limit")
    assert_error(client.get("/api/tables/tables/tiny/rows?offset=-1"), 422, "offset")
    assert_error(client.get("/api/tables/nope/rows"), 404, "does not exist")
    assert_error(client.get("/api/tables/models/cnn/rows"), 404, "not a parquet table")
    assert_error(client.get("/api/tables/%2E%2E/etc/rows"), 403, "..")
    assert_error(client.get("/api/tables/tables/tiny/rows?source=/etc"), 403, "outside")


# ----------------------------------------------------------------------------- paths


def test_safe_path_rejects_escapes(root, tmp_path):
    roots = [os.path.realpath(str(root))]
    assert safe_path("tables/tiny", roots, must_exist=True) == os.path.join(roots[0], "tables", "tiny")
    outside = tmp_path / "secret"
    outside.mkdir()
    link = root / "link_out"
    if not link.exists():
        os.symlink(outside, link)
    for bad, status in (
        ("../x", 403),
        ("tables/../../x", 403),
        ("/etc/passwd", 403),
        (str(link), 403),
        ("link_out/y", 403),
        ("hdfs://nn/x", 422),
        ("", 422),
        ("a\x00b", 422),
    ):
        with pytest.raises(ApiError) as e:
            safe_path(bad, roots)
        assert e.value.status == status, bad
    with pytest.raises(ApiError) as e:
        safe_path("does/not/exist", roots, must_exist=True)
    assert e.value.status == 404


def test_job_paths_confined_to_roots(client, root, tmp_path):
    link = root / "link_jobs"
    if not link.exists():
        os.symlink(tmp_path, link)
    cases = [
        ({"source": "../folder", "table": "tables/x"}, 403, ".."),
        ({"source": "folder", "table": "tables/../../x"}, 403, ".."),
        ({"source": "/etc", "table": "tables/x"}, 403, "outside"),
        ({"source": "link_jobs", "table": "tables/x"}, 403, "outside"),
        ({"source": "folder", "table": "link_jobs/t"}, 403, "outside"),
        ({"source": "missing", "table": "tables/x"}, 404, "does not exist"),
        ({"source": "folder", "table": "."}, 422, "not the root"),
    ]
    for params, status, frag in cases:
        assert_error(client.post("/api/jobs", json={"kind": "ingest", "params": params}), status, frag)


# ----------------------------------------------------------------------------- job API (no runner)


def test_job_params_validated(client):
    assert_error(client.post("/api/jobs", json={"kind": "bake", "params": {}}), 422, "unknown job kind")
    assert_error(
        client.post("/api/jobs", json={"kind": "train", "params": {"table": "tables/tiny"}}), 422, "out"
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={"kind": "train", "params": {"table": "tables/tiny", "out": "models/new", "epochs": 0}},
        ),
        422,
        "epochs",
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "train",
                "params": {"table": "tables/tiny", "out": "models/new", "optimizer": "adam"},
            },
        ),
        422,
        "optimizer",
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={"kind": "ingest", "params": {"source": "folder", "table": "t", "unknown_option": 1}},
        ),
        422,
        "unknown_option",
    )
    assert_error(client.post("/api/jobs", json={"params": {}}), 422, "kind")
    assert_error(
        client.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    assert_error(client.get("/api/jobs?state=bogus"), 422, "state")
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "train",
                "params": {  # the library's own check
                    "table": "tables/tiny",
                    "out": "models/new",
                    "batch_size": 10,
                    "workers": 3,
                },
            },
        ),
        422,
        "not divisible",
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={"kind": "train", "params": {"table": "tables/tiny", "out": "models/new", "model": "vgg99"}},
        ),
        422,
        "not registered",
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "pretrain",
                "params": {"table": "tables/tiny", "out": "models/enc", "epochs": 1, "warmup_epochs": 5},
            },
        ),
        422,
        "warmup_epochs",
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "pretrain",
                "params": {"table": "tables/tiny", "out": "models/enc", "method": "byol"},
            },
        ),
        422,
        "method",
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "finetune",
                "params": {"table": "tables/tiny", "out": "models/ft", "encoder": "../enc"},
            },
        ),
        403,
        "..",
    )
    ft = client.post(
        "/api/jobs",
        json={
            "kind": "finetune",
            "params": {
                "table": "tables/tiny",
                "out": "models/ft",
                "encoder": "models/cnn",
                "label_fraction": 0.1,
            },
        },
    )
    assert ft.status_code == 201 and ft.json()["params"]["encoder"].endswith("models/cnn")
    client.post(f"/api/jobs/{ft.json()['id']}/cancel")
    # FixMatch fields, a nested AugmentConfig dict among them, are checked by the recipe's own model.
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "finetune",
                "params": {
                    "table": "tables/tiny",
                    "out": "models/fm",
                    "consistency_weight": 1.0,
                    "strong_augment": {"cutout": 2.0},
                },
            },
        ),
        422,
        "cutout",
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "finetune",
                "params": {"table": "tables/tiny", "out": "models/fm", "confidance": 0.9},
            },
        ),
        422,
        "confidance",
    )
    fm = client.post(
        "/api/jobs",
        json={
            "kind": "finetune",
            "params": {
                "table": "tables/tiny",
                "out": "models/fm",
                "consistency_weight": 1.0,
                "unlabeled_split": "train",
                "confidence": 0.9,
                "strong_augment": {"hflip": 0.5, "cutout": 0.4},
            },
        },
    )
    assert fm.status_code == 201 and fm.json()["params"]["consistency_weight"] == 1.0
    client.post(f"/api/jobs/{fm.json()['id']}/cancel")
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "distill",
                "params": {"teacher": "../ft", "table": "tables/tiny", "out": "models/st"},
            },
        ),
        403,
        "..",
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "distill",
                "params": {
                    "teacher": "models/cnn",
                    "table": "tables/tiny",
                    "out": "models/st",
                    "temperature": 0,
                },
            },
        ),
        422,
        "temperature: Input should be greater than 0",
    )
    st = client.post(
        "/api/jobs",
        json={
            "kind": "distill",
            "params": {
                "teacher": "models/cnn",
                "table": "tables/tiny",
                "out": "models/st",
                "unlabeled_split": "train",
            },
        },
    )
    assert st.status_code == 201 and st.json()["params"]["teacher"].endswith("models/cnn")
    client.post(f"/api/jobs/{st.json()['id']}/cancel")
    kinds = {k["kind"]: k for k in client.get("/api/jobs/kinds").json()["kinds"]}
    assert set(kinds) >= {
        "ingest",
        "train",
        "pretrain",
        "finetune",
        "distill",
        "evaluate",
        "predict",
        "embed",
        "index",
        "dedup",
    }
    assert kinds["train"]["schema"]["properties"]["epochs"]["minimum"] == 1


def test_unavailable_kind(client, monkeypatch):
    monkeypatch.setitem(
        KINDS, "finetune", dataclasses.replace(KINDS["finetune"], module="sparkvision.not_built_yet")
    )
    assert_error(
        client.post(
            "/api/jobs",
            json={
                "kind": "finetune",
                "params": {"table": "tables/tiny", "out": "m", "encoder": "models/cnn"},
            },
        ),
        422,
        "not available in this build",
    )


def test_job_errors_name_the_field_on_one_line(client, monkeypatch):
    """Pydantic errors read ``field: message``; a library message naming a CLI flag names the field."""
    r = client.post(
        "/api/jobs", json={"kind": "dedup", "params": {"table": "tables/tiny", "out": "d", "keep": "x"}}
    )
    assert_error(r, 422, "invalid dedup parameters: keep: Input should be 'largest' or 'earliest'")

    class StepParams(Params):
        steps: int = 1
        warmup_steps: int = 0

    class LibraryConfig(BaseModel):
        steps: PositiveInt

    def check(p):
        if p.steps > 100:
            raise ParamError("steps", "at most 100")
        if p.warmup_steps > p.steps:
            raise ValueError(f"--warmup-steps {p.warmup_steps} is over --steps; see --help")
        LibraryConfig(steps=p.steps)

    monkeypatch.setitem(KINDS, "step", Kind("step", StepParams, lambda *_: {}, "A step.", check=check))
    r = client.post("/api/jobs", json={"kind": "step", "params": {"steps": 1, "warmup_steps": 2}})
    assert_error(r, 422, "invalid step parameters: warmup_steps 2 is over steps; see --help")
    r = client.post("/api/jobs", json={"kind": "step", "params": {"steps": 0}})
    assert_error(r, 422, "invalid step parameters: steps: Input should be greater than 0")
    assert "\n" not in r.json()["error"]
    assert_error(
        client.post("/api/jobs", json={"kind": "step", "params": {"steps": 101}}),
        422,
        "invalid step parameters: steps: at most 100",
    )


def test_validation_message_and_flags_to_fields():
    errors = [
        {"loc": ("body", "params", "epochs"), "msg": "Input should be\n  greater than 0"},
        {"loc": (), "msg": "Value error, batch_size 10 is not divisible by workers 3"},
    ]
    assert validation_message(errors, "invalid train parameters", "params") == (
        "invalid train parameters: params.epochs: Input should be greater than 0; "
        "params: batch_size 10 is not divisible by workers 3"
    )
    assert flags_to_fields("--linear needs --encoder (or --no-such-flag)", {"linear", "encoder"}) == (
        "linear needs encoder (or --no-such-flag)"
    )
    assert (
        flags_to_fields("--label-fraction 2\nis over 1", ["label_fraction"]) == "label_fraction 2 is over 1"
    )
    # A job failing at run time: the runner's message, in the same words.
    assert error_message(ValueError("--keep x is not one of largest\n(see --help)"), ["keep"]) == (
        "keep x is not one of largest"
    )
    assert error_message(KeyError("--split test is empty"), ["split"]) == "split test is empty"
    assert error_message(RuntimeError("--keep lost"), []) == "RuntimeError: --keep lost"


def test_serve_flags_default_to_the_settings():
    flags = {name: p.default for name, p in inspect.signature(serve).parameters.items()}
    s = Settings()
    assert (
        flags["host"],
        flags["port"],
        flags["db"],
        flags["max_pixels"],
        flags["batch_size"],
        flags["batch_wait_ms"],
        flags["torch_threads"],
    ) == (s.host, s.port, s.db_url, s.max_pixels, s.batch_size, s.batch_wait_ms, s.torch_threads)
    assert int(flags["max_upload_mb"] * 1024 * 1024) == s.max_upload_bytes


def test_unknown_job_id(client):
    assert_error(client.get("/api/jobs/nope"), 404, "no job")
    assert_error(client.post("/api/jobs/nope/cancel"), 404, "no job")
    assert_error(client.post("/api/jobs/nope/resume"), 404, "no job")
    assert_error(client.get("/api/jobs/nope/metrics"), 404, "no job")


def test_queue_cancel_and_conflicts(client):
    r = client.post("/api/jobs", json={"kind": "ingest", "params": {"source": "folder", "table": "tables/q"}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["params"]["source"].endswith("/folder")  # resolved, absolute
    assert job["result_location"].endswith("tables/q")
    assert any(j["id"] == job["id"] for j in client.get("/api/jobs?state=queued").json()["jobs"])
    assert client.post(f"/api/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    assert_error(client.post(f"/api/jobs/{job['id']}/cancel"), 409, "already cancelled")
    assert client.post(f"/api/jobs/{job['id']}/resume").json()["state"] == "queued"
    client.post(f"/api/jobs/{job['id']}/cancel")


def write_training_output(out) -> None:
    """What a training run leaves in its model dir: metrics.jsonl per epoch, evaluation.json."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for e in range(1, 6):
            f.write(
                json.dumps(
                    {
                        "epoch": e,
                        "train_loss": 1.4 / e,
                        "test_acc": 0.5 + 0.08 * e,
                        "test_loss": 1.5 / e,
                        "images_per_s": 900 + 20 * e,
                        "epoch_time_s": 1.0,
                    }
                )
                + "\n"
            )
    with open(os.path.join(out, "evaluation.json"), "w") as f:
        json.dump(
            {
                "accuracy": 0.9,
                "split": "test",
                "class_names": CLASSES,
                "confusion_matrix": [[9, 1, 0, 0], [0, 10, 0, 0], [1, 0, 8, 1], [0, 0, 1, 9]],
            },
            f,
        )


def test_training_job_metrics_and_confusion(client, root):
    out = root / "models" / "trained"
    write_training_output(str(out))
    store = client.app.state.sv.store
    job = store.create("train", {"table": str(root / "tables" / "tiny"), "out": str(out)}, str(out))
    store.request_cancel(job.id)  # keep the (runner-less) queue empty
    m = client.get(f"/api/jobs/{job.id}/metrics").json()
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4, 5]
    assert m["confusion"]["matrix"][0] == [9, 1, 0, 0] and m["confusion"]["class_names"] == CLASSES


# ----------------------------------------------------------------------------- tokens


def test_plan_job_page_data(client, root):
    """A plan job's page gets its plan.json and curves.png from the job's out, nothing from a job of
    another kind, and a 404 naming the job before the plan is written."""
    from PIL import Image

    store = client.app.state.sv.store
    out = root / "plans" / "p1"
    job = store.create("plan", {"out": str(out), "table": str(root / "tables" / "tiny")}, str(out))
    assert_error(client.get(f"/api/jobs/{job.id}/plan"), 404, "no plan yet")
    assert_error(client.get(f"/api/jobs/{job.id}/curves.png"), 404, "no curves yet")
    out.mkdir(parents=True)
    plan = {
        "choice": {"workers": 2, "threads_per_rank": 1, "batch_size": 256, "epochs": 5},
        "ruled_out": ["x"],
    }
    (out / "plan.json").write_text(json.dumps(plan))
    Image.new("RGB", (40, 30), "white").save(out / "curves.png")
    store.finish(job.id, "succeeded", result=plan)
    assert client.get(f"/api/jobs/{job.id}/plan").json()["choice"]["batch_size"] == 256
    r = client.get(f"/api/jobs/{job.id}/curves.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    other = store.create("train", {"out": str(out), "table": str(root / "tables" / "tiny")}, str(out))
    store.request_cancel(other.id)  # keep the (runner-less) queue empty
    assert_error(client.get(f"/api/jobs/{other.id}/plan"), 404, "no plan")
    assert_error(client.get("/api/jobs/nope/plan"), 404, "no job")


def test_non_loopback_needs_token(root, monkeypatch):
    monkeypatch.delenv("SPARKVISION_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="not loopback"):
        create_app(settings_for(root, host="0.0.0.0"))
    monkeypatch.setenv("SPARKVISION_API_TOKEN", "from-env")
    assert settings_for(root, host="0.0.0.0").token == "from-env"
    monkeypatch.delenv("SPARKVISION_API_TOKEN")
    with TestClient(create_app(settings_for(root, host="0.0.0.0", token="s3cret"))) as c:
        body = {"kind": "ingest", "params": {"source": "folder", "table": "tables/t"}}
        assert_error(c.post("/api/jobs", json=body), 401, "token")
        assert_error(
            c.post("/api/jobs", json={"kind": 3}), 401, "token"
        )  # no token: the body is not even read
        assert_error(c.post("/api/jobs", json=body, headers={"Authorization": "Bearer wrong"}), 403, "wrong")
        r = c.post("/api/jobs", json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 201
        jid = r.json()["id"]
        assert_error(c.post(f"/api/jobs/{jid}/cancel"), 401, "token")
        assert_error(c.post(f"/api/jobs/{jid}/resume"), 401, "token")
        assert c.post(f"/api/jobs/{jid}/cancel", headers={"X-API-Token": "s3cret"}).status_code == 200
        assert c.get("/api/jobs").status_code == 200  # reading needs no token
        assert c.post("/api/classify", files=[("files", ("a.png", make_image(0)))]).status_code == 200


# ----------------------------------------------------------------------------- restart, resume


def test_restart_marks_running_jobs_interrupted_and_resume_uses_checkpoint(root, job_db_url):
    """On a SQLite file, then on PostgreSQL (``--db postgresql+psycopg://...``)."""
    url = job_db_url
    store = JobStore(url)
    out = root / "models" / "resumable"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / "epoch-1.safetensors").write_bytes(b"")
    (out / "checkpoints" / "epoch-1.json").write_text("{}")
    train = store.create("train", {"table": str(root / "tables" / "tiny"), "out": str(out), "epochs": 3})
    other = store.create("ingest", {"source": str(root / "folder"), "table": str(root / "tables" / "r")})
    store.claim_next()
    store.claim_next()
    store.close()  # the "server" dies with both running
    with TestClient(create_app(settings_for(root, db_url=url))) as c:
        for jid in (train.id, other.id):
            j = c.get(f"/api/jobs/{jid}").json()
            assert j["state"] == "interrupted" and "resume" in j["error"]
        r = c.post(f"/api/jobs/{train.id}/resume").json()
        assert r["state"] == "queued" and r["params"]["resume"] is True
        assert c.post(f"/api/jobs/{other.id}/resume").json()["state"] == "queued"
        assert_error(c.post(f"/api/jobs/{train.id}/resume"), 409, "only interrupted")


def test_job_api_on_each_backend(root, job_db_url):
    """Submit, list, get, cancel, resume through the app with ``--db`` on SQLite, then PostgreSQL."""
    with TestClient(create_app(settings_for(root, db_url=job_db_url))) as c:
        r = c.post("/api/jobs", json={"kind": "ingest", "params": {"source": "folder", "table": "tables/pg"}})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["state"] == "queued" and job["params"]["source"].endswith("/folder")
        assert job["created_at"].endswith("Z") and job["params"]["labeled"] is True
        assert [j["id"] for j in c.get("/api/jobs?kind=ingest&state=queued").json()["jobs"]] == [job["id"]]
        assert c.get(f"/api/jobs/{job['id']}").json()["params"] == job["params"]
        assert c.post(f"/api/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
        assert_error(c.post(f"/api/jobs/{job['id']}/cancel"), 409, "already cancelled")
        assert c.post(f"/api/jobs/{job['id']}/resume").json()["state"] == "queued"
        # A diverged loss (NaN) in live metrics: stored as null, the job still reads as JSON.
        c.app.state.sv.store.update(job["id"], metrics={"loss": float("nan"), "step": 3})
        r = c.get(f"/api/jobs/{job['id']}")
        assert r.status_code == 200 and r.json()["metrics"] == {"loss": None, "step": 3}
        # A NUL in an id or a filter is just "not found", not a database error.
        assert_error(c.get("/api/jobs/a%00b"), 404, "no job")
        assert_error(c.post("/api/jobs/a%00b/cancel"), 404, "no job")
        assert c.get("/api/jobs?kind=in%00gest").json()["jobs"] == []
        c.post(f"/api/jobs/{job['id']}/cancel")


# ----------------------------------------------------------------------------- the runner, with Spark


def wait_for(c, jid, states, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        j = c.get(f"/api/jobs/{jid}").json()
        if j["state"] in states:
            return j
        time.sleep(0.3)
    raise AssertionError(f"job {jid} did not reach {states}: {j}")


def test_runner_ingest_job_and_cancel_running_spark_job(spark, root, tmp_path, monkeypatch):
    class SleepParams(Params):
        seconds: int = 60

    def run_sleep(spark_, p, progress):
        secs = p.seconds
        spark_.sparkContext.parallelize(range(2), 2).map(lambda x: time.sleep(secs) or x).count()
        return {"slept": p.seconds}

    class WarmupParams(Params):
        warmup_steps: int = 2

    def run_warmup(spark_, p, progress):
        raise ValueError(f"--warmup-steps {p.warmup_steps} is over --steps")

    monkeypatch.setitem(KINDS, "sleep", Kind("sleep", SleepParams, run_sleep, "Sleep in a Spark job."))
    monkeypatch.setitem(KINDS, "warmup", Kind("warmup", WarmupParams, run_warmup, "Fail at run time."))
    settings = settings_for(root, db_url=f"sqlite:///{tmp_path / 'r.db'}", start_runner=True)
    with TestClient(create_app(settings, spark_factory=lambda: spark)) as c:
        r = c.post(
            "/api/jobs", json={"kind": "ingest", "params": {"source": "folder", "table": "tables/ingested"}}
        )
        jid = r.json()["id"]
        sleeper = c.post("/api/jobs", json={"kind": "sleep", "params": {"seconds": 60}}).json()["id"]
        j = wait_for(c, jid, ("succeeded", "failed"))
        assert j["state"] == "succeeded", j
        assert j["progress"] == 100 and j["result"]["rows_written"] == 6 and j["metrics"]["rows_written"] == 6
        assert any("succeeded" in line for line in j["log_tail"])
        assert "tables/ingested" in {t["name"] for t in c.get("/api/tables").json()["tables"]}
        wait_for(c, sleeper, ("running",))
        time.sleep(1.0)  # let the Spark job start inside its job group
        assert c.get("/api/health").json()["running_job"] == sleeper
        t0 = time.time()
        assert c.post(f"/api/jobs/{sleeper}/cancel").status_code == 200
        j = wait_for(c, sleeper, ("cancelled", "failed", "succeeded"), timeout=30)
        assert j["state"] == "cancelled" and time.time() - t0 < 20, j
        # A failing job: the library's message, no stack trace.
        bad = c.post(
            "/api/jobs",
            json={"kind": "train", "params": {"table": "tables/preds", "out": "models/x", "epochs": 1}},
        ).json()["id"]
        j = wait_for(c, bad, ("failed", "succeeded"))
        assert (
            j["state"] == "failed"
            and "not a sparkvision image table" in j["error"]
            and "Traceback" not in j["error"]
        )
        # A run-time message names the job's fields, not CLI flags (--steps is no field of this kind).
        bad = c.post("/api/jobs", json={"kind": "warmup", "params": {}}).json()["id"]
        j = wait_for(c, bad, ("failed", "succeeded"))
        assert j["state"] == "failed" and j["error"] == "warmup_steps 2 is over --steps", j
