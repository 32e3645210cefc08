"""Sharded index benchmark (issue 24): 10M synthetic 128-d vectors built and searched on the executors.

The vectors are ``bench_search.synthetic``'s clustered embeddings (a 32-d mixture of 1,000
Gaussians mapped to 128-d, plus noise, L2-normalised), written as Parquet in chunks of 100,000
rows so the benchmark itself never holds the table. Then, through the real path:

* ``build_sharded_index`` (``--shards auto``: as many shards as fit ``--shard-memory-mb`` per
  task): train once on a sample in one task, fill the shards in parallel tasks;
* ``search_df`` over a table of ``--batch-queries`` held-out queries (one (shard, query batch)
  pair per task, merged by Spark), timed end to end for queries/s, at each ``--nprobes``;
* recall@10 of the first ``--truth-queries`` (1,000) of them against an exact scan, computed here
  chunk by chunk while the table is written;
* peak RSS of any task: each build and search task reports its own ``ru_maxrss``, and Python
  workers are not reused (``spark.python.worker.reuse=false``), so that is one task's peak.

Targets: recall@10 >= 0.90 at >= 1,000 batch queries/s; peak RSS per task <= 2 GB while the
whole index is larger than that.

    nice .venv/bin/python benchmarks/bench_shards.py [--vectors 10000000] [--shards auto]
    nice .venv/bin/python benchmarks/bench_shards.py --vectors 20000 --batch-queries 2000 --smoke

Results: benchmarks/results/shards.json and .md (``--smoke`` writes shards_smoke.*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import faiss  # noqa: E402
from bench_search import synthetic  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from sparkvision.retrieval.search import search_df  # noqa: E402
from sparkvision.retrieval.shard_build import build_sharded_index  # noqa: E402
from sparkvision.retrieval.shard_search import shard_candidates, with_qid  # noqa: E402
from sparkvision.retrieval.shards import merge_topk  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402

CHUNK = 100_000


def table(x: np.ndarray, start: int) -> pa.Table:
    d = x.shape[1]
    emb = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (len(x) + 1) * d, d), pa.int32()), pa.array(x.ravel(), pa.float32())
    )
    ids = pa.array([f"{i:09d}" for i in range(start, start + len(x))])
    return pa.table({"content_id": ids, "path": ids, "embedding": emb})


def write_and_truth(root: str, n: int, d: int, truth_q: np.ndarray, k: int) -> np.ndarray:
    """Writes the table in chunks and returns the exact top-k rows of ``truth_q`` over it."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    best_s = np.full((len(truth_q), k), np.nan, np.float32)
    best_i = np.full((len(truth_q), k), -1, np.int64)
    for c, start in enumerate(range(0, n, CHUNK)):
        x = synthetic(min(CHUNK, n - start), d, "clustered", seed=1000 + c)
        pq.write_table(table(x, start), os.path.join(root, f"part-{c:05d}.parquet"))
        flat = faiss.IndexFlatIP(d)
        flat.add(x)
        s, i = flat.search(truth_q, k)
        best_s, best_i = merge_topk([best_s, s], [best_i, np.where(i >= 0, i + start, -1)], k)
    return best_i


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vectors", type=int, default=10_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--batch-queries", type=int, default=10_000)
    ap.add_argument("--truth-queries", type=int, default=1_000)
    ap.add_argument("--shards", default="auto")
    ap.add_argument("--shard-memory-mb", type=int, default=1024)
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--nprobes", default="", help="comma-separated; default: the index's, 2x and 4x")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "shards"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--smoke", action="store_true", help="write shards_smoke.* (a small run)")
    args = ap.parse_args()
    k = 10
    t_all = time.perf_counter()
    features = os.path.join(args.out, "features")
    queries_dir = os.path.join(args.out, "queries")
    q = synthetic(args.batch_queries, args.d, "clustered", seed=1)
    nt = min(args.truth_queries, len(q))
    t0 = time.perf_counter()
    truth = write_and_truth(features, args.vectors, args.d, q[:nt], k)
    shutil.rmtree(queries_dir, ignore_errors=True)
    os.makedirs(queries_dir)
    qnames = pa.array([f"q{i:07d}" for i in range(len(q))])
    pq.write_table(
        table(q, 0).set_column(0, "content_id", qnames).set_column(1, "path", qnames),
        os.path.join(queries_dir, "part-0.parquet"),
    )
    print(f"data + exact top-{k} of {nt} queries: {time.perf_counter() - t0:.0f} s", flush=True)

    spark = get_spark(
        args.master,
        {
            "spark.python.worker.reuse": "false",
            "spark.sql.shuffle.partitions": "8",
            "spark.driver.memory": "4g",
        },
    )
    index = os.path.join(args.out, "index")
    shutil.rmtree(index, ignore_errors=True)
    summary = build_sharded_index(
        spark,
        features,
        index,
        shards=int(args.shards) if args.shards != "auto" else "auto",
        kind=args.kind,
        shard_memory_mb=args.shard_memory_mb,
    )
    print(
        f"built {summary['shards']} x {summary['factory']} in {summary['build_s']:.0f} s, "
        f"{summary['index_bytes'] / 2**30:.2f} GiB, peak task RSS {summary['max_task_rss_mb']:.0f} MB",
        flush=True,
    )

    base = summary["params"].get("nprobe")
    nlist = summary["params"].get("nlist", 0)
    if args.nprobes:
        sweep: list[int | None] = [int(v) for v in args.nprobes.split(",")]
    else:
        sweep = sorted({min(base * f, nlist) for f in (1, 2, 4)}) if base else [None]
    queries = spark.read.parquet(queries_dir)
    truth_ids = [[f"{i:09d}" for i in row if i >= 0] for row in truth]
    rows = []
    for nprobe in sweep:
        res_dir = os.path.join(args.out, f"result-{nprobe}")
        t1 = time.perf_counter()
        search_df(spark, index, queries, k, nprobe).write.mode("overwrite").parquet(res_dir)
        seconds = time.perf_counter() - t1
        found: dict[str, list[str]] = {}
        want = {f"q{i:07d}" for i in range(nt)}
        for r in pq.read_table(res_dir, columns=["query_content_id", "content_id", "rank"]).to_pylist():
            if r["query_content_id"] in want and r["rank"] is not None:
                found.setdefault(r["query_content_id"], []).append(r["content_id"])
        recall = float(
            np.mean([len(set(found.get(f"q{i:07d}", [])) & set(t)) / k for i, t in enumerate(truth_ids)])
        )
        rows.append(
            {"nprobe": nprobe, "recall@10": round(recall, 4), "queries_per_s": round(len(q) / seconds, 1)}
        )
        print(f"nprobe {nprobe}: recall@10 {recall:.4f}, {len(q) / seconds:,.0f} q/s", flush=True)

    # one more pass over the candidates alone: the tasks' own peak RSS and shards per task
    cands = shard_candidates(spark, index, with_qid(queries), k, rows[-1]["nprobe"])
    per_task = (
        cands.groupBy("task")
        .agg(F.countDistinct("shard").alias("shards"), F.max("max_rss_mb").alias("rss"))
        .collect()
    )
    search_rss = max(r.rss for r in per_task)
    one_shard = max(r.shards for r in per_task) == 1

    ok = [r for r in rows if r["recall@10"] >= 0.90 and r["queries_per_s"] >= 1000]
    peak = max(search_rss, summary["max_task_rss_mb"])
    result = {
        "benchmark": f"sharded index, {args.vectors:,} synthetic {args.d}-d clustered vectors, "
        f"{len(q):,} batch queries, recall on {nt:,}, k={k}",
        "index": summary,
        "sweep": rows,
        "best_meeting_target": max(ok, key=lambda r: r["queries_per_s"]) if ok else None,
        "peak_task_rss_mb": {"build": summary["max_task_rss_mb"], "search": search_rss},
        "one_shard_per_task": one_shard,
        "index_larger_than_2gb": summary["index_bytes"] > 2 << 30,
        "target_met": bool(ok) and peak <= 2048 and summary["index_bytes"] > 2 << 30,
        "master": args.master,
        "cpus": os.cpu_count(),
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    name = "shards_smoke" if args.smoke else "shards"
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"# {result['benchmark']}",
        "",
        f"Index: {summary['shards']} shards of `{summary['factory']}` ({summary['explain']}), "
        f"{summary['index_bytes'] / 2**30:.2f} GiB, built in {summary['build_s']:.0f} s on `{args.master}`.",
        f"Peak RSS of any task: build {summary['max_task_rss_mb']:.0f} MB, search {search_rss:.0f} MB; "
        f"one shard per task: {one_shard}.",
        "",
        "| nprobe | recall@10 | batch queries/s |",
        "|---:|---:|---:|",
        *(f"| {r['nprobe']} | {r['recall@10']:.4f} | {r['queries_per_s']:,.0f} |" for r in rows),
        "",
        "Targets (recall@10 >= 0.90 at >= 1,000 q/s; task RSS <= 2 GB with an index > 2 GB): "
        + ("met." if result["target_met"] else "missed."),
    ]
    with open(os.path.join(args.results, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps({key: result[key] for key in ("target_met", "best_meeting_target", "total_s")}))


if __name__ == "__main__":
    main()
