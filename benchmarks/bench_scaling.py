"""How images/s grows with cores and executors, and what stays serial (issue 22, deliverable 4).

    .venv/bin/python benchmarks/bench_scaling.py [--table data/fashion-mnist] [--files 4000] [--rounds 2]

``predict`` and ``embed`` over the table (Parquet in, Parquet out) and ``ingest`` of a generated
folder of small JPEG and PNG files (``bench_ingest.generate_folder``), each through the Python API
on these masters, one child process per figure, masters alternating each round. The JVM's start,
executor registration and a first run of the same operation on a small input (1,000 rows, 100
files: JIT and Catalyst warm-up, ~20 s for a cold ingest) are not timed:

- ``local[1]``: one task slot in the driver's JVM;
- ``local[2]``: two task slots in the driver's JVM;
- ``local-cluster[1,1,2048]``: one executor JVM of one core beside the driver;
- ``local-cluster[2,1,2048]``: two executor JVMs of one core each.

Each figure records the operation's wall time and the driver's share of it: the time the driver
spent outside any Spark job (reading metadata, planning, py4j, committing, the summary's
bookkeeping), taken from a ``SparkListener``-free measure: the wall time minus the union of the
jobs' spans from the status tracker. That share does not shrink with more executors; Amdahl's law
over it (``1 / (serial + (1 - serial) / n)``) bounds what 100 executors can give. Results:
benchmarks/results/scaling.json and scaling.md (``--name`` names them otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MASTERS = ["local[1]", "local[2]", "local-cluster[1,1,2048]", "local-cluster[2,1,2048]"]
SLOTS = {"local[1]": 1, "local[2]": 2, "local-cluster[1,1,2048]": 1, "local-cluster[2,1,2048]": 2}


def child(master: str, task: str, data: str, warm: str, model: str, out: str) -> dict[str, Any]:
    sys.path[:0] = [str(ROOT), str(HERE)]
    from profile_paths import SparkRest, spark_time

    from sparkvision.data.ingest import ingest
    from sparkvision.inference.embed import embed_table
    from sparkvision.inference.predict import predict_table
    from sparkvision.spark.session import get_spark

    # The status REST API gives each job's span (the UI is on for this measurement only).
    spark = get_spark(master, conf={"spark.ui.enabled": "true", "spark.ui.showConsoleProgress": "false"})
    sc = spark.sparkContext  # a benchmark's own process: the JVM's executor count, not driver code
    want = 0 if master.startswith("local[") else int(master.split("[")[1].split(",")[0])
    deadline = time.time() + 120
    while sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < want and time.time() < deadline:
        time.sleep(0.5)  # executors register asynchronously
    spark.range(100).repartition(SLOTS[master]).count()  # every slot's JVM side up before timing

    def op(source: str, dest: str) -> int:
        if task == "ingest":
            s = ingest(spark, source, dest, mode="overwrite")
            return s.rows_written + sum(s.rejects_by_reason.values())
        if task == "predict":
            return int(predict_table(spark, model, source, dest)["rows"])
        return int(embed_table(spark, model, source, dest)["rows"])

    op(warm, out + "-warm")  # the same operation on a small input first: JIT and Catalyst warm
    rest = SparkRest(spark)
    last = rest.last_job()
    t0 = time.perf_counter()
    rows = op(data, out)
    wall = time.perf_counter() - t0
    spans = [
        (spark_time(j.get("submissionTime")), spark_time(j.get("completionTime")))
        for j in rest.jobs_after(last)
    ]
    covered, end = 0.0, 0.0
    for a, b in sorted(spans):  # the union of the jobs' spans
        a = max(a, end)
        if b > a:
            covered += b - a
            end = b
    spark.stop()
    return {
        "rows": rows,
        "seconds": round(wall, 3),
        "in_jobs_s": round(min(covered, wall), 3),
        "jobs": len(spans),
    }


def one(master: str, task: str, data: str, warm: str, model: str, work: Path, timeout: int) -> dict[str, Any]:
    out = work / f"{task}-{time.monotonic_ns()}"
    cmd = [sys.executable, __file__, "--child", master, "--task", task, "--data", data, "--model", model]
    cmd += ["--warm", warm]
    cmd += ["--out", str(out)]
    row: dict[str, Any] = {"master": master, "task": task, "load_before": round(os.getloadavg()[0], 2)}
    env = {**os.environ, "SPARKVISION_PROGRESS": "0"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    row["load_after"] = round(os.getloadavg()[0], 2)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}-warm", ignore_errors=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        row["error"] = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return row
    res = json.loads(lines[-1])
    row.update(res, images_per_s=round(res["rows"] / res["seconds"], 1))
    row["serial_share"] = round(1 - res["in_jobs_s"] / res["seconds"], 3)
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in sorted({r["task"] for r in rows}):
        per: dict[str, Any] = {}
        for m in MASTERS:
            got = [r for r in rows if r["task"] == task and r["master"] == m and "images_per_s" in r]
            if got:
                per[m] = {
                    "images_per_s": round(statistics.median(r["images_per_s"] for r in got), 1),
                    "serial_share": round(statistics.median(r["serial_share"] for r in got), 3),
                }
        base = per.get("local[1]", {}).get("images_per_s")
        for v in per.values():
            if base:
                v["speedup_vs_local1"] = round(v["images_per_s"] / base, 2)
        serial = per.get("local-cluster[2,1,2048]", per.get("local[2]", {})).get("serial_share")
        if serial is not None:
            # Amdahl over the driver's share: what 100 executors could give at most.
            per["amdahl_100_executors"] = round(1 / (serial + (1 - serial) / 100), 1)
        out[task] = per
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Scaling: images/s against task slots and executors",
        "",
        f"`benchmarks/bench_scaling.py`, {res['created']}, {res['cores']} cores, {res['rows']} table rows, "
        f"{res['files']} generated files for ingest, {res['n_rounds']} rounds (masters alternating). "
        "`serial` is the share of the operation's wall time the driver spent outside every Spark job.",
        "",
        "| round | task | master | img/s | s | in jobs s | serial | load |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in res["rounds"]:
        if "images_per_s" in r:
            lines.append(
                f"| {r['round']} | {r['task']} | {r['master']} | {r['images_per_s']:,} | {r['seconds']} | "
                f"{r['in_jobs_s']} | {r['serial_share']} | {r['load_before']} -> {r['load_after']} |"
            )
        else:
            lines.append(
                f"| {r['round']} | {r['task']} | {r['master']} | failed: {r['error'][:80]} | | | | |"
            )
    for task, per in res["summary"].items():
        lines += ["", f"**{task}** (medians)", ""]
        for m in MASTERS:
            if m in per:
                v = per[m]
                lines.append(
                    f"- {m}: {v['images_per_s']:,} img/s, x{v.get('speedup_vs_local1', '-')} over local[1], "
                    f"serial share {v['serial_share']}"
                )
        if "amdahl_100_executors" in per:
            lines.append(
                f"- Amdahl bound at 100 executors from that serial share: x{per['amdahl_100_executors']}"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--tasks", default="predict,embed,ingest")
    ap.add_argument("--masters", default=";".join(MASTERS), help="separated by ;")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--name", default="scaling", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--warm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.task, args.data, args.warm, args.model, args.out)))
        return
    sys.path[:0] = [str(ROOT), str(HERE), str(HERE / "peers")]
    import pyarrow.parquet as pq
    from bench_ingest import generate_folder
    from bench_peers import sample_table
    from contenders import untrained_cnn

    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    masters = args.masters.split(";")
    tasks = args.tasks.split(",")
    rows: list[dict[str, Any]] = []
    try:
        model = untrained_cnn(str(work / "cnn"))
        warm_table = sample_table(args.table, 1000, work / "warm-table")
        if "ingest" in tasks:
            generate_folder(work / "folder", args.files)
            generate_folder(work / "warm-folder", 100, seed=1)
        for r in range(args.rounds):
            order = masters[r % len(masters) :] + masters[: r % len(masters)]
            for task in tasks:
                for m in order:
                    data = str(work / "folder") if task == "ingest" else args.table
                    warm = str(work / "warm-folder") if task == "ingest" else warm_table
                    row = one(m, task, data, warm, model, work, args.timeout)
                    row["round"] = r + 1
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        n_rows = pq.ParquetDataset(args.table).read(columns=["content_id"]).num_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "rows": n_rows,
        "files": args.files,
        "n_rounds": args.rounds,
        "rounds": rows,
        "summary": summarise(rows),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
