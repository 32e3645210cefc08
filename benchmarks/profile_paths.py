"""Where predict, embed and ingest spend their time, end to end (issue 22, deliverable 1).

    .venv/bin/python benchmarks/profile_paths.py [--rows 10000] [--files 2000] [--py-spy]

Three sources, each a real measurement of the same run:

- **Spark's own metrics** from the status REST API of this session (jobs, stages, every task:
  run time, deserialisation, scheduler delay, GC, bytes in and out): which jobs an operation
  runs, how long each holds the driver, and how much of the slots' time no task used.
- **The task clock** (:mod:`sparkvision.spark.taskclock`, on for these runs only through
  ``SPARKVISION_TASK_CLOCK``): each task of the model's (or the decoder's) stage splits its Python
  time into waiting for input (JVM -> Arrow -> Python), rebatching, decode and preprocessing, the
  model, the output columns, and waiting for the consumer (Python -> Arrow -> JVM -> Parquet).
- **In-process timings** of the same functions on the same rows, one thread, no Spark: they
  split the task clock's ``preprocess`` into decode and normalisation, and ingest's ``decode``
  into the image check and the content hash.

``--py-spy`` also samples the driver and every Python worker with py-spy (when installed) and
counts samples per function family. Results: benchmarks/results/profile.json and profile.md.
On a shared machine the figures are indicative: the load average is saved beside each.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_ingest import generate_folder  # noqa: E402

from sparkvision.data.images import content_id, inspect_image  # noqa: E402
from sparkvision.data.ingest import ingest  # noqa: E402
from sparkvision.inference import predict as predict_module  # noqa: E402
from sparkvision.inference import runtime  # noqa: E402
from sparkvision.inference.embed import embed_table  # noqa: E402
from sparkvision.inference.predict import predict_columns, predict_table  # noqa: E402
from sparkvision.inference.runtime import KEEP_COLUMNS, optimize_for_cpu_inference, run_model  # noqa: E402
from sparkvision.models import create_model  # noqa: E402
from sparkvision.models.modeldir import ModelSpec, Preprocess, load_model_dir, save_model_dir  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402
from sparkvision.spark.taskclock import CLOCK_ENV  # noqa: E402
from sparkvision.transforms.preprocess import normalize, preprocess_batch, to_unit  # noqa: E402

RESULTS = HERE / "results"
SPY_FAMILIES = [  # (family, substrings of a frame), the first match from the leaf up wins
    ("decode (PIL)", ("PIL/", "decode_image", "open_image", "inspect_image", "to_8bit")),
    ("hash", ("content_id", "sha256")),
    ("model (torch)", ("run_model", "torch/", "forward")),
    ("arrow", ("pyarrow/", "to_pylist", "from_pydict", "rows_column", "predict_columns")),
    ("arrow stream (pyspark serializers)", ("serializers.py", "sql/pandas/")),
    ("worker idle / socket", ("daemon.py", "worker.py", "socket")),
    ("py4j / driver wait", ("py4j/",)),
]


def spark_time(s: str | None) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%f%Z").timestamp() if s else 0.0


class SparkRest:
    """This session's status REST API (``spark.ui.enabled`` is on for the profile only)."""

    def __init__(self, spark: Any) -> None:
        self.base = f"{spark.sparkContext.uiWebUrl}/api/v1/applications/{spark.sparkContext.applicationId}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=180) as r:  # the first call starts Jersey
            return json.load(r)

    def last_job(self) -> int:
        jobs = self.get("/jobs")
        return max((j["jobId"] for j in jobs), default=-1)

    def jobs_after(self, job_id: int) -> list[dict[str, Any]]:
        for _ in range(50):  # the status store is filled by the listener bus, a little later
            jobs = [j for j in self.get("/jobs") if j["jobId"] > job_id]
            if all(j["status"] != "RUNNING" and j.get("completionTime") for j in jobs):
                return sorted(jobs, key=lambda j: j["jobId"])
            time.sleep(0.2)
        return sorted(jobs, key=lambda j: j["jobId"])

    def stage(self, stage_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        attempts = self.get(f"/stages/{stage_id}")
        st = max(attempts, key=lambda a: a["attemptId"])
        tasks = self.get(f"/stages/{stage_id}/{st['attemptId']}/taskList?length=100000")
        return st, tasks


def tree_cpu_s(root: int) -> Counter[str]:
    """CPU seconds (user + system) of ``root`` and every process under it, exited ones included
    (their time is in their parent's), by kind: this driver, the JVM, the Python workers. Unlike
    wall time it hardly moves when other work shares the machine."""
    procs: dict[int, tuple[int, int, str]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                text = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            f = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on
            procs[int(d)] = (int(f[1]), sum(int(x) for x in f[11:15]), name)  # utime stime cutime cstime
    out: Counter[str] = Counter()
    todo = [root]
    while todo:
        pid = todo.pop()
        _, ticks, name = procs.get(pid, (0, 0, ""))
        kind = "driver" if pid == root else "JVM" if name == "java" else "Python workers"
        out[kind] += ticks / os.sysconf("SC_CLK_TCK")
        todo += [c for c, (ppid, _, _) in procs.items() if ppid == pid]
    return out


def profile_op(spark: Any, rest: SparkRest, name: str, fn: Any, clock_dir: Path) -> dict[str, Any]:
    """Run ``fn`` once with the task clock on; its jobs, stages, tasks and clock lines."""
    clock = clock_dir / f"{name}.jsonl"
    clock.unlink(missing_ok=True)
    os.environ[CLOCK_ENV] = str(clock)
    before, load0 = rest.last_job(), os.getloadavg()[0]
    t0, start, cpu0 = time.perf_counter(), time.time(), tree_cpu_s(os.getpid())
    summary = fn()
    wall = time.perf_counter() - t0
    by_kind = tree_cpu_s(os.getpid())
    by_kind.subtract(cpu0)
    cpu = sum(by_kind.values())
    os.environ.pop(CLOCK_ENV)
    lines = [json.loads(x) for x in clock.read_text().splitlines()] if clock.exists() else []
    jobs = []
    for j in rest.jobs_after(before):
        stages = []
        for sid in j["stageIds"]:
            try:
                st, tasks = rest.stage(sid)
            except Exception:  # noqa: BLE001 - a skipped stage (its shuffle output reused) has no data
                continue
            if st["status"] == "SKIPPED":
                continue
            stages.append(stage_summary(st, tasks, [c for c in lines if c["stage_id"] == sid]))
        wall_j = spark_time(j.get("completionTime")) - spark_time(j.get("submissionTime"))
        jobs.append(
            {
                "job": j["jobId"],
                "name": j["name"],
                "wall_s": round(wall_j, 3),
                "start_s": round(spark_time(j.get("submissionTime")) - start, 3),  # from the op's start
                "stages": stages,
            }
        )
    rows = summary.get("rows") or summary["rows_written"] + sum(summary["rejects_by_reason"].values())
    return {
        "op": name,
        "wall_s": round(wall, 3),
        "rows": rows,
        "images_per_s": round(rows / wall, 1),
        "cpu_s": round(cpu, 3),  # all processes of the session: driver, JVM, Python workers
        "cpu_by_process_s": {k: round(v, 3) for k, v in by_kind.items()},
        "images_per_cpu_s": round(rows / max(cpu, 1e-9), 1),
        "python_cpu_s": {k: round(v, 3) for k, v in cpu_stages(lines).items()},
        "load_avg_before": round(load0, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "jobs": jobs,
        "summary": summary,
    }


def cpu_stages(clock: list[dict[str, Any]]) -> Counter[str]:
    """CPU seconds of the clocked bodies per stage, all tasks together."""
    total: Counter[str] = Counter()
    for c in clock:
        total.update(c.get("cpu_stages", {}))
    return total


def stage_summary(
    st: dict[str, Any], tasks: list[dict[str, Any]], clock: list[dict[str, Any]]
) -> dict[str, Any]:
    """One stage: its wall, the slots' time its tasks used and how, and the clock's split of it."""
    m = [t["taskMetrics"] for t in tasks if t.get("taskMetrics")]
    ms = 1e-3
    out: dict[str, Any] = {
        "stage": st["stageId"],
        "name": st["name"],
        "tasks": len(tasks),
        "wall_s": round(spark_time(st.get("completionTime")) - spark_time(st.get("submissionTime")), 3),
        "task_s": round(sum(t.get("duration", 0) for t in tasks) * ms, 3),
        "run_s": round(sum(x["executorRunTime"] for x in m) * ms, 3),
        "cpu_s": round(sum(x["executorCpuTime"] for x in m) * 1e-9, 3),
        "deserialize_s": round(sum(x["executorDeserializeTime"] for x in m) * ms, 3),
        "scheduler_delay_s": round(sum(t.get("schedulerDelay", 0) for t in tasks) * ms, 3),
        "gc_s": round(sum(x["jvmGcTime"] for x in m) * ms, 3),
        "input_bytes": st.get("inputBytes", 0),
        "output_bytes": st.get("outputBytes", 0),
        "shuffle_read_bytes": st.get("shuffleReadBytes", 0),
        "shuffle_write_bytes": st.get("shuffleWriteBytes", 0),
    }
    if clock:
        stages: Counter[str] = Counter()
        for c in clock:
            stages.update(c["stages"])
        out["python_s"] = round(sum(c["wall_s"] for c in clock), 3)
        out["python_stages_s"] = {k: round(v, 3) for k, v in stages.most_common()}
        out["python_rows"] = sum(c["rows"] for c in clock)
    return out


def breakdown(op: dict[str, Any], slots: int, split: dict[str, dict[str, float]]) -> dict[str, float]:
    """The operation's wall time, spread over where it went (seconds of wall; they add up).

    The clocked stage's slot time is divided by the slots (it ran on all of them at once); the
    ``preprocess`` (or ``decode``) share is split by the in-process ratios ``split``.
    """
    parts: Counter[str] = Counter()
    jobs_wall = 0.0
    for j in op["jobs"]:
        jobs_wall += j["wall_s"]
        clocked = [s for s in j["stages"] if "python_stages_s" in s]
        if not clocked:
            parts[f"other Spark jobs ({j['name'].split(' at ')[0]})"] += j["wall_s"]
            continue
        s = clocked[0]
        per = {k: v / slots for k, v in s["python_stages_s"].items()}
        labels = {
            "input": "JVM -> Arrow -> Python (Parquet scan or file reads, Arrow stream)",
            "output": "Python -> Arrow -> JVM -> Parquet or cache (consumer)",
            "rebatch": "rebatch (Arrow concat)",
            "model": "model",
            "columns": "output columns (top-k, vectors, Arrow arrays)",
            "model_load": "model load (per task)",
        }
        for k, v in per.items():
            if k in split:  # preprocess / decode: split by the in-process ratio
                for sub, frac in split[k].items():
                    parts[sub] += v * frac
            else:
                parts[labels.get(k, k)] += v
        jvm_only = max(0.0, s["run_s"] - s["python_s"]) / slots
        parts["JVM only (worker start, Parquet commit, not overlapped)"] += jvm_only
        parts["task launch (deserialize, scheduler delay)"] += (
            s["deserialize_s"] + s["scheduler_delay_s"]
        ) / slots
        used = sum(per.values()) + jvm_only + (s["deserialize_s"] + s["scheduler_delay_s"]) / slots
        parts["idle slots in the stage (uneven tasks, scheduling)"] += max(0.0, s["wall_s"] - used)
        parts["the job's other stages (shuffles, aggregation)"] += max(0.0, j["wall_s"] - s["wall_s"])
    outside = max(0.0, op["wall_s"] - jobs_wall)
    first = min((j["start_s"] for j in op["jobs"]), default=op["wall_s"])
    last = max((j["start_s"] + j["wall_s"] for j in op["jobs"]), default=op["wall_s"])
    before, after = min(outside, max(0.0, first)), max(0.0, op["wall_s"] - last)
    parts["driver before the first job (reading meta, model, listing, planning)"] += before
    parts["driver after the last job (meta, summary)"] += min(after, outside - before)
    parts["driver between jobs (planning, py4j, job submission)"] += max(0.0, outside - before - after)
    return {k: round(v, 3) for k, v in parts.most_common()}


def inference_split(table: str, model_dir: str, n: int = 2048, batch: int = 512) -> dict[str, Any]:
    """Per-image CPU microseconds of each step on one thread, on the table's first ``n`` rows,
    through the functions predict's body calls (the libpng path when the body has it)."""
    torch.set_num_threads(1)
    files = sorted(glob.glob(os.path.join(table, "*.parquet")))
    cols = ["image", *KEEP_COLUMNS]
    rows = pa.concat_tables(pq.read_table(f, columns=cols) for f in files).slice(0, n).combine_chunks()
    lm = load_model_dir(model_dir)
    pre = lm.preprocess
    fn = optimize_for_cpu_inference(lm.model, torch.zeros(8, pre.channels, *pre.size))
    fast = getattr(runtime, "preprocess_arrow", None)  # the body's decoder (fastdecode)
    timing: Counter[str] = Counter()
    for rb in rows.to_batches(batch):
        t = time.process_time()
        if fast is not None:
            x, errors = fast(rb.column("image"), pre)
        else:
            x, errors = preprocess_batch(rb.column("image").to_pylist(), pre)
        t1 = time.process_time()
        x8 = torch.zeros((rb.num_rows, *pre.size, pre.channels), dtype=torch.uint8).permute(0, 3, 1, 2)
        t2 = time.process_time()
        normalize(to_unit(x8), pre.mean, pre.std)
        t3 = time.process_time()
        logits = getattr(runtime, "run_model_in_calls", run_model)(fn, x)  # what the body calls
        t4 = time.process_time()
        predict_columns(rb, logits, errors, 3, lm.class_names)
        t5 = time.process_time()
        timing.update({"preprocess": t1 - t, "normalize": t3 - t2, "model": t4 - t3, "columns": t5 - t4})
    us = {k: round(v / rows.num_rows * 1e6, 2) for k, v in timing.items()}
    decode = max(0.0, us["preprocess"] - us["normalize"])
    return {
        "images": rows.num_rows,
        "decoder": "libpng rows + PIL (fastdecode)" if fast is not None else "PIL per row",
        "us_per_image_one_thread": us,
        "preprocess_split": {
            "decode": decode / us["preprocess"],
            "preprocessing (to float, normalise)": us["normalize"] / us["preprocess"],
        },
    }


def ingest_split(root: Path) -> dict[str, Any]:
    """Per-file CPU microseconds of reading, checking (full decode) and hashing, one process."""
    timing: Counter[str] = Counter()
    n = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        t = time.process_time()
        data = path.read_bytes()
        t1 = time.process_time()
        inspect_image(data)
        t2 = time.process_time()
        content_id(data)
        t3 = time.process_time()
        timing.update({"read": t1 - t, "inspect (full decode)": t2 - t1, "sha256": t3 - t2})
        n += 1
    us = {k: round(v / n * 1e6, 2) for k, v in timing.items()}
    body = us["inspect (full decode)"] + us["sha256"]
    return {
        "files": n,
        "us_per_file_one_process": us,
        "plain_loop_images_per_s": round(1e6 / sum(us.values()), 1),
        "decode_split": {
            "decode (PIL check, per row)": us["inspect (full decode)"] / body,
            "content hash (sha256)": us["sha256"] / body,
        },
    }


def py_spy_families(raw: Path) -> dict[str, Any]:
    """py-spy's collapsed stacks -> samples per family, for the driver and the Python workers."""
    counts: dict[str, Counter[str]] = {"driver": Counter(), "workers": Counter()}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        who = "workers" if ("daemon.py" in stack or "worker.py" in stack) else "driver"
        frames = stack.split(";")[::-1]
        family = next(
            (f for fr in frames for f, keys in SPY_FAMILIES if any(k in fr for k in keys)),
            "other Python",
        )
        counts[who][family] += int(n)
    return {who: dict(c.most_common()) for who, c in counts.items()}


def sample_table(spark: Any, table: str, rows: int | None, work: Path) -> str:
    """``table`` itself, or its first ``rows`` rows as a table of its own (three files, like it)."""
    if not rows:
        return table
    out = work / "sample"
    spark.read.parquet(table).limit(rows).repartition(3).write.parquet(str(out))
    shutil.copy(os.path.join(table, "_sparkvision.json"), out / "_sparkvision.json")
    return str(out)


def model_dir_for(model: str | None, work: Path) -> str:
    if model:
        return model
    out = str(work / "untrained-cnn")  # speed does not depend on the weights
    save_model_dir(
        out,
        create_model("cnn", 10, 1),
        ModelSpec("cnn", 10, 1, {"image_size": 28}),
        [str(i) for i in range(10)],
        Preprocess(1, (28, 28), (0.286,), (0.353,)),
    )
    return out


def run_ops(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    spark = get_spark(args.master, conf={"spark.ui.enabled": "true", "spark.ui.showConsoleProgress": "false"})
    slots = spark.sparkContext.defaultParallelism
    rest = SparkRest(spark)
    spark.range(1000).selectExpr("sum(id)").collect()  # JVM warm-up, not part of any figure
    table = sample_table(spark, args.table, args.rows, work)
    model_dir = model_dir_for(args.model, work)
    folder = work / "folder"
    generate_folder(folder, args.files)
    res: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "slots": slots,
    }
    res["table"], res["model_dir"], res["files"] = table, model_dir, args.files
    res["code"] = str(Path(predict_module.__file__).parents[2])  # which checkout was profiled
    ops = {
        "predict": lambda: predict_table(spark, model_dir, table, str(work / "pred"), batch_size=args.batch),
        "embed": lambda: embed_table(spark, model_dir, table, str(work / "emb"), batch_size=args.batch),
        "ingest": lambda: ingest(spark, str(folder), str(work / "ingested"), mode="overwrite").to_json(),
    }
    wanted = args.ops.split(",")
    res["ops"] = {}
    for name in wanted:
        ops[name]()  # warm: Python workers, the model's freeze; the profile is the second run
        res["ops"][name] = profile_op(spark, rest, name, ops[name], work)
    inf = inference_split(table, model_dir) if {"predict", "embed"} & set(wanted) else None
    ing = ingest_split(folder) if "ingest" in wanted else None
    res["in_process"] = {"inference": inf, "ingest": ing}
    for name, op in res["ops"].items():
        split: dict[str, dict[str, float]] = {}
        if name == "ingest" and ing:
            split = {"decode": ing["decode_split"]}
        if inf and name != "ingest":
            split = {"preprocess": inf["preprocess_split"]}
        op["breakdown_s"] = breakdown(op, slots, split)
    return res


def write_md(res: dict[str, Any]) -> str:
    lines = [
        "# Where the time goes: predict, embed, ingest",
        "",
        f"`benchmarks/profile_paths.py`, {res['created']}, {res['cores']} cores, {res['slots']} task slots; "
        f"table {res['table']}, {res['files']} generated files for ingest. The operation ran once to warm "
        "the workers, then once profiled. Load average beside each: on a shared machine the figures "
        "are indicative.",
        "",
    ]
    for name, op in res["ops"].items():
        lines += [
            f"## {name}: {op['rows']:,} rows in {op['wall_s']} s = {op['images_per_s']:,} img/s "
            f"(load {op['load_avg_before']} -> {op['load_avg_after']})",
            "",
            f"CPU: {op['cpu_s']} s in all the session's processes = {op['images_per_cpu_s']:,} img per CPU-second ("
            + ", ".join(f"{k} {v}" for k, v in op["cpu_by_process_s"].items())
            + "); of it in the Python body: "
            + ", ".join(f"{k} {v}" for k, v in op["python_cpu_s"].items())
            + f"; the rest {op['cpu_s'] - sum(op['python_cpu_s'].values()):.2f}.",
            "",
            "| where | s | share |",
            "|---|---:|---:|",
        ]
        for k, v in op["breakdown_s"].items():
            lines.append(f"| {k} | {v:.2f} | {v / op['wall_s']:.0%} |")
        lines += [
            "",
            "| job | starts at s | wall s | stages: tasks, task s, run s, cpu s |",
            "|---|---:|---:|---|",
        ]
        for j in op["jobs"]:
            st = "; ".join(f"{s['tasks']}, {s['task_s']}, {s['run_s']}, {s['cpu_s']}" for s in j["stages"])
            lines.append(f"| {j['job']} {j['name'][:60]} | {j['start_s']} | {j['wall_s']} | {st} |")
        lines.append("")
    for kind, d in res["in_process"].items():
        if d:
            per = d.get("us_per_image_one_thread") or d.get("us_per_file_one_process")
            lines.append(
                f"In-process, one thread ({kind}), us per image: "
                + ", ".join(f"{k} {v}" for k, v in per.items())
            )
    if res.get("py_spy"):
        lines += ["", "## py-spy samples by family (50 Hz)", ""]
        for who, fam in res["py_spy"].items():
            total = sum(fam.values()) or 1
            lines.append(f"- {who}: " + ", ".join(f"{k} {v / total:.0%}" for k, v in fam.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument("--rows", type=int, default=None, help="profile the first ROWS rows only")
    ap.add_argument("--files", type=int, default=2000, help="generated JPEG/PNG files for ingest")
    ap.add_argument("--model", default=None, help="model directory (default: an untrained cnn)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--ops", default="predict,embed,ingest")
    ap.add_argument("--py-spy", action="store_true", help="also sample every Python process with py-spy")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--raw", type=Path, default=None, help=argparse.SUPPRESS)  # the py-spy child's output
    args = ap.parse_args()
    os.environ.setdefault("SPARKVISION_PROGRESS", "0")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # the REST API on loopback, whatever the hostname
    if args.py_spy and args.raw is None:
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if os.path.exists(exe):
            raw = Path(tempfile.mkdtemp(prefix="profile-spy-")) / "stacks.txt"
            cmd = [exe, "record", "--subprocesses", "--format", "raw", "--rate", "50", "--nonblocking"]
            cmd += ["-o", str(raw), "--", sys.executable, *sys.argv, "--raw", str(raw)]
            subprocess.run(cmd, check=True)  # py-spy writes the stacks when the run has ended
            res = json.loads((args.results / "profile.json").read_text())
            res["py_spy"] = py_spy_families(raw)
            (args.results / "profile.json").write_text(json.dumps(res, indent=2) + "\n")
            (args.results / "profile.md").write_text(write_md(res))
            print(json.dumps(res["py_spy"], indent=1))
            return
        print("py-spy is not installed (pip install py-spy): profiling without it", flush=True)
    work = Path(tempfile.mkdtemp(prefix="profile-paths-"))
    try:
        res = run_ops(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.raw is not None:
        res["py_spy_note"] = "sampled by py-spy at 50 Hz, which slows the run a little"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "profile.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.results / "profile.md").write_text(write_md(res))
    print(write_md(res))


if __name__ == "__main__":
    main()
