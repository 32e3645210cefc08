"""Index choice, shard-by-shard build, and search: every image is its own nearest neighbour."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from sparkvision.cli import app
from sparkvision.errors import ParamError
from sparkvision.models.modeldir import ModelSpec, Preprocess, save_model_dir
from sparkvision.retrieval.embed import embed_with_codes
from sparkvision.retrieval.index import EXACT_MAX_ROWS, build_index, choose_index, vectors_of
from sparkvision.retrieval.search import SearchIndex, search_images, search_table


def test_choose_index_logic():
    small = choose_index(1_000, 256)
    assert small.kind == "flat" and "exact" in small.reason and not small.needs_training
    big = choose_index(1_000_000, 128)
    assert big.kind == "ivf" and big.params["nlist"] == 4096 and big.needs_training
    assert "4096 lists" in big.reason
    assert choose_index(EXACT_MAX_ROWS, 64).kind == "flat"
    assert choose_index(EXACT_MAX_ROWS + 1, 64).kind == "ivf"
    huge = choose_index(200_000_000, 256)
    assert huge.kind == "ivfpq" and "GiB" in huge.reason
    assert choose_index(1_000_000, 128, kind="hnsw").kind == "hnsw"
    assert choose_index(50, 64, kind="ivf").params["nlist"] == 1  # never more lists than n / 39
    assert choose_index(1_000_000, 64, binary=True).kind == "binary_flat"
    assert choose_index(50_000_000, 64, binary=True).kind == "binary_ivf"
    with pytest.raises(ValueError, match="whole bytes"):
        choose_index(10, 12, binary=True)
    with pytest.raises(ValueError, match="no usable rows"):
        choose_index(0, 64)
    with pytest.raises(ParamError, match="^kind: 'lsh' is not one of"):
        choose_index(1_000_000, 64, kind="lsh")


def _write_shards(root, x: np.ndarray, shards: int) -> None:
    os.makedirs(root, exist_ok=True)
    for s, part in enumerate(np.array_split(np.arange(len(x)), shards)):
        emb = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (len(part) + 1) * x.shape[1], x.shape[1]), pa.int32()),
            pa.array(x[part].ravel(), pa.float32()),
        )
        t = pa.table(
            {"content_id": [f"id{i}" for i in part], "path": [f"/p/{i}.png" for i in part], "embedding": emb}
        )
        pq.write_table(t, os.path.join(root, f"part-{s:03d}.parquet"))


def test_ivf_built_shard_by_shard_finds_itself(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _write_shards(tmp_path / "feat", x, shards=5)
    seen = []
    s = build_index(
        str(tmp_path / "feat"), str(tmp_path / "idx"), kind="ivf", progress=lambda n, note: seen.append(n)
    )
    assert s["kind"] == "ivf" and s["rows"] == 6000 and "lists" in s["explain"]
    assert len(seen) == 5  # one add per Parquet file
    idx = SearchIndex(str(tmp_path / "idx"), nprobe=s["params"]["nlist"])  # all lists: exact
    nb = idx.search(x[:100], 3)
    assert (nb.rows[:, 0] == np.arange(100)).all()
    assert idx.results(nb)[7][0]["content_id"] == "id7"
    with pytest.raises(ValueError, match="expects"):
        idx.search(x[:2, :5], 3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec("cnn", 4, 1, {"image_size": 16, "widths": [8, 16], "hidden": 64})
    model = spec.build().eval()
    out = str(tmp_path_factory.mktemp("models") / "tiny-cnn")
    return save_model_dir(out, model, spec, ["a", "b", "c", "d"], Preprocess(1, (16, 16), (0.5,), (0.5,)))


@pytest.fixture(scope="module")
def features(spark, tiny_table, model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("feat") / "tiny_feat")
    s = embed_with_codes(spark, model_dir, tiny_table, out, bits=32, method="itq")
    assert s["rows"] == 96 and s["bits"] == 32 and s["errors"] == 0
    return out


def test_embed_writes_codes_and_meta(spark, features, model_dir):
    df = spark.read.parquet(features)
    assert {"content_id", "path", "embedding", "code"} <= set(df.columns)
    row = df.first()
    assert len(row.code) == 4 and abs(np.linalg.norm(row.embedding) - 1) < 1e-4
    with open(os.path.join(features, "_retrieval.json")) as f:
        assert json.load(f)["model_dir"] == os.path.abspath(model_dir)


def test_each_image_is_its_own_nearest_neighbour(spark, features, tmp_path):
    s = build_index(features, str(tmp_path / "idx"))
    assert s["kind"] == "flat" and s["rows"] == 96 and "exact" in s["explain"]
    x = spark.read.parquet(features).orderBy("content_id").toArrow()
    idx = SearchIndex(str(tmp_path / "idx"))
    hits = idx.results(idx.search(vectors_of(x, "embedding"), 5))
    assert [h[0]["content_id"] for h in hits] == x.column("content_id").to_pylist()
    assert all(h[0]["score"] > 0.9999 for h in hits)

    # binary index over the codes: the query's own row is at Hamming distance 0
    b = build_index(features, str(tmp_path / "bidx"), column="code")
    assert b["kind"] == "binary_flat" and b["metric"] == "hamming"
    bidx = SearchIndex(str(tmp_path / "bidx"))
    assert bidx.hasher is not None and bidx.hasher.bits == 32
    nb = bidx.search(vectors_of(x, "embedding"), 96)  # float queries are encoded by the hasher
    ids = bidx.ids.column("content_id").to_pylist()
    for q, cid in enumerate(x.column("content_id").to_pylist()):
        own = [s for s, r in zip(nb.scores[q], nb.rows[q], strict=False) if ids[r] == cid]
        assert own == [1.0]


def test_search_images_and_batch_mode(spark, features, tiny_table, tmp_path):
    build_index(features, str(tmp_path / "idx"))
    rows = spark.read.parquet(tiny_table).select("content_id", "path", "image").limit(3).collect()
    files = []
    for i, r in enumerate(rows):
        p = tmp_path / f"q{i}.png"
        p.write_bytes(r.image)
        files.append(str(p))
    res = search_images(str(tmp_path / "idx"), files, k=3)
    assert [q["neighbours"][0]["content_id"] for q in res] == [r.content_id for r in rows]

    # batch mode on the executors, from the image table (embedded on the fly with the index's model)
    s = search_table(spark, str(tmp_path / "idx"), tiny_table, str(tmp_path / "res"), k=2)
    assert s["queries"] == 96 and s["errors"] == 0
    top = spark.read.parquet(str(tmp_path / "res")).where("rank = 1")
    assert top.count() == 96 and top.where("content_id != query_content_id").count() == 0
    # and from the features table, excluding each query's own row
    search_table(spark, str(tmp_path / "idx"), features, str(tmp_path / "res2"), k=2, exclude_self=True)
    res2 = spark.read.parquet(str(tmp_path / "res2"))
    assert res2.count() == 192 and res2.where("content_id = query_content_id").count() == 0


def test_cli_index_and_search(features, tiny_table, spark, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["index", features, str(tmp_path / "idx"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["kind"] == "flat" and "explain" in out
    row = spark.read.parquet(tiny_table).select("content_id", "image").first()
    (tmp_path / "q.png").write_bytes(row.image)
    r = runner.invoke(app, ["search", str(tmp_path / "idx"), str(tmp_path / "q.png"), "-k", "4", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])["results"][0]
    assert len(res["neighbours"]) == 4 and res["neighbours"][0]["content_id"] == row.content_id
    r = runner.invoke(app, ["search", str(tmp_path / "nope"), str(tmp_path / "q.png"), "--json"])
    assert r.exit_code == 2 and "INDEX: " in r.output and "does not exist" in r.output  # before any work
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["search", str(tmp_path / "empty"), str(tmp_path / "q.png"), "--json"])
    assert r.exit_code == 2 and "not an index directory" in r.output


def test_cli_embed_with_codes(spark, tiny_table, model_dir, tmp_path):
    out = str(tmp_path / "f")
    r = CliRunner().invoke(
        app, ["embed", model_dir, tiny_table, out, "--bits", "32", "--split", "test", "--json"]
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.output.strip().splitlines()[-1])
    assert s["rows"] == 32 and s["code_method"] == "itq" and s["bits"] == 32
    assert os.path.exists(os.path.join(out, "_hasher", "hasher.safetensors"))
    r = CliRunner().invoke(app, ["index", out, str(tmp_path / "bi"), "--codes", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["kind"] == "binary_flat"
    r = CliRunner().invoke(app, ["embed", model_dir, tiny_table, out, "--bits", "48", "--json"])
    assert r.exit_code == 2 and "32, 64 or 128" in r.output
