"""A soak: 1,000 mixed good and bad requests from 50 concurrent clients against a real uvicorn
server: no 5xx, every error a JSON body with a message, and the server's memory back near its
baseline afterwards (issue 15)."""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import make_image, write_tiny_model

from sparkvision.web.app import create_app
from sparkvision.web.security import Settings

CLASSES = ["a", "b", "c", "d"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_mix(rng: random.Random, n: int) -> list[tuple[str, str, dict]]:
    good = make_image(1, seed=3)
    bad = {
        "corrupt": good[: len(good) // 2],
        "text": b"not an image at all",
        "empty": b"",
        "bomb": b"\x89PNG\r\n\x1a\n"
        + b"\x00\x00\x00\rIHDR"
        + (100000).to_bytes(4, "big") * 2
        + b"\x08\x00\x00\x00\x00",
    }
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            out.append(("POST", "/api/classify", {"files": [("files", ("g.png", good, "image/png"))]}))
        elif r < 0.55:
            name = rng.choice(sorted(bad))
            out.append(
                ("POST", "/api/classify", {"files": [("files", (f"{name}.png", bad[name], "image/png"))]})
            )
        elif r < 0.65:
            out.append(
                (
                    "POST",
                    "/api/jobs",
                    {
                        "json": {
                            "kind": "ingest",
                            "params": {
                                "source": rng.choice(["{folder,../x}", "../../etc", "nope", "/etc"]),
                                "table": "t",
                            },
                        }
                    },
                )
            )
        elif r < 0.72:
            out.append(
                (
                    "POST",
                    "/api/jobs",
                    {"content": b"{" * rng.randint(1, 5000), "headers": {"content-type": "application/json"}},
                )
            )
        elif r < 0.8:
            out.append(("GET", rng.choice(["/api/jobs", "/api/health", "/api/models", "/api/tables"]), {}))
        elif r < 0.88:
            out.append(
                (
                    "GET",
                    rng.choice(
                        [
                            "/api/tables/../../etc/rows",
                            "/api/nope",
                            "/api/jobs/%00",
                            "/api/tables/x/rows?limit=-5",
                        ]
                    ),
                    {},
                )
            )
        else:
            out.append(
                (
                    "POST",
                    "/api/classify?top_k=" + rng.choice(["0", "x", "100000", "3"]),
                    {"files": [("files", ("g.png", good, "image/png"))]},
                )
            )
    return out


@pytest.mark.timeout(300)
def test_soak_1000_mixed_requests_50_clients(tmp_path):
    root = tmp_path / "root"
    write_tiny_model(root / "models" / "cnn", CLASSES)
    app = create_app(
        Settings(
            data_roots=[str(root)],
            db_url="sqlite://",
            model_dir=str(root / "models" / "cnn"),
            start_runner=False,
            max_pixels=100_000,
        )
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(15)
    statuses: dict[int, int] = {}
    problems: list[str] = []

    async def one(client: httpx.AsyncClient, method: str, path: str, kw: dict) -> None:
        r = await client.request(method, path, **kw)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            problems.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
        elif r.status_code >= 400:
            body = r.json()
            if not (isinstance(body.get("error"), str) and body["error"]) or "Traceback" in r.text:
                problems.append(f"{method} {path}: {r.status_code} without a message: {r.text[:200]}")

    async def run(batch: list[tuple[str, str, dict]]) -> None:
        sem = asyncio.Semaphore(50)
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:

            async def guarded(m, p, kw):
                async with sem:
                    await one(client, m, p, kw)

            await asyncio.gather(*(guarded(m, p, kw) for m, p, kw in batch))

    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        asyncio.run(run(requests_mix(rng, 100)))  # warm-up: model loaded, allocator settled
        gc.collect()
        baseline = rss_mb()
        t0 = time.monotonic()
        asyncio.run(run(requests_mix(rng, 1000)))
        elapsed = time.monotonic() - t0
        gc.collect()
        after = rss_mb()
    finally:
        server.should_exit = True
        thread.join(10)
    assert not problems, problems[:5]
    assert sum(statuses.values()) == 1100 and not any(s >= 500 for s in statuses), statuses
    assert statuses.get(200, 0) > 300 and sum(v for s, v in statuses.items() if 400 <= s < 500) > 300, (
        statuses
    )
    # Memory back near its baseline: what 1,000 requests leave behind is bounded, not growing with them.
    assert after - baseline < 64, (baseline, after, elapsed)
    print(f"soak: 1000 requests in {elapsed:.1f} s, RSS {baseline:.0f} -> {after:.0f} MiB, {statuses}")
