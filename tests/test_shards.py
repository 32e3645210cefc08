"""Sharded indexes: built on the executors, searched one shard per task, merged by Spark."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F
from test_dedup import planted_table  # noqa: F401  (the dedup tests' image table with planted copies)

from sparkvision.errors import ParamError
from sparkvision.ops import OPERATIONS
from sparkvision.retrieval.dedup import dedup_table
from sparkvision.retrieval.index import build_index, choose_index, vectors_of
from sparkvision.retrieval.recall import check_recall
from sparkvision.retrieval.search import open_index, search_df
from sparkvision.retrieval.shard_build import build_sharded_index
from sparkvision.retrieval.shard_online import ShardedSearchIndex
from sparkvision.retrieval.shard_search import merge_topk_df, pair_keys, shard_candidates, with_qid
from sparkvision.retrieval.shards import (
    ROW_BITS,
    auto_shards,
    bytes_per_vector,
    global_ids,
    merge_topk,
    parse_shards,
    shard_file,
    split_ids,
)

D = 16


def vectors(n: int, seed: int, clusters: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((clusters, D)).astype(np.float32) * 3
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_features(path, x: np.ndarray, files: int = 3) -> str:
    path.mkdir(parents=True)
    for f, part in enumerate(np.array_split(np.arange(len(x)), files)):
        emb = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (len(part) + 1) * D, D), pa.int32()),
            pa.array(x[part].ravel(), pa.float32()),
        )
        names = pa.array([f"c{i:05d}" for i in part])
        pq.write_table(
            pa.table({"content_id": names, "path": names, "label_name": names, "embedding": emb}),
            str(path / f"part-{f}.parquet"),
        )
    return str(path)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("shards") / "features", vectors(600, 0))


@pytest.fixture(scope="module")
def flat_shards(spark, features, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards") / "flat3")
    summary = build_sharded_index(spark, features, out, shards=3, kind="flat")
    return out, summary


# --------------------------------------------------------------------------------- pure


def reference_topk(scores, ids, k):
    """Brute force over every (score, id) of every shard: score desc, then id asc."""
    out = []
    for q in range(scores[0].shape[0]):
        cands = sorted(
            (-float(s[q, j]), int(i[q, j]))
            for s, i in zip(scores, ids, strict=True)
            for j in range(s.shape[1])
            if i[q, j] >= 0
        )[:k]
        out.append(cands)
    return out


def test_merge_topk_ties_and_short_shards():
    # shard 0: a full top-3; shard 1: only one hit (FAISS pads with -1 / -inf); shard 2: ties with shard 0
    s0, i0 = np.array([[0.9, 0.5, 0.5], [0.3, 0.2, 0.1]], np.float32), np.array([[7, 3, 9], [1, 2, 3]])
    s1, i1 = (
        np.array([[0.5, -np.inf, -np.inf], [0.8, -np.inf, -np.inf]], np.float32),
        np.array([[1, -1, -1], [5, -1, -1]]),
    )
    s2, i2 = (
        np.array([[0.95, 0.5, 0.1], [np.nan, np.nan, np.nan]], np.float32),
        np.array([[4, 2, 8], [-1, -1, -1]]),
    )
    top_s, top_i = merge_topk([s0, s1, s2], [i0, i1, i2], 4)
    assert top_i[0].tolist() == [4, 7, 1, 2]  # the 0.5 ties go to the smaller ids 1, 2 (not 3, 9)
    np.testing.assert_allclose(top_s[0], [0.95, 0.9, 0.5, 0.5])
    assert top_i[1].tolist() == [5, 1, 2, 3]
    # fewer hits than k over all shards: padded with -1 / NaN
    top_s, top_i = merge_topk([s1], [i1], 3)
    assert top_i.tolist() == [[1, -1, -1], [5, -1, -1]] and np.isnan(top_s[:, 1:]).all()
    # random shards with many ties against the brute-force reference
    rng = np.random.default_rng(0)
    scores = [rng.integers(0, 4, (20, 5)).astype(np.float32) / 4 for _ in range(3)]
    ids = [
        np.where(rng.random((20, 5)) < 0.2, -1, rng.permutation(1000)[:100].reshape(20, 5)) for _ in range(3)
    ]
    top_s, top_i = merge_topk(scores, ids, 6)
    for q, ref in enumerate(reference_topk(scores, ids, 6)):
        assert [i for i in top_i[q] if i >= 0] == [i for _, i in ref]


def test_merge_topk_df_matches_the_pure_merge(spark):
    rng = np.random.default_rng(1)
    rows = []
    for q in range(5):
        for shard in range(3):
            for j in range(int(rng.integers(0, 4))):  # 0 to 3 hits per shard: some shards have none
                rows.append((q, "q", "p", int(shard * 100 + j), float(rng.integers(0, 3)) / 2, shard))
    df = spark.createDataFrame(
        rows, "qid long, query_content_id string, query_path string, id long, score float, shard int"
    )
    got = {}
    for r in merge_topk_df(df, 4).collect():
        got.setdefault(r.qid, []).append((r.rank, r.id))
    for q in range(5):
        mine = [r for r in rows if r[0] == q]
        expect = sorted((-s, i) for _, _, _, i, s, _ in mine)[:4]
        assert [i for _, i in sorted(got.get(q, []))] == [i for _, i in expect]


def test_ids_and_the_auto_rule():
    ids = global_ids(5, 10, 3)
    shard, row = split_ids(ids)
    assert shard.tolist() == [5] * 3 and row.tolist() == [10, 11, 12] and ids[0] == (5 << ROW_BITS) + 10
    ivf = choose_index(10_000_000, 128, kind="ivf")
    per = bytes_per_vector(ivf, 128)
    assert per == 128 * 4 + 8
    # 10M x 520 B = 5.2 GB; half of 1 GiB less 16384 x 128 x 4 B of centroids per shard
    budget = (1 << 30) * 0.5 - ivf.params["nlist"] * 128 * 4
    assert auto_shards(10_000_000, 128, ivf, 1024) == int(np.ceil(10_000_000 * per / budget)) == 10
    assert auto_shards(10_000_000, 128, ivf, 4096) < auto_shards(10_000_000, 128, ivf, 1024)
    pq_choice = choose_index(10_000_000, 128, kind="ivfpq")
    assert auto_shards(10_000_000, 128, pq_choice, 1024) == 1  # 40 B a vector: 400 MB fits one task
    assert auto_shards(3, 128, choose_index(3, 128), 1024) == 1
    with pytest.raises(ParamError, match="shard_memory_mb"):
        auto_shards(10_000_000, 128, ivf, 16)  # the quantizer alone is 8 MB of 16 MB's usable half
    assert parse_shards("auto") == "auto" and parse_shards("4") == 4 and parse_shards(None) is None
    for bad in ("0", "many"):
        with pytest.raises(ParamError, match="shards"):
            parse_shards(bad)


# --------------------------------------------------------------------------------- Spark


def test_sharded_flat_gives_the_unsharded_top_k(spark, features, flat_shards, tmp_path):
    out, summary = flat_shards
    assert summary["shards"] == 3 and summary["rows"] == 600 and summary["kind"] == "flat"
    single = str(tmp_path / "single")
    build_index(features, single, kind="flat")
    queries = spark.read.parquet(features).where(F.col("content_id") < "c00040")
    k = 7
    got = search_df(spark, out, queries, k).orderBy("query_content_id", "rank").collect()
    want = search_df(spark, single, queries, k).orderBy("query_content_id", "rank").collect()
    assert len(got) == len(want) == 40 * k
    assert [(r.query_content_id, r.content_id) for r in got] == [
        (r.query_content_id, r.content_id) for r in want
    ]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=1e-5)
    # exclude_self drops each query's own row and still returns k
    ex = search_df(spark, out, queries, k, exclude_self=True).collect()
    assert len(ex) == 40 * k and all(r.content_id != r.query_content_id for r in ex)


def test_no_task_loads_more_than_one_shard(spark, features, flat_shards):
    out, _ = flat_shards
    queries = with_qid(spark.read.parquet(features).where(F.col("content_id") < "c00100"))
    cands = shard_candidates(spark, out, queries, 5, query_batch_rows=30)  # 4 query batches x 3 shards
    rows = cands.select("task", "shard", "qid", "max_rss_mb").collect()
    shards_of: dict[int, set[int]] = {}
    for r in rows:
        shards_of.setdefault(r.task, set()).add(r.shard)
    assert max(len(s) for s in shards_of.values()) == 1  # counted from the tasks' own rows
    assert len(shards_of) == 12  # each (shard, batch) pair in a task of its own
    assert len({r.qid for r in rows}) == 100 and len(rows) == 100 * 3 * 5  # every query, every shard
    assert min(r.max_rss_mb for r in rows) > 0  # every task reports its memory
    # every pair gets a key, and that key hashes to the pair's own partition
    keys = pair_keys(spark, 12).agg(
        F.count("*").alias("n"),
        F.sum((F.pmod(F.hash("key"), F.lit(12)) != F.col("pair")).cast("int")).alias("bad"),
    )
    assert keys.first().asDict() == {"n": 12, "bad": 0}


def test_online_sharded_search_within_a_budget(spark, features, flat_shards):
    out, _ = flat_shards
    q = vectors(6, 5)
    idx = open_index(out)
    assert isinstance(idx, ShardedSearchIndex)
    full = idx.results(idx.search(q, 5))
    x = vectors(600, 0)  # the exact answer: brute force over the table
    truth = np.argsort(-(q @ x.T), axis=1)[:, :5]
    assert [[h["content_id"] for h in hits] for hits in full] == [[f"c{i:05d}" for i in row] for row in truth]
    tight = ShardedSearchIndex(out, memory_mb=0)  # nothing stays open: shards are opened per search
    assert tight.results(tight.search(q, 5)) == full and tight.held_bytes == 0
    assert idx.held_bytes > 0 and len(idx.open) == 3
    assert all(idx.mapped.values())  # flat shards are memory-mapped (IO_FLAG_MMAP_IFC)


def test_ivf_shards_are_mapped_and_check_reports_recall(spark, features, tmp_path):
    ivf = str(tmp_path / "ivf")
    s = build_sharded_index(spark, features, ivf, shards=2, kind="ivf")
    assert s["shards"] == 2 and s["kind"] == "ivf"
    res = check_recall(spark, ivf, features, k=5, queries=30, nprobes=[1, s["params"]["nlist"]])
    recalls = [r["recall"] for r in res["sweep"]]
    assert res["queries"] == 30 and 0 < recalls[0] <= recalls[1] == 1.0  # every list probed: exact
    idx = ShardedSearchIndex(ivf)
    idx.search(vectors(2, 7), 3)
    assert all(idx.mapped.values())  # IVF lists mapped with IO_FLAG_MMAP

    # Batch search finds each query's lists once (assign_task) and scans them in every shard
    # (search_preassigned): the same candidates as searching each shard whole at that nprobe.
    queries = with_qid(spark.read.parquet(features).where(F.col("content_id") < "c00030"))
    cands = shard_candidates(spark, ivf, queries, 5, nprobe=2).collect()
    got = {(r.query_content_id, r.shard, r.id): r.score for r in cands}
    table = pq.read_table(features).filter(pc.less(pc.field("content_id"), "c00030"))
    names, x = table.column("content_id").to_pylist(), vectors_of(table, "embedding")
    want = {}
    for shard in range(2):
        index = faiss.read_index(os.path.join(ivf, shard_file(shard)))
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 2)
        scores, ids = index.search(np.ascontiguousarray(x), 5)
        want.update(
            {
                (names[q], shard, int(i)): float(sc)
                for q in range(len(x))
                for sc, i in zip(scores[q], ids[q], strict=True)
                if i >= 0
            }
        )
    assert got.keys() == want.keys() and len(got) == 30 * 2 * 5
    np.testing.assert_allclose([got[key] for key in want], list(want.values()), atol=1e-5)


def test_index_operation_shards_and_check(spark, features, tmp_path):
    op = OPERATIONS["index"]
    res = op(
        spark,
        features=features,
        out=str(tmp_path / "op"),
        shards="2",
        kind="flat",
        check=True,
        check_queries=20,
    )
    assert res["shards"] == 2 and res["check"]["recall@10"] == 1.0
    for bad, field in (({"shards": "0"}, "shards"), ({"shards": "2", "codes": True}, "shards")):
        with pytest.raises(ParamError, match=field):
            op.validate({"features": features, "out": str(tmp_path / "x"), **bad})


def test_dedup_with_shards_finds_the_same_groups(spark, planted_table, tmp_path):  # noqa: F811
    plain = dedup_table(spark, planted_table, str(tmp_path / "plain"), verify=False)
    sharded = dedup_table(spark, planted_table, str(tmp_path / "sharded"), verify=False, shards=2)
    groups = {
        name: sorted(map(sorted, _groups(tmp_path / name / "groups.parquet")))
        for name in ("plain", "sharded")
    }
    assert groups["plain"] == groups["sharded"] and sharded["near_groups"] == plain["near_groups"] == 4
    assert sharded["index"] == "flat"


def _groups(path) -> list[set[str]]:
    by: dict[int, set[str]] = {}
    for g in pq.read_table(str(path)).to_pylist():
        by.setdefault(g["group_id"], set()).add(g["path"])
    return list(by.values())
