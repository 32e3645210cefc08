"""sparkvision against the peers a user would pick, side by side (issue 22, deliverable 3).

    .venv/bin/pip install -e '.[bench]'        # daft, ray[data]: never runtime dependencies
    .venv/bin/python benchmarks/peers/bench_peers.py [--rows 70000] [--files 10000] [--rounds 2]

Predict and embed: Parquet in (the Fashion-MNIST table), Parquet out, the same ``cnn`` weights
and preprocessing (the model directory's mean and std) for every contender:

- ``sparkvision``: ``predict_table`` / ``embed_table`` on ``local[2]``;
- ``spark_predict_batch_udf``: Spark's own ``pyspark.ml.functions.predict_batch_udf`` over the
  image bytes (PIL decode inside the predict function), ``local[2]``;
- ``daft``: ``read_parquet`` -> Daft's native ``image.decode`` -> a UDF class -> ``write_parquet``;
- ``ray_data``: ``read_parquet`` -> ``map_batches`` (a class, two actors) -> ``write_parquet``;
- ``plain_loop``: one process, pyarrow batches, PIL decode, the eager model on all cores.

Ingest of a generated folder of small JPEG and PNG files (``benchmarks/bench_ingest.py``'s):
``sparkvision`` (``ingest``), ``spark_binaryfile_udf`` (``binaryFile`` plus a pandas UDF that
checks each file with PIL and hashes it, written as Parquet), ``plain_loop`` (read, hash, PIL
check, one Parquet file).

Every contender runs in a process of its own (the engine's start is not timed), in alternating
rounds (the order rotates each round), and each figure is saved with the load average before and
after it. A contender that is not installed is skipped with one line saying so. Results:
benchmarks/results/peers.json and peers.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = ROOT / "benchmarks" / "results"

CONTENDERS = {
    "predict": ["sparkvision", "spark_predict_batch_udf", "daft", "ray_data", "plain_loop"],
    "embed": ["sparkvision", "spark_predict_batch_udf", "daft", "ray_data", "plain_loop"],
    "ingest": ["sparkvision", "spark_binaryfile_udf", "plain_loop"],
}
NEEDS = {"daft": "daft", "ray_data": "ray"}  # contender -> module that must be importable
TARGETS = {  # sparkvision's images/s over the contender's, per task
    "predict": {"daft": 1.2, "spark_predict_batch_udf": 2.0},
    "embed": {"daft": 1.2, "spark_predict_batch_udf": 2.0},
    "ingest": {"plain_loop": 0.5, "spark_binaryfile_udf": 3.0},
}


def missing(contender: str) -> str | None:
    mod = NEEDS.get(contender)
    if mod and importlib.util.find_spec(mod) is None:
        return f"{contender}: skipped, {mod} is not installed (pip install -e '.[bench]')"
    return None


def sample_table(table: str, rows: int | None, out: Path) -> str:
    """The table itself, or its first ``rows`` rows as three Parquet files (pyarrow, no Spark)."""
    if not rows:
        return table
    import pyarrow.parquet as pq

    t = pq.ParquetDataset(table).read().slice(0, rows)
    out.mkdir(parents=True)
    step = -(-t.num_rows // 3)
    for i in range(3):
        pq.write_table(t.slice(i * step, step), out / f"part-{i:05d}.parquet", compression="zstd")
    shutil.copy(os.path.join(table, "_sparkvision.json"), out / "_sparkvision.json")
    return str(out)


def one_round(args: argparse.Namespace, task: str, contender: str, data: str, model: str, work: Path) -> dict:
    """Run one contender in a child process; its figure and the load average around it."""
    out = work / f"{task}-{contender}-{time.monotonic_ns()}"
    cmd = [sys.executable, __file__, "--child", contender, "--task", task, "--data", data]
    cmd += ["--model", model, "--out", str(out), "--batch", str(args.batch)]
    load0 = os.getloadavg()[0]
    row: dict[str, Any] = {"task": task, "contender": contender, "load_before": round(load0, 2)}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        row.update(load_after=round(os.getloadavg()[0], 2), error=f"timed out after {args.timeout} s")
        return row
    row["load_after"] = round(os.getloadavg()[0], 2)
    shutil.rmtree(out, ignore_errors=True)
    last = p.stdout.strip().splitlines()[-1:] if p.returncode == 0 else []
    if not last or not last[0].startswith("{"):
        lines = p.stderr.strip().splitlines() or ["no output"]
        raised = [x for x in lines if re.match(r"^[\w.]*(Error|Exception)\b", x)]  # Python's own line
        row["error"] = (raised or lines)[-1][:300]
        log = Path(tempfile.gettempdir()) / f"bench-peers-{task}-{contender}.stderr.txt"
        log.write_text(p.stderr)
        row["stderr"] = str(log)
        return row
    res = json.loads(last[0])
    row.update(res, images_per_s=round(res["rows"] / res["seconds"], 1))
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median images/s per task and contender, sparkvision's ratios against the targets."""
    out: dict[str, Any] = {}
    for task in CONTENDERS:
        figs: dict[str, list[float]] = {}
        for r in rows:
            if r["task"] == task and "images_per_s" in r:
                figs.setdefault(r["contender"], []).append(r["images_per_s"])
        if not figs:
            continue
        med = {c: round(statistics.median(v), 1) for c, v in figs.items()}
        entry: dict[str, Any] = {"median_images_per_s": med, "ratios": {}}
        sv = med.get("sparkvision")
        for peer, target in TARGETS[task].items():
            if sv and peer in med:
                ratio = round(sv / med[peer], 3)
                entry["ratios"][f"sparkvision/{peer}"] = {
                    "ratio": ratio,
                    "target": target,
                    "met": ratio >= target,
                }
        if task == "ingest" and sv and "plain_loop" in med:
            cores = os.cpu_count() or 1  # core time sparkvision spends per file beyond the plain loop's work
            entry["overhead_ms_per_file"] = round((cores / sv - 1 / med["plain_loop"]) * 1e3, 3)
            entry["overhead_target_ms"] = 0.3
        out[task] = entry
    return out


def write_md(res: dict[str, Any]) -> str:
    lines = [
        "# sparkvision against its peers",
        "",
        f"`benchmarks/peers/bench_peers.py`, {res['created']}, {res['cores']} cores, {res['rows']} table rows, "
        f"{res['files']} files for ingest, {res['n_rounds']} alternating rounds; each contender in its own "
        "process, the engine's start not timed. Load average (1 min) before -> after each figure; "
        "`run` is when the row's run started (a run of some tasks keeps the others' rows).",
        "",
    ]
    lines += [f"- {s}" for s in res["skipped"]]
    lines += ["", "| run | round | task | contender | img/s | s | load |", "|---|---:|---|---|---:|---:|---|"]
    for r in res["rounds"]:
        fig = f"{r['images_per_s']:,}" if "images_per_s" in r else f"failed: {r.get('error', '')[:80]}"
        secs = r.get("seconds", "")
        lines.append(
            f"| {r.get('run', '')} | {r['round']} | {r['task']} | {r['contender']} | {fig} | {secs} | {r['load_before']} -> {r['load_after']} |"
        )
    for task, s in res["summary"].items():
        lines += [
            "",
            f"**{task}** medians: " + ", ".join(f"{c} {v:,}" for c, v in s["median_images_per_s"].items()),
        ]
        for k, v in s["ratios"].items():
            lines.append(f"- {k}: {v['ratio']} (target {v['target']}: {'met' if v['met'] else 'MISSED'})")
        if "overhead_ms_per_file" in s:
            lines.append(
                f"- overhead per file: {s['overhead_ms_per_file']} ms (target < {s['overhead_target_ms']})"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(ROOT / "data" / "fashion-mnist"))
    ap.add_argument("--rows", type=int, default=None, help="the table's first ROWS rows only")
    ap.add_argument("--files", type=int, default=10_000, help="generated files for ingest")
    ap.add_argument("--model", default=None, help="model directory (default: an untrained cnn)")
    ap.add_argument("--tasks", default="predict,embed,ingest")
    ap.add_argument("--contenders", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one contender may take")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path[:0] = [str(ROOT), str(HERE), str(ROOT / "benchmarks")]
        from contenders import run_contender

        print(json.dumps(run_contender(args.child, args.task, args.data, args.model, args.out, args.batch)))
        return
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import pyarrow.parquet as pq
    from bench_ingest import generate_folder
    from contenders import untrained_cnn

    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        table = sample_table(args.table, args.rows, work / "table")
        model = args.model or untrained_cnn(str(work / "cnn"))
        tasks = args.tasks.split(",")
        folder = work / "folder"
        if "ingest" in tasks:
            generate_folder(folder, args.files)
        wanted = set(args.contenders.split(",")) if args.contenders else None
        skipped = sorted({m for t in tasks for c in CONTENDERS[t] if (m := missing(c))})
        for s in skipped:
            print(s, flush=True)
        rows: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for task in tasks:
                names = [c for c in CONTENDERS[task] if not missing(c) and (wanted is None or c in wanted)]
                names = names[r % len(names) :] + names[: r % len(names)] if names else names
                for c in names:
                    data = str(folder) if task == "ingest" else table
                    row = one_round(args, task, c, data, model, work)
                    row["round"] = r + 1
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        n_rows = pq.ParquetDataset(table).read(columns=["content_id"]).num_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    created = time.strftime("%Y-%m-%d %H:%M")
    for row in rows:
        row["run"] = created
    # A run of some tasks (--tasks) keeps the other tasks' rows from the last results file, so
    # that predict/embed and ingest can be measured in separate quiet windows; each row says
    # which run it came from.
    old_file = args.results / "peers.json"
    if old_file.exists() and set(tasks) != set(CONTENDERS):
        kept = [r for r in json.loads(old_file.read_text())["rounds"] if r["task"] not in tasks]
        rows = kept + rows
    res = {
        "created": created,
        "cores": os.cpu_count(),
        "rows": n_rows,
        "files": args.files,
        "n_rounds": args.rounds,
        "skipped": skipped,
        "rounds": rows,
        "summary": summarise(rows),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "peers.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.results / "peers.md").write_text(write_md(res))
    print(write_md(res))


if __name__ == "__main__":
    main()
