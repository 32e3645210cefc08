"""The job registry: SQLAlchemy 2 models and a small repository over them.

SQLite by default (``sqlite:///path/jobs.db``); any SQLAlchemy URL works, e.g.
``postgresql+psycopg://user@host/db`` with the ``postgres`` extra installed. Both are tested
(tests/test_job_store.py runs every registry test on each). What keeps them interchangeable:

- JSON fields use SQLAlchemy's portable ``JSON`` type, serialised by :func:`json_dumps`: NaN and
  infinities (a diverged loss) become ``null``. PostgreSQL's ``json`` rejects them, and so does the
  API's JSON encoder, so a NaN would otherwise fail a finished job on PostgreSQL and break
  ``GET /api/jobs/{id}`` on SQLite.
- Text can hold no NUL character on PostgreSQL; :class:`SafeText` / :class:`SafeString` replace it
  (U+FFFD) on every write and in every query, so a NUL in an id or filter matches nothing instead
  of raising.
- Timestamps are naive UTC (``timestamp without time zone``) whatever the server's time zone.
- Read-modify-write updates (log appends, cancel) lock the row (``SELECT ... FOR UPDATE``, a no-op
  on SQLite) and, within one process, a lock (SQLite has no row locks); claiming the next queued job
  uses ``FOR UPDATE SKIP LOCKED`` plus a conditional update, so each job is claimed once even by
  several processes.

States::

    queued -> running -> succeeded | failed | cancelled
    running --(server restart)--> interrupted --(resume)--> queued
    queued --(cancel)--> cancelled
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import math
import os
import threading
import uuid
from typing import Any, cast

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, create_engine, make_url, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINAL_STATES = ("succeeded", "failed", "cancelled")
LOG_TAIL_LINES = 200


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _finite(value: Any) -> Any:
    """``value`` with every NaN / infinity (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return _finite(o.tolist())
    return str(o)


def json_dumps(value: Any) -> str:
    """Strict JSON for every backend: non-finite floats become null, other objects their str()."""
    return json.dumps(_finite(value), allow_nan=False, default=_json_default, ensure_ascii=False)


def json_loads(text: str) -> Any:
    return json.loads(text, parse_constant=lambda _: None)  # rows written before NaN was mapped to null


def _no_nul(value: str | None) -> str | None:
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


class SafeText(TypeDecorator):
    """Text without NUL characters (PostgreSQL refuses them): each is replaced by U+FFFD."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return _no_nul(value)


class SafeString(TypeDecorator):
    """VARCHAR without NUL characters; also applied to query parameters (ids, filters)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return _no_nul(value)


def private_sqlite_file(url: str) -> None:
    """Create the SQLite file of ``url`` readable by its owner only (mode 600), or make an
    existing one so: job params and logs name the server's files. SQLite gives its journal and
    WAL files the database file's mode. Other backends (and in-memory SQLite) are left alone."""
    parsed = make_url(url)
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)  # mode applies only if the file is new
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077 and st.st_uid == os.getuid():  # another user's file: theirs to guard
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "sparkvision_jobs"

    id: Mapped[str] = mapped_column(SafeString(32), primary_key=True)
    kind: Mapped[str] = mapped_column(SafeString(32), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(SafeString(16), index=True, default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # percent, 0..100
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # latest live metrics
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the library's summary
    result_location: Mapped[str | None] = mapped_column(SafeText, nullable=True)  # output path
    error: Mapped[str | None] = mapped_column(SafeText, nullable=True)
    log: Mapped[str] = mapped_column(SafeText, default="")  # last LOG_TAIL_LINES lines
    cancel_requested: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    def to_json(self) -> dict[str, Any]:
        def iso(t: dt.datetime | None) -> str | None:
            return None if t is None else t.isoformat(timespec="seconds") + "Z"

        return {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "state": self.state,
            "progress": round(self.progress or 0.0, 1),
            "metrics": self.metrics or {},
            "result": self.result,
            "result_location": self.result_location,
            "error": self.error,
            "log_tail": (self.log or "").splitlines()[-50:],
            "attempts": self.attempts,
            "cancel_requested": bool(self.cancel_requested),
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


class JobStore:
    """Every read and write of the job table. Thread-safe: one short session per call."""

    def __init__(self, url: str = "sqlite:///sparkvision-jobs.db") -> None:
        kwargs: dict[str, Any] = {"json_serializer": json_dumps, "json_deserializer": json_loads}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
            if url in ("sqlite://", "sqlite:///:memory:"):
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
        else:
            kwargs["pool_pre_ping"] = True  # a database server restart must not break the next request
        self.url = url
        private_sqlite_file(url)
        self.engine = create_engine(url, **kwargs)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # Read-modify-write within this process: SQLite has no row locks (and pysqlite begins its
        # transaction only at the first write), so threads would lose each other's updates.
        self._lock = threading.RLock()

    def close(self) -> None:
        self.engine.dispose()

    def create(self, kind: str, params: dict[str, Any], result_location: str | None = None) -> Job:
        job = Job(
            id=uuid.uuid4().hex[:12],
            kind=kind,
            params=params,
            state="queued",
            progress=0.0,
            metrics={},
            log="",
            result_location=result_location,
            created_at=utcnow(),
            attempts=0,
            cancel_requested=0,
        )
        with self._session() as s, s.begin():
            s.add(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._session() as s:
            return s.get(Job, job_id)

    def list(
        self, state: str | None = None, kind: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[Job]:
        q = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
        if state:
            q = q.where(Job.state == state)
        if kind:
            q = q.where(Job.kind == kind)
        with self._session() as s:
            return list(s.scalars(q))

    def update(self, job_id: str, **fields: Any) -> None:
        with self._session() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id).values(**fields))

    def append_log(self, job_id: str, line: str) -> None:
        stamp = utcnow().strftime("%H:%M:%S")
        with self._lock, self._session() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                return
            lines = (job.log or "").splitlines() + [f"{stamp} {line}"]
            job.log = "\n".join(lines[-LOG_TAIL_LINES:])

    def claim_next(self) -> Job | None:
        """The oldest queued job, atomically moved to running (None if the queue is empty).

        Safe across processes: on PostgreSQL the candidate row is locked and rows other claimers
        hold are skipped (``FOR UPDATE SKIP LOCKED``); everywhere the update only applies while the
        job is still queued, and a lost race tries the next job instead of reporting an empty queue.
        """
        for _ in range(20):
            with self._lock, self._session() as s, s.begin():
                job_id = s.scalars(
                    select(Job.id)
                    .where(Job.state == "queued")
                    .order_by(Job.created_at, Job.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                if job_id is None:
                    return None
                # An UPDATE's result is a CursorResult; Session.execute is typed with the base Result.
                res = cast(
                    CursorResult[Any],
                    s.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.state == "queued")
                        .values(
                            state="running",
                            started_at=utcnow(),
                            finished_at=None,
                            attempts=Job.attempts + 1,
                            error=None,
                        )
                    ),
                )
            if res.rowcount == 1:
                return self.get(job_id)
        return None

    def finish(self, job_id: str, state: str, **fields: Any) -> None:
        assert state in FINAL_STATES or state == "interrupted"
        self.update(job_id, state=state, finished_at=utcnow(), **fields)

    def request_cancel(self, job_id: str) -> str:
        """Cancel a queued job at once; flag a running one for the runner. Returns the new state."""
        with self._lock, self._session() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                raise KeyError(job_id)
            if job.state in ("queued", "interrupted"):
                job.state, job.finished_at = "cancelled", utcnow()
            elif job.state == "running":
                job.cancel_requested = 1
            return job.state

    def requeue(self, job_id: str, params: dict[str, Any] | None = None) -> None:
        values: dict[str, Any] = {
            "state": "queued",
            "cancel_requested": 0,
            "finished_at": None,
            "error": None,
        }
        if params is not None:
            values["params"] = params
        self.update(job_id, **values)

    def mark_interrupted(self) -> builtins.list[str]:  # builtins: the method `list` shadows it here
        """On startup: jobs a previous server left running can never finish; say so."""
        with self._session() as s, s.begin():
            ids = list(s.scalars(select(Job.id).where(Job.state == "running")))
            if ids:
                s.execute(
                    update(Job)
                    .where(Job.id.in_(ids))
                    .values(
                        state="interrupted",
                        finished_at=utcnow(),
                        error="the server stopped while this job ran; "
                        "POST /api/jobs/{id}/resume to run it again",
                    )
                )
        return ids
