"""Detection in the web: ``POST /api/detect`` and the ``detect`` / ``train-detector`` job kinds.

The detector is a ``fasterrcnn_tiny`` with random weights, written in its directory format in
milliseconds: its boxes are arbitrary (near-equal scores just under 0.5), so the tests check the
answer's schema, ranges, the score filter and the box count, that the online answer is the batch
job's for the same image, and the path rules; what a trained detector finds is tests/test_detect_train.py.
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_image, write_tiny_model
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file
from test_detect_train import write_squares
from test_web_api import assert_error, settings_for, wait_for, write_image_table, write_index

from sparkvision.models.detector import DetectorSpec, detector_json
from sparkvision.models.modeldir import Preprocess, state_dict_for_save
from sparkvision.web.app import create_app

SIDE = 64


def write_tiny_detector(path, seed: int = 0) -> str:
    """A class-agnostic ``fasterrcnn_tiny`` (width 8, 64-pixel input) with random weights."""
    torch.manual_seed(seed)
    spec = DetectorSpec("fasterrcnn_tiny", 2, (SIDE, SIDE), True, {"width": 8})
    os.makedirs(path, exist_ok=True)
    save_file(state_dict_for_save(spec.build()), os.path.join(path, "model.safetensors"))
    pre = Preprocess(channels=3, size=(SIDE, SIDE), mean=(0.5,) * 3, std=(0.25,) * 3)
    for name, obj in detector_json(spec, ["product"], pre, {"map_50": None}).items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f)
    return str(path)


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("detroot")
    write_tiny_detector(root / "detectors" / "tiny")
    write_tiny_model(root / "models" / "cnn", ["a", "b"])
    write_image_table(str(root / "tables" / "tiny"), n_per_class=2)
    return root


@pytest.fixture(scope="module")
def squares(spark, root):
    """A detection table (Spark-written, the real schema) of 12 scenes with a planted square."""
    write_squares(spark, str(root / "tables" / "squares"), 8, 4)
    return "tables/squares"


@pytest.fixture(scope="module")
def client(root):
    settings = settings_for(
        root, model_dir=None, index_dir=None, max_upload_bytes=200_000, max_pixels=100_000
    )
    with TestClient(create_app(settings)) as c:
        yield c


def detect(client, data: bytes, **query):
    query.setdefault("model", "detectors/tiny")
    return client.post("/api/detect", params=query, files=[("file", ("scene.png", data, "image/png"))])


def test_detections_are_boxes_in_pixels_of_the_upload(client):
    r = detect(client, noise_png(80, 48), min_score=0, max_detections=20)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (80, 48)  # not the detector's 64 x 64 input
    assert body["model"] == "detectors/tiny" and body["filename"] == "scene.png"
    assert body["class_names"] == ["product"] and body["latency_ms"] > 0
    dets = body["detections"]
    assert len(dets) == 20  # random weights score ~0.49 everywhere: the cap decides
    for d in dets:
        assert set(d) == {"x1", "y1", "x2", "y2", "score", "label", "label_name"}
        assert 0 <= d["x1"] <= d["x2"] <= 80 and 0 <= d["y1"] <= d["y2"] <= 48, d
        assert 0 <= d["score"] <= 1 and d["label"] == 0 and d["label_name"] == "product"
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True)
    # The score filter: a threshold inside the scores keeps exactly the boxes at or above it.
    every = detect(client, noise_png(80, 48), min_score=0, max_detections=1000).json()["detections"]
    cut = sorted(d["score"] for d in every)[len(every) // 2]
    kept = detect(client, noise_png(80, 48), min_score=cut, max_detections=1000).json()["detections"]
    assert 0 < len(kept) < len(every)
    assert sorted(d["score"] for d in kept) == sorted(d["score"] for d in every if d["score"] >= cut)
    assert detect(client, noise_png(80, 48)).json()["detections"] == []  # the op's default 0.5
    raw = client.post(
        "/api/detect?model=detectors/tiny&min_score=0&max_detections=3",
        content=noise_png(30, 20),
        headers={"content-type": "image/png"},
    )
    assert raw.status_code == 200 and len(raw.json()["detections"]) == 3
    assert (raw.json()["width"], raw.json()["height"]) == (30, 20)


def test_the_endpoint_is_in_the_openapi_schema_with_the_jobs_defaults(client):
    post = client.get("/openapi.json").json()["paths"]["/api/detect"]["post"]
    params = {p["name"]: p for p in post["parameters"]}
    assert set(params) == {"model", "min_score", "max_detections"} and params["model"]["required"]
    assert params["min_score"]["schema"]["default"] == 0.5  # DetectParams' own default
    assert params["max_detections"]["schema"]["maximum"] == 1000
    assert "multipart/form-data" in post["requestBody"]["content"]


def test_bad_requests_are_one_line_4xx(client, root):
    img = noise_png(32, 32)
    assert_error(client.post("/api/detect", files=[("file", ("a.png", img))]), 422, "model")
    assert_error(detect(client, img, model="../detectors/tiny"), 403, "..")
    assert_error(detect(client, img, model="/etc"), 403, "outside")
    assert_error(detect(client, img, model="tables/tiny"), 404, "not a sparkvision model")
    assert_error(detect(client, img, model="models/cnn"), 422, "not a detector")
    assert_error(detect(client, img, min_score=2), 422, "min_score")
    assert_error(detect(client, img, max_detections=0), 422, "max_detections")
    assert_error(detect(client, img, min_scor=0.1), 422, "min_scor")
    assert_error(detect(client, b"not an image"), 422, "not_an_image")
    big = io.BytesIO()
    Image.new("RGB", (400, 400)).save(big, format="PNG")  # 160k pixels in a small file
    assert_error(detect(client, big.getvalue()), 413, "too_many_pixels")  # max_pixels 100k
    assert_error(detect(client, noise_png(300, 300)), 413, "upload limit")  # 270 kB
    two = [("file", (f"{i}.png", img, "image/png")) for i in range(2)]
    assert_error(client.post("/api/detect?model=detectors/tiny", files=two), 400, "too many files")
    # The classify endpoint names a detector for what it is.
    r = client.post("/api/classify?model=detectors/tiny", files=[("files", ("a.png", img))])
    assert_error(r, 422, "is a detector")
    # Weights that do not fit the architecture: one line, not a 500.
    broken = write_tiny_detector(root / "detectors" / "broken")
    save_file({"nothing": torch.zeros(2)}, os.path.join(broken, "model.safetensors"))
    assert_error(detect(client, img, model="detectors/broken"), 422, "weights do not fit")


def test_a_detector_retrained_in_place_is_loaded_again(client, root):
    path = write_tiny_detector(root / "detectors" / "moving", seed=1)
    first = detect(client, noise_png(40, 40), model="detectors/moving", min_score=0).json()["detections"]
    time.sleep(0.01)  # a new mtime even on coarse clocks
    write_tiny_detector(path, seed=2)
    second = detect(client, noise_png(40, 40), model="detectors/moving", min_score=0).json()["detections"]
    assert first != second


def test_detect_and_train_detector_are_job_kinds(client):
    kinds = {k["kind"]: k for k in client.get("/api/jobs/kinds").json()["kinds"]}
    assert kinds["detect"]["outputs"] == ["out", "preview"]
    assert kinds["train-detector"]["reports_epochs"] and kinds["train-detector"]["resumable"]
    base = {"model_dir": "detectors/tiny", "table": "tables/tiny", "out": "tables/found"}
    for preview, status, fragment in (
        ("/tmp/outside.png", 403, "outside"),
        ("../x.png", 403, ".."),
        ("tables/found/p.png", 422, "inside out"),
        ("x.jpg", 422, "png"),
        ("tables/tiny/_sparkvision.json.png", 422, "overlaps the input table"),
    ):
        r = client.post("/api/jobs", json={"kind": "detect", "params": {**base, "preview": preview}})
        assert_error(r, status, fragment)
    r = client.post(
        "/api/jobs",
        json={
            "kind": "train-detector",
            "params": {"table": "tables/tiny", "out": "detectors/x", "model": "yolo"},
        },
    )
    assert_error(r, 422, "not a registered detector")


def test_a_detect_job_writes_the_table_the_endpoint_agrees_with(spark, root, squares, tmp_path):
    db = f"sqlite:///{tmp_path / 'j.db'}"
    settings = settings_for(root, model_dir=None, index_dir=None, db_url=db, start_runner=True)
    (root / "previews").mkdir(exist_ok=True)
    (root / "previews" / "taken.png").write_bytes(b"x")
    params = {
        "model_dir": "detectors/tiny",
        "table": squares,
        "out": "tables/found",
        "min_score": 0,
        "max_detections": 5,
        "batch_size": 1,  # one image per detector call, as online
        "preview": "previews/found.png",
        "preview_rows": 2,
    }
    with TestClient(create_app(settings, spark_factory=lambda: spark)) as c:
        taken = c.post(
            "/api/jobs", json={"kind": "detect", "params": {**params, "preview": "previews/taken.png"}}
        )
        assert_error(taken, 409, "already holds data")
        job = c.post("/api/jobs", json={"kind": "detect", "params": params})
        assert job.status_code == 201, job.text
        j = wait_for(c, job.json()["id"], ("succeeded", "failed"))
        assert j["state"] == "succeeded", j
        assert j["result_location"] == str(root / "tables" / "found")
        assert j["result"]["rows"] == 12 and j["result"]["errors"] == 0 and j["result"]["detections"] == 60
        assert Image.open(root / "previews" / "found.png").format == "PNG"
        # The online answer for a row's image is the batch job's answer for it.
        table = {r["content_id"]: r for r in pq.read_table(str(root / squares)).to_pylist()}
        for row in pq.read_table(j["result_location"]).to_pylist()[:2]:
            online = detect(c, table[row["content_id"]]["image"], min_score=0, max_detections=5).json()
            assert len(online["detections"]) == len(row["detections"]) == 5
            for a, b in zip(online["detections"], row["detections"], strict=True):
                assert a["score"] == pytest.approx(b["score"], abs=1e-5)
                for k in ("x1", "y1", "x2", "y2"):
                    assert a[k] == pytest.approx(b[k], abs=0.02)


def test_a_train_detector_job_runs_and_its_detector_serves(spark, root, squares, tmp_path):
    db = f"sqlite:///{tmp_path / 't.db'}"
    settings = settings_for(root, model_dir=None, index_dir=None, db_url=db, start_runner=True)
    params = {
        "table": squares,
        "out": "detectors/trained",
        "model": "fasterrcnn_tiny",
        "model_kwargs": {"width": 8},
        "image_size": 64,
        "epochs": 1,
        "batch_size": 4,
    }
    with TestClient(create_app(settings, spark_factory=lambda: spark)) as c:
        job = c.post("/api/jobs", json={"kind": "train-detector", "params": params})
        j = wait_for(c, job.json()["id"], ("succeeded", "failed"), timeout=180)
        assert j["state"] == "succeeded", j
        assert "map_50" in j["metrics"] and j["result_location"] == str(root / "detectors" / "trained")
        history = c.get(f"/api/jobs/{j['id']}/metrics").json()["history"]
        assert [h["epoch"] for h in history] == [1]
        r = detect(c, make_image(0, size=64, mode="RGB"), model="detectors/trained", min_score=0)
        assert r.status_code == 200 and r.json()["width"] == 64, r.text


def test_search_takes_a_detector_checked_like_detects_model(root):
    """`/api/search?detector=` crops the upload as `search --detector` does (the same library call
    gives the same answer), and the directory is checked inside the data roots like a model."""
    from sparkvision.retrieval.search import SearchIndex, embed_images, query_meta

    model = str(root / "models" / "cnn")
    write_index(model, root / "tables" / "tiny", root / "search_features", root / "search_index")
    settings = settings_for(root, model_dir=None, index_dir=str(root / "search_index"))
    query = noise_png(SIDE, SIDE, seed=3)
    det = str(root / "detectors" / "tiny")
    idx = SearchIndex(str(root / "search_index"))
    want, _ = embed_images(model, [query], query_meta(idx.meta, det))
    [expected] = idx.results(idx.search(want, 3))
    with TestClient(create_app(settings)) as c:
        r = c.post("/api/search?k=3&detector=detectors/tiny", files=[("file", ("q.png", query, "image/png"))])
        assert r.status_code == 200, r.text
        got = r.json()["neighbours"]
        assert [h["content_id"] for h in got] == [h["content_id"] for h in expected]
        assert [h["score"] for h in got] == pytest.approx([h["score"] for h in expected], abs=1e-4)
        bad = c.post("/api/search?detector=models/cnn", files=[("file", ("q.png", query, "image/png"))])
        assert_error(bad, 422, "detector 'models/cnn' is not a detector")  # names the parameter
        outside = c.post("/api/search?detector=/etc", files=[("file", ("q.png", query, "image/png"))])
        assert 400 <= outside.status_code < 500
