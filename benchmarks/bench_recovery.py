"""Recovery cost (issue 16): the wall time a training run loses when one executor is SIGKILLed.

On a real standalone cluster started from the pyspark installation (tests/standalone.py: a master
and two 1-core workers on 127.0.0.1), train `cnn` on Fashion-MNIST with 2 ranks twice, with the
same seed: undisturbed, and with one executor JVM killed halfway through epoch ``--kill-epoch``
(the worst case for per-epoch checkpoints is just before one; halfway is the average). The runs
alternate in that order ``--rounds`` times, so machine noise hits both.

Lost time = disturbed wall - undisturbed wall: the work since the last checkpoint, plus the
executor's relaunch, the barrier job's restart and the ranks re-reading their shards. Target: less
than one epoch (the mean epoch time of the undisturbed run). A killed run is made for each
``--checkpoint-every`` value (0: checkpoints at epoch ends only, the default; N: also every N
steps), each against the one undisturbed run without mid-epoch checkpoints, so the cost of writing
them counts as lost time too.

    .venv/bin/python benchmarks/bench_recovery.py [--table data/fashion-mnist] [--epochs 3]
        [--kill-epoch 2] [--checkpoint-every 0,50] [--rounds 1]

Results: benchmarks/results/recovery.json and recovery.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from standalone import StandaloneCluster  # noqa: E402


def train(table: str, out: Path, master: str, epochs: int, checkpoint_every: int) -> subprocess.Popen:
    env = {**os.environ, "SPARKVISION_PROGRESS": "0", "PYSPARK_PYTHON": sys.executable}
    cmd = [sys.executable, "-m", "sparkvision.cli", "train", "--table", table, "--out", str(out)]
    cmd += ["--epochs", str(epochs), "--workers", "2", "--seed", "3", "--master", master, "--json"]
    cmd += ["--checkpoint-every", str(checkpoint_every)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def progress(out: Path) -> dict | None:
    try:
        return json.loads((out / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def run(
    cluster: StandaloneCluster,
    table: str,
    out: Path,
    epochs: int,
    kill_epoch: int | None,
    checkpoint_every: int = 0,
) -> dict:
    t0 = time.perf_counter()
    p = train(table, out, cluster.master_url, epochs, checkpoint_every)
    lines: list[tuple[float, str]] = []  # stderr with the time each line came, for the timeline

    def read() -> None:
        for line in p.stderr:
            lines.append((time.perf_counter() - t0, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed_at = None
    while kill_epoch is not None and killed_at is None and p.poll() is None:
        g = progress(out)
        if g and g["epoch"] == kill_epoch and g["step"] >= g["steps"] // 2:
            os.kill(cluster.executor_pids()[-1], signal.SIGKILL)
            killed_at = round(time.perf_counter() - t0, 1)
        time.sleep(0.05)
    stdout = p.stdout.read()
    p.wait()
    wall = time.perf_counter() - t0
    reader.join()
    stderr = "".join(line for _, line in lines)
    relaunched = [t for t, line in lines if "relaunching from the last checkpoint" in line]
    if p.returncode != 0:
        raise SystemExit(f"train failed:\n{stderr[-3000:]}")
    s = json.loads(stdout.strip().splitlines()[-1])
    cluster.wait_no_executors()
    recovered = [line for line in stderr.splitlines() if "recovered from" in line]
    return {
        "wall_s": round(wall, 1),
        "train_wall_s": s["wall_s"],
        "epoch_time_s": [h["epoch_time_s"] for h in s["history"]],
        "test_acc": s["test_acc"],
        "restarts": s["restarts"],
        "resumed_from_epoch": s["resumed_from_epoch"],
        "killed_at_s": killed_at,
        "relaunch_at_s": round(relaunched[0], 1) if relaunched else None,  # the driver saw the loss
        "checkpoint_every": checkpoint_every,
        "data_load_s": s["data_load_s"],  # the last launch's: reading and decoding its shard
        "log": recovered[0].strip() if recovered else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kill-epoch", type=int, default=2)
    ap.add_argument("--checkpoint-every", default="0,50", help="comma-separated: one killed run each")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--results", default=str(HERE / "results"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        cluster = StandaloneCluster(Path(tmp) / "cluster")
        try:
            cluster.start(memory="3g")
            for r in range(a.rounds):
                calm = run(cluster, a.table, Path(tmp) / f"calm{r}", a.epochs, None)
                epoch = sum(calm["epoch_time_s"]) / len(calm["epoch_time_s"])
                for every in [int(v) for v in a.checkpoint_every.split(",")]:
                    hit = run(cluster, a.table, Path(tmp) / f"hit{r}-{every}", a.epochs, a.kill_epoch, every)
                    lost = hit["wall_s"] - calm["wall_s"]
                    rows.append(
                        {
                            "round": r + 1,
                            "checkpoint_every": every,
                            "calm": calm,
                            "killed": hit,
                            "mean_epoch_s": round(epoch, 1),
                            "lost_s": round(lost, 1),
                            "lost_epochs": round(lost / epoch, 2),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                    cluster.clean_apps()
        finally:
            cluster.stop()
    result = {
        "table": a.table,
        "epochs": a.epochs,
        "kill": f"one executor SIGKILLed halfway through epoch {a.kill_epoch}",
        "cluster": "standalone, 2 workers x 1 core on 127.0.0.1 (tests/standalone.py)",
        "rounds": rows,
        "target": "lost < 1 epoch",
        "met": {
            str(e): max(r["lost_epochs"] for r in rows if r["checkpoint_every"] == e) < 1.0
            for e in sorted({r["checkpoint_every"] for r in rows})
        },
    }
    Path(a.results).mkdir(parents=True, exist_ok=True)
    (Path(a.results) / "recovery.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| round | --checkpoint-every | undisturbed wall s | killed wall s | killed at s | relaunched at s "
        "| mean epoch s | lost s | lost epochs | acc undisturbed | acc killed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        k = r["killed"]
        lines.append(
            f"| {r['round']} | {r['checkpoint_every']} | {r['calm']['wall_s']} | {k['wall_s']} | "
            f"{k['killed_at_s']} | {k['relaunch_at_s']} | {r['mean_epoch_s']} | {r['lost_s']} | "
            f"{r['lost_epochs']} | {r['calm']['test_acc']:.4f} | {k['test_acc']:.4f} |"
        )
    (Path(a.results) / "recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
