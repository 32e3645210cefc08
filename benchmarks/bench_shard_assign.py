"""What finding each query's IVF lists once saves in sharded batch search (issue 24).

Runs on the index and queries ``bench_shards.py`` left in ``--out``: the same batch search
(candidates per shard, merged by Spark, written as Parquet) with the coarse assignment done once
per query before the shards (``preassign``, the default) and with every shard task searching its
shard whole (the quantizer search repeated in each of the N shards), alternating, at one nprobe.
The two must return the same hits (checked here on every query); queries/s and the search tasks'
peak RSS go to ``benchmarks/results/shards_assign.json`` and ``.md``.

    setsid nohup .venv/bin/python benchmarks/bench_shard_assign.py --nprobe 8 &
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pyspark.sql import functions as F  # noqa: E402

from sparkvision.retrieval.shard_search import merge_topk_df, shard_candidates, with_qid  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "out", "shards"))
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    k = 10
    spark = get_spark(
        args.master, {"spark.python.worker.reuse": "false", "spark.sql.shuffle.partitions": "8"}
    )
    index = os.path.join(args.out, "index")
    queries = with_qid(spark.read.parquet(os.path.join(args.out, "queries")))
    nq = queries.count()
    meta = json.load(open(os.path.join(index, "index.json")))
    rows, hits = [], {}
    for r in range(args.rounds):
        for pre in (True, False) if r % 2 == 0 else (False, True):
            res = os.path.join(args.out, f"assign-{pre}")
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            cands = shard_candidates(spark, index, queries, k, args.nprobe, nq, preassign=pre)
            merge_topk_df(cands.drop("task", "max_rss_mb"), k).write.mode("overwrite").parquet(res)
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "preassign": pre,
                    "seconds": round(seconds, 1),
                    "queries_per_s": round(nq / seconds, 1),
                    "load": [round(load, 1), round(os.getloadavg()[0], 1)],
                }
            )
            print(rows[-1], flush=True)
            t = pq.read_table(res, columns=["qid", "id"]).sort_by([("qid", "ascending"), ("id", "ascending")])
            hits[pre] = (t.column("qid").to_numpy(), t.column("id").to_numpy())
    same = all((a == b).all() for a, b in zip(hits[True], hits[False], strict=True))
    per_task = (
        shard_candidates(spark, index, queries, k, args.nprobe, nq)
        .groupBy("task")
        .agg(F.countDistinct("shard").alias("shards"), F.max("max_rss_mb").alias("rss"))
        .collect()
    )
    best = {p: min(r["seconds"] for r in rows if r["preassign"] == p) for p in (True, False)}
    result = {
        "benchmark": f"sharded batch search, {meta['rows']:,} vectors in {len(meta['shards'])} shards of "
        f"{meta['choice']['factory']}, {nq:,} queries, k={k}, nprobe {args.nprobe}, {args.master}",
        "rounds": rows,
        "queries_per_s": {
            "preassign": round(nq / best[True], 1),
            "per_shard_quantizer": round(nq / best[False], 1),
        },
        "speedup": round(best[False] / best[True], 2),
        "same_hits": bool(same),
        "search_task_peak_rss_mb": max(r.rss for r in per_task),
        "one_shard_per_task": max(r.shards for r in per_task) == 1,
    }
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "shards_assign.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"# {result['benchmark']}",
        "",
        "| coarse assignment | queries/s (best round) |",
        "|---|---:|",
        f"| once per query, before the shards (default) | {result['queries_per_s']['preassign']:,.0f} |",
        f"| in every shard task | {result['queries_per_s']['per_shard_quantizer']:,.0f} |",
        "",
        f"Speed-up {result['speedup']}x; the same hits for every query: {same}. Search tasks' peak RSS "
        f"{result['search_task_peak_rss_mb']:.0f} MB; one shard per task: {result['one_shard_per_task']}.",
        "Rounds (seconds, load before/after): "
        + "; ".join(f"{'pre' if r['preassign'] else 'per-shard'} {r['seconds']} s {r['load']}" for r in rows),
    ]
    with open(os.path.join(args.results, "shards_assign.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
