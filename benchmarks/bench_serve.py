"""Serving benchmark (issue 6): a bounded load test of POST /api/classify on loopback.

Starts ``sparkvision serve`` (a separate process, so client and server do not share an event
loop) with a small CNN (28x28 grayscale, 10 classes; weights do not change the cost), then
``--clients`` concurrent clients on one ``httpx.AsyncClient`` send ``--requests`` classify
requests, each one 28x28 PNG as multipart form data (what the web page sends) or, with
``--body raw``, as an ``image/png`` body. Bounded in count and in time (``--max-seconds``); only
127.0.0.1 is ever contacted.

Reports requests/s, p50/p90/p99/max latency, errors and the server's micro-batching (model calls,
mean batch) to ``benchmarks/results/serve.json`` and ``.md``. Target: zero errors, p99 < 250 ms.

    .venv/bin/python benchmarks/bench_serve.py [--clients 200] [--requests 5000] [--body multipart|raw]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(path: str) -> None:
    import torch

    from sparkvision.modeldir import ModelSpec, Preprocess, save_model_dir
    from sparkvision.models import create_model

    torch.manual_seed(0)
    classes = [f"class{i}" for i in range(10)]
    model = create_model("cnn", num_classes=10, in_channels=1, image_size=28)
    save_model_dir(path, model, ModelSpec("cnn", 10, 1, {"image_size": 28}), classes,
                   Preprocess(channels=1, size=(28, 28), mean=(0.286,), std=(0.353,)))


def make_images(n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


async def load(url: str, images: list[bytes], clients: int, requests: int, max_seconds: float, body: str,
               warmup: int, server_pid: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:

        async def one(i: int) -> float:
            data = images[i % len(images)]
            t0 = time.perf_counter()
            if body == "raw":
                r = await client.post("/api/classify", content=data, headers={"content-type": "image/png"})
            else:
                r = await client.post("/api/classify", files={"files": (f"{i}.png", data, "image/png")})
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            if not r.json()["results"][0]["label"]:
                raise RuntimeError("no label")
            return dt

        await asyncio.gather(*(one(i) for i in range(warmup)))  # model trace, connections
        deadline = time.perf_counter() + max_seconds

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                i = sent
                sent += 1
                try:
                    latencies.append(await one(i))
                except Exception as e:  # noqa: BLE001 - counted, reported
                    key = str(e)[:80] or type(e).__name__
                    errors[key] = errors.get(key, 0) + 1

        t0 = time.perf_counter()
        cpu_server0, cpu_client0 = proc_cpu_s(server_pid), time.process_time()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        cpu_server, cpu_client = proc_cpu_s(server_pid) - cpu_server0, time.process_time() - cpu_client0
        health = (await client.get("/api/health")).json()
    lat = np.array(latencies) * 1000
    return {
        "requests_sent": sent,
        "ok": int(len(lat)),
        "errors": int(sum(errors.values())),
        "error_kinds": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p90": round(float(np.percentile(lat, 90)), 1) if len(lat) else None,
            "p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "max": round(float(lat.max()), 1) if len(lat) else None,
            "mean": round(float(lat.mean()), 1) if len(lat) else None,
        },
        "cpu_ms_per_request": {"server": round(1000 * cpu_server / max(len(lat), 1), 2),
                               "client": round(1000 * cpu_client / max(len(lat), 1), 2)},
        "server_batching": next(iter(health.get("batching", {}).values()), None),
        "stopped_by_time_limit": sent < requests,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--max-seconds", type=float, default=180.0, help="Stop sending after this long.")
    ap.add_argument("--body", choices=("multipart", "raw"), default="multipart")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve"))
    ap.add_argument("--append", action="store_true", help="Add this run to the existing results.")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench-serve-")
    model_dir = os.path.join(work, "model")
    make_model(model_dir)
    images = make_images(64)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SPARKVISION_API_TOKEN="")
    cmd = [sys.executable, "-m", "sparkvision.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-root", work, "--db", f"sqlite:///{work}/jobs.db", "--model", model_dir,
           "--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms), "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        import httpx

        t0 = time.time()
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() - t0 > 120:
                raise SystemExit("the server did not start")
            time.sleep(0.3)
        result = asyncio.run(load(url, images, args.clients, args.requests, args.max_seconds, args.body,
                                  args.warmup, server.pid))
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)

    run = {
        "benchmark": "serve",
        "body": args.body,
        "clients": args.clients,
        "requests": args.requests,
        "max_seconds": args.max_seconds,
        "batch_size": args.batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "model": "cnn 28x28x1, 10 classes",
        **result,
        "target": {"errors": 0, "p99_ms": 250},
        "target_met": result["errors"] == 0 and (result["latency_ms"]["p99"] or 1e9) < 250
        and not result["stopped_by_time_limit"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    runs = []
    if args.append and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            runs = json.load(f).get("runs", [])
    runs.append(run)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"runs": runs}, f, indent=2)
    lines = ["# Serving benchmark: POST /api/classify on loopback", "",
             "`.venv/bin/python benchmarks/bench_serve.py` (server: `sparkvision serve`, separate process; "
             "client: httpx AsyncClient). Target: zero errors and p99 < 250 ms.", "",
             "| body | clients | requests ok | errors | req/s | p50 ms | p90 ms | p99 ms | max ms | mean batch | "
             "target | load avg |", "|" + "---|" * 12]
    for r in runs:
        b = r["server_batching"] or {}
        lines.append(f"| {r['body']} | {r['clients']} | {r['ok']:,} / {r['requests']:,} | {r['errors']} | "
                     f"{r['requests_per_s']} | {r['latency_ms']['p50']} | {r['latency_ms']['p90']} | "
                     f"{r['latency_ms']['p99']} | {r['latency_ms']['max']} | {b.get('mean_batch')} | "
                     f"{'met' if r['target_met'] else 'missed'} | {r['machine']['load_avg_1m_at_end']} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
