"""The job registry (``JobStore``) on both backends it supports: SQLite and PostgreSQL.

Every test takes ``job_db_url`` (tests/conftest.py), so it runs once on a SQLite file and once on a
fresh database of a throwaway PostgreSQL server (skipped when PostgreSQL or psycopg is absent).
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from types import SimpleNamespace

import pytest

from sparkvision.ops.base import Params
from sparkvision.web.jobs import LOG_TAIL_LINES, JobStore, utcnow
from sparkvision.web.kinds import KINDS, Kind
from sparkvision.web.runner import Runner


@pytest.fixture
def store(job_db_url):
    s = JobStore(job_db_url)
    yield s
    s.close()


PARAMS = {
    "table": "/data/tables/tiny",
    "epochs": 3,
    "lr": 0.05,
    "resume": False,
    "note": None,
    "classes": ["a", "b", "ü ñ 漢字 🙂"],
    "nested": {"k": [1, 2.5, {"deep": True}], "big": 2**53},
    "quote": 'it\'s "quoted" \\ and \n newline',
}


def test_create_get_roundtrip_json_and_timestamps(store):
    before = utcnow()
    job = store.create("train", PARAMS, "/data/models/out")
    got = store.get(job.id)
    assert got is not None and got.id == job.id and len(job.id) == 12
    assert got.params == PARAMS  # JSON round trip, key order and types included
    assert list(got.params) == list(PARAMS)
    assert (got.kind, got.state, got.progress, got.metrics, got.result) == ("train", "queued", 0.0, {}, None)
    assert got.result_location == "/data/models/out" and got.log == "" and got.attempts == 0
    # Naive UTC timestamps, microseconds kept, whatever the server's time zone.
    assert got.created_at.tzinfo is None and before <= got.created_at <= utcnow()
    assert got.created_at == job.created_at
    js = got.to_json()
    assert js["created_at"].endswith("Z") and js["started_at"] is None and js["cancel_requested"] is False
    assert js["params"] == PARAMS and js["log_tail"] == []
    assert store.get("nope") is None


def test_list_filters_order_and_pages(store):
    t0 = dt.datetime(2024, 1, 1, 12, 0, 0)
    ids = []
    for i, kind in enumerate(["ingest", "train", "ingest", "evaluate", "ingest"]):
        j = store.create(kind, {"i": i})
        store.update(j.id, created_at=t0 + dt.timedelta(seconds=i))
        ids.append(j.id)
    store.update(ids[1], state="succeeded")
    assert [j.id for j in store.list()] == ids[::-1]  # newest first
    assert [j.id for j in store.list(kind="ingest")] == [ids[4], ids[2], ids[0]]
    assert [j.id for j in store.list(state="succeeded")] == [ids[1]]
    assert [j.id for j in store.list(state="queued", kind="ingest", limit=2, offset=1)] == [ids[2], ids[0]]
    assert store.list(kind="nothing") == [] and store.list(offset=10) == []
    assert [j.params["i"] for j in store.list(limit=2)] == [4, 3]


def test_claim_finish_and_state_transitions(store):
    a = store.create("ingest", {"n": 1})
    b = store.create("ingest", {"n": 2})
    store.update(a.id, created_at=utcnow() - dt.timedelta(seconds=5))  # a is the oldest
    got = store.claim_next()
    assert got.id == a.id and got.state == "running" and got.attempts == 1 and got.started_at is not None
    assert store.claim_next().id == b.id
    assert store.claim_next() is None  # the queue is empty
    store.update(a.id, progress=42.5, metrics={"rows": 10, "images_per_s": 123.4})
    store.finish(a.id, "succeeded", progress=100.0, result={"rows_written": 10, "history": [{"epoch": 1}]})
    done = store.get(a.id)
    assert done.state == "succeeded" and done.progress == 100.0 and done.finished_at >= done.started_at
    assert done.metrics == {"rows": 10, "images_per_s": 123.4} and done.result["history"] == [{"epoch": 1}]
    store.finish(b.id, "failed", error="boom")
    assert store.get(b.id).error == "boom"
    with pytest.raises(AssertionError):
        store.finish(b.id, "queued")
    # Requeue (resume): new params, flags reset; claimed again, attempts counts runs.
    store.requeue(b.id, {"n": 2, "resume": True})
    again = store.get(b.id)
    assert (again.state, again.error, again.finished_at, again.params) == (
        "queued",
        None,
        None,
        {"n": 2, "resume": True},
    )
    assert store.claim_next().attempts == 2


def test_cancel(store):
    q = store.create("ingest", {})
    r = store.create("ingest", {})
    store.update(q.id, created_at=utcnow() + dt.timedelta(seconds=5))  # r is claimed first
    assert store.claim_next().id == r.id
    assert store.request_cancel(q.id) == "cancelled"  # queued: at once
    assert store.get(q.id).finished_at is not None
    assert store.request_cancel(r.id) == "running"  # running: flagged for the runner
    assert store.get(r.id).cancel_requested == 1 and store.get(r.id).to_json()["cancel_requested"] is True
    store.finish(r.id, "interrupted")
    assert store.request_cancel(r.id) == "cancelled"  # an interrupted job can be cancelled too
    with pytest.raises(KeyError):
        store.request_cancel("nope")
    assert store.claim_next() is None


def test_restart_marks_running_jobs_interrupted(job_db_url):
    store = JobStore(job_db_url)
    a, b, c = (store.create("ingest", {"i": i}) for i in range(3))
    for j, age in ((a, 3), (b, 2), (c, 1)):
        store.update(j.id, created_at=utcnow() - dt.timedelta(seconds=age))
    store.claim_next()
    store.claim_next()
    store.close()  # the server dies with a and b running
    again = JobStore(job_db_url)  # a new server on the same database: the table already exists
    try:
        assert sorted(again.mark_interrupted()) == sorted([a.id, b.id])
        for jid in (a.id, b.id):
            j = again.get(jid)
            assert j.state == "interrupted" and "resume" in j.error and j.finished_at is not None
        assert again.get(c.id).state == "queued"
        assert again.mark_interrupted() == []
    finally:
        again.close()


def test_log_tail_is_bounded(store):
    j = store.create("ingest", {})
    for i in range(LOG_TAIL_LINES + 20):
        store.append_log(j.id, f"line {i}")
    lines = store.get(j.id).log.splitlines()
    assert len(lines) == LOG_TAIL_LINES and lines[-1].endswith(f"line {LOG_TAIL_LINES + 19}")
    assert store.get(j.id).to_json()["log_tail"] == lines[-50:]
    store.append_log("nope", "ignored")  # no such job: nothing happens


def test_concurrent_log_appends_lose_nothing(store):
    """The runner's job thread and its progress monitor append to the same job's log at once."""
    j = store.create("ingest", {})
    n_threads, per_thread = 4, 15

    def work(t):
        for i in range(per_thread):
            store.append_log(j.id, f"t{t} {i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    lines = store.get(j.id).log.splitlines()
    assert len(lines) == n_threads * per_thread


def test_concurrent_claims_take_each_job_once(job_db_url):
    """Two stores on one database (two server processes): each job is claimed exactly once."""
    stores = [JobStore(job_db_url), JobStore(job_db_url)]
    try:
        ids = {stores[0].create("ingest", {"i": i}).id for i in range(12)}
        claimed: list[str] = []
        errors: list[BaseException] = []

        def work(s):
            try:
                while (job := s.claim_next()) is not None:
                    claimed.append(job.id)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=(stores[i % 2],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(claimed) == sorted(ids)  # none twice, none left behind
        assert stores[1].list(state="queued") == []
    finally:
        for s in stores:
            s.close()


def test_non_finite_numbers_and_nul_characters(store):
    """NaN/inf (a diverged loss) are not JSON, and PostgreSQL text cannot hold NUL: both are stored safely."""
    j = store.create("train", {"lr": float("nan"), "s": "nul \x00 in json"})
    store.update(j.id, metrics={"loss": float("nan"), "best": float("inf"), "acc": 0.5})
    store.finish(
        j.id,
        "failed",
        result={"history": [{"epoch": 1, "train_loss": float("-inf")}]},
        error="bad byte \x00 in message",
    )
    store.append_log(j.id, "a line with \x00 inside")
    got = store.get(j.id)
    assert got.params == {"lr": None, "s": "nul \x00 in json"}  # escaped as \u0000 in JSON: kept
    assert got.metrics == {"loss": None, "best": None, "acc": 0.5}
    assert got.result == {"history": [{"epoch": 1, "train_loss": None}]}
    assert "\x00" not in got.error and got.error.startswith("bad byte") and got.error.endswith("in message")
    assert "\x00" not in got.log and got.log.endswith("inside")
    # Ids and filters with NUL match nothing (PostgreSQL would refuse the query outright).
    assert store.get("a\x00b") is None and store.list(kind="in\x00gest") == []
    with pytest.raises(KeyError):
        store.request_cancel("a\x00b")


def test_runner_end_to_end_without_spark(job_db_url, monkeypatch):
    """The real runner thread on this backend: claim, progress, logs, a result with a NaN and a datetime."""

    class FakeParams(Params):
        steps: int = 3

    def run_fake(spark, p, progress):
        for i in range(p.steps):
            progress.update(100.0 * (i + 1) / p.steps, f"step {i + 1}")
            progress.log(f"did step {i + 1}")
            time.sleep(0.05)
        return {"steps": p.steps, "loss": float("nan"), "when": dt.datetime(2024, 1, 2)}

    monkeypatch.setitem(KINDS, "fake", Kind("fake", FakeParams, run_fake, "A fake job."))
    fake_spark = SimpleNamespace(
        sparkContext=SimpleNamespace(
            setJobGroup=lambda *a, **k: None,
            cancelJobGroup=lambda *a: None,
            statusTracker=lambda: SimpleNamespace(getJobIdsForGroup=lambda g: []),
        )
    )
    store = JobStore(job_db_url)
    runner = Runner(store, lambda: fake_spark, poll_s=0.02)
    try:
        job = store.create("fake", {"steps": 3})
        runner.start()
        deadline = time.time() + 30
        while time.time() < deadline and store.get(job.id).state in ("queued", "running"):
            time.sleep(0.05)
        done = store.get(job.id)
        assert done.state == "succeeded", (done.state, done.error)
        assert done.progress == 100.0 and done.result == {
            "steps": 3,
            "loss": None,
            "when": "2024-01-02 00:00:00",
        }
        assert done.metrics == {}  # the fake kind's summary has none of the final-metric keys
        log = done.log
        for i in (1, 2, 3):
            assert f"did step {i}" in log
        assert "started fake" in log and "succeeded in" in log
        assert not math.isnan(done.progress)
    finally:
        runner.stop()
        store.close()
