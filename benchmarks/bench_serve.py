"""Serving benchmark (issue 6): a bounded load test of POST /api/classify on loopback.

Starts ``sparkvision serve`` (a separate process, so client and server do not share an event
loop) with a small CNN (28x28 grayscale, 10 classes; weights do not change the cost), then
``--clients`` concurrent clients, each on its own keep-alive connection, send ``--requests``
classify requests, each one 28x28 PNG as multipart form data (what the web page sends) or, with
``--body raw``, as an ``image/png`` body. Bounded in count, in time (``--max-seconds``) and per
request (``--timeout``); only 127.0.0.1 is ever contacted.

The client runs on the same machine as the server, so its CPU is taken from the server: the
default client (``--client raw``) is therefore as cheap as a client can be in Python: one asyncio
protocol per connection writing pre-built HTTP/1.1 request bytes and parsing only the status line
and Content-Length (and checking that the body names a label). ``--client httpx`` is the older
``httpx.AsyncClient`` client, kept to show what it costs. A closed loop of N clients obeys
Little's law: mean latency = N / throughput, so p99 < 250 ms at 200 clients needs > ~800 req/s.

``--http``/``--loop`` other than ``auto`` start the same app through ``uvicorn.run`` with that
HTTP parser / event loop instead of through the CLI (for before/after comparisons; the CLI uses
uvicorn's defaults: httptools and uvloop when installed).

Reports requests/s, p50/p90/p99/max latency, errors, CPU ms per request of server and client,
the server's micro-batching (model calls, mean batch) and the 1-minute load average to
``benchmarks/results/serve.json`` and ``.md``. Target: zero errors, p99 < 250 ms.

    .venv/bin/python benchmarks/bench_serve.py [--clients 200] [--requests 5000] [--body multipart|raw]
        [--client raw|httpx] [--append]
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
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
HOST = "127.0.0.1"
BOUNDARY = b"sparkvisionbench7d1f"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_model(path: str) -> None:
    import torch

    from sparkvision.models import create_model
    from sparkvision.models.modeldir import ModelSpec, Preprocess, save_model_dir

    torch.manual_seed(0)
    classes = [f"class{i}" for i in range(10)]
    model = create_model("cnn", num_classes=10, in_channels=1, image_size=28)
    save_model_dir(
        path,
        model,
        ModelSpec("cnn", 10, 1, {"image_size": 28}),
        classes,
        Preprocess(channels=1, size=(28, 28), mean=(0.286,), std=(0.353,)),
    )


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


def build_request(port: int, data: bytes, body: str, i: int) -> bytes:
    """One complete HTTP/1.1 keep-alive POST /api/classify, as bytes."""
    if body == "raw":
        payload, ctype = data, b"image/png"
    else:
        payload = (
            b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="files"; filename="%d.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" % i + data + b"\r\n--" + BOUNDARY + b"--\r\n"
        )
        ctype = b"multipart/form-data; boundary=" + BOUNDARY
    head = b"POST /api/classify HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
        HOST.encode(),
        port,
        ctype,
        len(payload),
    )
    return head + payload


class HttpError(Exception):
    pass


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time. Parses status and Content-Length only."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self._need = -1
        self._body_at = 0
        self._status = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(
                HttpError("connection closed" + (f": {type(exc).__name__}" if exc else ""))
            )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is None or w.done():
            return
        if self._need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            try:
                self._status = int(head[9:12])
                at = head.index(b"\r\ncontent-length:") + 17
                length = int(head[at : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
            except ValueError:
                w.set_exception(HttpError("unparseable response head (no Content-Length?)"))
                return
            self._body_at = end + 4
            self._need = self._body_at + length
        if len(self.buf) >= self._need:
            body = bytes(self.buf[self._body_at : self._need])
            del self.buf[: self._need]
            self._need = -1
            w.set_result((self._status, body))

    def send(self, request: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter


async def load_raw(
    port: int,
    requests_bytes: list[bytes],
    clients: int,
    requests: int,
    max_seconds: float,
    timeout: float,
    warmup: int,
    server_pid: int,
) -> dict:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0

    async def connect() -> Conn:
        _, proto = await loop.create_connection(Conn, HOST, port)
        return proto

    async def one(conn: Conn, i: int) -> tuple[float, Conn]:
        """Returns latency and the connection to use next (a new one if this one closed)."""
        if conn.closed:
            conn = await connect()
        t0 = time.perf_counter()
        fut = conn.send(requests_bytes[i % len(requests_bytes)])
        timer = loop.call_later(timeout, lambda: fut.done() or fut.set_exception(HttpError("client timeout")))
        try:
            status, body = await fut
        except HttpError:
            if conn.transport is not None:
                conn.transport.close()  # the response may still arrive: never reuse this connection
            conn.closed = True
            raise
        finally:
            timer.cancel()
        dt = time.perf_counter() - t0
        if status != 200:
            raise HttpError(f"HTTP {status}: {body[:60]!r}")
        if b'"label":"' not in body:
            raise HttpError("no label in the response")
        if i % 97 == 0 and not json.loads(body)["results"][0]["label"]:  # a full parse now and then
            raise HttpError("empty label")
        return dt, conn

    conns = [await connect() for _ in range(clients)]
    for start in range(0, warmup, clients):  # model trace, connections, caches
        await asyncio.gather(*(one(conns[j], start + j) for j in range(min(clients, warmup - start))))
    deadline = time.perf_counter() + max_seconds

    async def worker(conn: Conn) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            i = sent
            sent += 1
            try:
                dt, conn = await one(conn, i)
                latencies.append(dt)
            except (HttpError, OSError) as e:
                key = str(e)[:80] or type(e).__name__
                errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    cpu_server0, cpu_client0 = proc_cpu_s(server_pid), time.process_time()
    await asyncio.gather(*(worker(c) for c in conns))
    wall = time.perf_counter() - t0
    cpu_server, cpu_client = proc_cpu_s(server_pid) - cpu_server0, time.process_time() - cpu_client0
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return summarise(latencies, errors, sent, wall, cpu_server, cpu_client)


async def load_httpx(
    port: int,
    images: list[bytes],
    clients: int,
    requests: int,
    max_seconds: float,
    body: str,
    timeout: float,
    warmup: int,
    server_pid: int,
) -> dict:
    """The older client: one httpx.AsyncClient shared by all clients (costly in CPU; kept for comparison)."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", limits=limits, timeout=timeout) as client:

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

        await asyncio.gather(*(one(i) for i in range(warmup)))
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
    return summarise(latencies, errors, sent, wall, cpu_server, cpu_client)


def summarise(
    latencies: list[float],
    errors: dict[str, int],
    sent: int,
    wall: float,
    cpu_server: float,
    cpu_client: float,
) -> dict:
    lat = np.array(latencies) * 1000

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 1) if len(lat) else None

    return {
        "requests_sent": sent,
        "ok": int(len(lat)),
        "errors": int(sum(errors.values())),
        "error_kinds": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 1),
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "max": round(float(lat.max()), 1) if len(lat) else None,
            "mean": round(float(lat.mean()), 1) if len(lat) else None,
        },
        "cpu_ms_per_request": {
            "server": round(1000 * cpu_server / max(len(lat), 1), 3),
            "client": round(1000 * cpu_client / max(len(lat), 1), 3),
        },
    }


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


SERVE_DIRECT = """
import sys, uvicorn
from sparkvision.web.app import create_app
from sparkvision.web.security import Settings
port, work, model, bs, wait, threads, http, loop = sys.argv[1:9]
s = Settings(host="127.0.0.1", port=int(port), data_roots=[work], db_url=f"sqlite:///{work}/jobs.db", model_dir=model,
             batch_size=int(bs), batch_wait_ms=float(wait), torch_threads=int(threads))
uvicorn.run(create_app(s), host="127.0.0.1", port=int(port), log_level="warning", timeout_keep_alive=30,
            backlog=4096, http=http, loop=loop)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="Stop sending after this long.")
    ap.add_argument(
        "--timeout", type=float, default=30.0, help="Per-request limit; a request over it is an error."
    )
    ap.add_argument("--body", choices=("multipart", "raw"), default="multipart")
    ap.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="raw: asyncio protocol with pre-built requests (cheap); httpx: httpx.AsyncClient.",
    )
    ap.add_argument(
        "--client-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="Event loop of the client (uvloop when installed).",
    )
    ap.add_argument(
        "--http",
        choices=("auto", "h11", "httptools"),
        default="auto",
        help="Server HTTP parser; auto: start the CLI (uvicorn picks httptools when installed).",
    )
    ap.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="Server event loop."
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=400)
    ap.add_argument("--note", default="", help="Free text stored with the run.")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serve"))
    ap.add_argument(
        "--append",
        action="store_true",
        help="Add this run to the current results (else replace "
        "them; runs marked older are always kept as history).",
    )
    ap.add_argument("--render", action="store_true", help="Only re-render the .md from the .json.")
    args = ap.parse_args()
    if args.render:
        write_results(args.out, None, True)
        return

    work = tempfile.mkdtemp(prefix="bench-serve-")
    model_dir = os.path.join(work, "model")
    make_model(model_dir)
    images = make_images(64)
    port = free_port()
    url = f"http://{HOST}:{port}"
    env = dict(os.environ, SPARKVISION_API_TOKEN="")
    if args.http == "auto" and args.loop == "auto":
        cmd = [
            sys.executable,
            "-m",
            "sparkvision.cli",
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--data-root",
            work,
            "--db",
            f"sqlite:///{work}/jobs.db",
            "--model",
            model_dir,
            "--batch-size",
            str(args.batch_size),
            "--batch-wait-ms",
            str(args.batch_wait_ms),
            "--torch-threads",
            str(args.torch_threads),
            "--log-level",
            "warning",
        ]
    else:
        cmd = [
            sys.executable,
            "-c",
            SERVE_DIRECT,
            str(port),
            work,
            model_dir,
            str(args.batch_size),
            str(args.batch_wait_ms),
            str(args.torch_threads),
            args.http,
            args.loop,
        ]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        t0 = time.time()
        while True:
            try:
                get_json(url + "/api/health", timeout=1)
                break
            except OSError:
                pass
            if server.poll() is not None or time.time() - t0 > 120:
                raise SystemExit("the server did not start")
            time.sleep(0.3)
        if args.client_loop == "uvloop":
            try:
                import uvloop

                uvloop.install()
            except ImportError:
                args.client_loop = "asyncio"
        if args.client == "raw":
            reqs = [build_request(port, data, args.body, i) for i, data in enumerate(images)]
            result = asyncio.run(
                load_raw(
                    port,
                    reqs,
                    args.clients,
                    args.requests,
                    args.max_seconds,
                    args.timeout,
                    args.warmup,
                    server.pid,
                )
            )
        else:
            result = asyncio.run(
                load_httpx(
                    port,
                    images,
                    args.clients,
                    args.requests,
                    args.max_seconds,
                    args.body,
                    args.timeout,
                    args.warmup,
                    server.pid,
                )
            )
        load_avg = round(os.getloadavg()[0], 2)
        health = get_json(url + "/api/health")
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)

    import uvicorn

    run = {
        "benchmark": "serve",
        "body": args.body,
        "client": args.client,
        "client_loop": args.client_loop,
        "server": {
            "via": "sparkvision serve" if args.http == "auto" and args.loop == "auto" else "uvicorn.run",
            "http": args.http,
            "loop": args.loop,
            "uvicorn": uvicorn.__version__,
            "httptools": _have("httptools"),
            "uvloop": _have("uvloop"),
        },
        "clients": args.clients,
        "requests": args.requests,
        "max_seconds": args.max_seconds,
        "batch_size": args.batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "torch_threads": args.torch_threads,
        "model": "cnn 28x28x1, 10 classes",
        **result,
        "server_batching": next(iter(health.get("batching", {}).values()), None),
        "stopped_by_time_limit": result["requests_sent"] < args.requests,
        "target": {"errors": 0, "p99_ms": 250},
        "target_met": result["errors"] == 0
        and (result["latency_ms"]["p99"] or 1e9) < 250
        and result["requests_sent"] >= args.requests,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m_at_end": load_avg},
        "note": args.note,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_results(args.out, run, args.append)
    print(json.dumps(run, indent=2))


def _have(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", "yes")


def write_results(out: str, run: dict | None, append: bool) -> None:
    """Add ``run`` to ``out``.json (replacing the current runs unless ``append``; runs marked older
    are always kept) and render ``out``.md from it. ``run=None`` only re-renders."""
    runs = []
    if os.path.exists(out + ".json"):
        with open(out + ".json") as f:
            runs = [r for r in json.load(f).get("runs", []) if append or run is None or r.get("older")]
    if run is not None:
        runs.append(run)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"runs": runs}, f, indent=2)
    head = (
        "| body | client | server http/loop | clients | requests ok | errors | req/s | p50 ms | p90 ms | p99 ms | "
        "max ms | CPU ms/req server / client | mean batch | target | load avg | note |"
    )
    rule = "|" + "---|" * 16

    def row(r: dict) -> str:
        b = r.get("server_batching") or {}
        srv = r.get("server") or {}
        server = f"{srv.get('http', 'h11')}/{srv.get('loop', 'asyncio')}"
        if srv.get("http") == "auto":
            server = (
                ("httptools" if srv.get("httptools") else "h11")
                + "/"
                + ("uvloop" if srv.get("uvloop") else "asyncio")
                + " (auto)"
            )
        cpu = r.get("cpu_ms_per_request") or {}
        lat = r["latency_ms"]
        return (
            f"| {r['body']} | {r.get('client', 'httpx')} | {server} | {r['clients']} | "
            f"{r['ok']:,} / {r['requests']:,} | {r['errors']} | {r['requests_per_s']:,.0f} | {lat['p50']} | "
            f"{lat['p90']} | {lat['p99']} | {lat['max']} | {cpu.get('server', 0):.2f} / {cpu.get('client', 0):.2f} | "
            f"{b.get('mean_batch')} | {'met' if r['target_met'] else 'missed'} | "
            f"{r['machine']['load_avg_1m_at_end']} | {r.get('note', '')} |"
        )

    current = [r for r in runs if not r.get("older")]
    older = [r for r in runs if r.get("older")]
    lines = [
        "# Serving benchmark: POST /api/classify on loopback",
        "",
        "`.venv/bin/python benchmarks/bench_serve.py` (server: `sparkvision serve`, a separate process, "
        "unless the server column names a parser and loop without `(auto)`; client: `raw` = asyncio "
        "protocol with pre-built HTTP/1.1 keep-alive requests, `httpx` = httpx.AsyncClient). 200 clients, "
        "5,000 requests of one 28x28 PNG each, small CNN. Client and server share the machine's 2 cores; "
        "`load avg` is the 1-minute load average at the end of the run (above 2 means the run was "
        "contended). Target: zero errors and p99 < 250 ms.",
        "",
        "## Current",
        "",
        head,
        rule,
        *[row(r) for r in current],
    ]
    if older:
        lines += [
            "",
            "## Older runs (history)",
            "",
            "Earlier server code (uvicorn's pure-Python h11 parser and asyncio loop) measured with the "
            "httpx client, whose own CPU cost (6.6-10 ms per request) was most of the bottleneck; kept for "
            "comparison.",
            "",
            head,
            rule,
            *[row(r) for r in older],
        ]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
