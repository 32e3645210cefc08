"""The driver's output sink: a training job's files under ``--out``, written by the driver for rank 0.

Why a sink. ``--out`` may be any URI Spark writes (``hdfs://``, ``s3a://``, ``abfss://``,
``gs://``, a scheme the cluster configures), but the ranks run in executors' Python, which has no
JVM and so no Hadoop FileSystem, nor the cluster's connectors and credentials that come with it.
``pyarrow.fs`` on the executors would cover some schemes, with credentials set up a second time,
and none that only Hadoop's client knows. Writing to a local path and copying afterwards would
lose every checkpoint of a run whose executor dies, which is when checkpoints matter. The driver
does hold the session's Hadoop FileSystem (or, as a Spark Connect client, ``pyarrow.fs``); so for
the length of the job it runs this sink: a thread with a TCP server on the driver's host that
performs the ranks' writes, reads, listings and deletes on the run's
:class:`~sparkvision.spark.filestore.Store`. A rank holds a :class:`SinkStore`, the same protocol
over a socket. Local paths go through the sink too (the driver writes them with ``os``): one code
path, and a plain ``--out`` on a multi-node cluster then lands on the driver's disk instead of
needing a shared mount. The cost is one loopback or LAN copy of what rank 0 writes, which is
small beside the epoch it follows; reading a checkpoint on resume costs one copy per rank.

Security and bounds. The server accepts a request only with the job's 256-bit token (from the
rank payload, compared in constant time), confines paths to relative names under the run's root
(:func:`~sparkvision.spark.filestore.check_rel`), and moves data in frames of at most two
:data:`~sparkvision.spark.filestore.CHUNK` s, so a file of any size (the final weights, a large
checkpoint) never sits whole in the driver's memory nor travels inside a collected row. It binds
the address Spark's driver binds; Spark Connect clients bind every interface and advertise
``$SPARKVISION_SINK_HOST`` (else this host's address), as the executors must reach the client.

Progress. Rank 0 sends its progress (every 20 steps) here rather than to a file the driver
polls: the driver's progress bar reads :attr:`OutputSink.progress`, and the sink also writes it to
the progress file under ``--out`` (at most once a second) for other readers (the web app).

Wire format: every message is a frame, a 4-byte big-endian length and that many bytes. A request
is a JSON header frame (``token``, ``op``, ``path``), for ``put`` followed by data frames and an
empty frame; a reply is a JSON frame (``ok``, ``error``, ``missing``), for ``get`` followed by
data frames and an empty frame.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyspark.sql import SparkSession

from sparkvision.spark.filestore import CHUNK, Store, Write, check_rel, join, write_bytes
from sparkvision.spark.session import is_connect

HEADER_MAX = 1 << 16
FRAME_MAX = 2 * CHUNK
TIMEOUT_S = 600.0  # one frame's wait: a slow store (an object store's upload) must not cut a rank off
PROGRESS_EVERY_S = 1.0
ENV_SINK_HOST = "SPARKVISION_SINK_HOST"


class SinkError(OSError):
    """The sink refused or failed an operation; the message is the driver's one line."""


def _send(sock: socket.socket, data: bytes) -> None:
    if len(data) < 1 << 16:  # one packet for headers and small frames
        sock.sendall(struct.pack(">I", len(data)) + data)
    else:  # no copy of a large chunk just to prefix its length
        sock.sendall(struct.pack(">I", len(data)))
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(n - len(buf), 1 << 20))
        if not part:
            raise ConnectionError("the output sink connection closed mid-message")
        buf += part
    return bytes(buf)


def _recv(sock: socket.socket, limit: int) -> bytes:
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > limit:
        raise ConnectionError(f"output sink frame of {n} bytes is over the {limit} allowed")
    return _recv_exact(sock, n)


def _send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    _send(sock, json.dumps(obj).encode())


def _recv_json(sock: socket.socket) -> dict[str, Any]:
    obj = json.loads(_recv(sock, HEADER_MAX))
    if not isinstance(obj, dict):
        raise ConnectionError("malformed output sink message")
    return obj


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    sink: OutputSink


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(TIMEOUT_S)
        try:
            head = _recv_json(sock)
        except (OSError, ValueError):
            return
        sink = self.server.sink
        if not hmac.compare_digest(str(head.get("token", "")).encode(), sink.token.encode()):
            return  # not this job's: close without a word
        try:
            sink.serve(sock, head)
        except (ConnectionError, TimeoutError):
            return  # the rank went away; a half-sent put was aborted by its writer
        except Exception as e:  # noqa: BLE001 - the rank gets the driver's reason in one line
            try:
                _send_json(sock, {"ok": False, "error": _one_line(e)})
            except OSError:
                pass


class OutputSink:
    """Serves ``store`` to a job's ranks for the length of a ``with`` block.

    ``ticket`` goes into the rank payload (address and token); ``progress`` is rank 0's latest
    progress report, also written to ``progress_file`` in the store.
    """

    def __init__(self, store: Store, bind: str, advertise: str, progress_file: str = "progress.json") -> None:
        self.store, self.progress_file = store, progress_file
        self.token = secrets.token_hex(32)
        self.progress: dict[str, Any] | None = None
        self._written_at, self._pending = 0.0, False
        self._lock = threading.Lock()
        self._server = _Server((bind, 0), _Handler, bind_and_activate=True)
        self._server.sink = self
        self.address = f"{advertise}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,), daemon=True)

    @property
    def ticket(self) -> dict[str, str]:
        return {"address": self.address, "token": self.token}

    def renew(self) -> dict[str, str]:
        """A new token (and ticket) for a relaunched job: ranks of the lost attempt that are still
        alive somewhere can no longer write."""
        self.token = secrets.token_hex(32)
        return self.ticket

    def __enter__(self) -> OutputSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._pending:
            self._write_progress()

    def serve(self, sock: socket.socket, head: dict[str, Any]) -> None:
        op, rel = head.get("op"), check_rel(str(head.get("path", "")))
        if op == "put":
            with self.store.writer(rel) as write:
                while frame := _recv(sock, FRAME_MAX):
                    write(frame)
            _send_json(sock, {"ok": True})
        elif op == "get":
            chunks = iter(self.store.reader(rel))
            try:
                first = next(chunks, b"")
            except FileNotFoundError:
                _send_json(sock, {"ok": False, "missing": True, "error": f"{rel} does not exist"})
                return
            _send_json(sock, {"ok": True})
            if first:
                _send(sock, first)
                for chunk in chunks:
                    _send(sock, chunk)
            _send(sock, b"")
        elif op == "list":
            _send_json(sock, {"ok": True, "names": self.store.list(rel)})
        elif op == "exists":
            _send_json(sock, {"ok": True, "exists": self.store.exists(rel)})
        elif op == "delete":
            self.store.delete(rel)
            _send_json(sock, {"ok": True})
        elif op == "progress":
            self.report(head.get("progress"))
            _send_json(sock, {"ok": True})
        else:
            _send_json(sock, {"ok": False, "error": f"unknown operation {op!r}"})

    def report(self, progress: Any) -> None:
        """Keep rank 0's latest ``progress`` and write it out, at most once a second."""
        if not isinstance(progress, dict):
            return
        with self._lock:
            self.progress = progress
            self._pending = True
            due = time.monotonic() - self._written_at >= PROGRESS_EVERY_S
        if due:
            self._write_progress()

    def _write_progress(self) -> None:
        with self._lock:
            progress, self._pending, self._written_at = self.progress, False, time.monotonic()
        if progress is not None:
            write_bytes(self.store, self.progress_file, json.dumps(progress).encode())


def sink_address(spark: SparkSession) -> tuple[str, str]:
    """``(bind, advertise)``: where the sink listens and the host the executors are told.

    A classic driver's own address (``spark.driver.bindAddress`` / ``spark.driver.host``: the
    executors already reach it there). A Spark Connect client: every interface, advertised as
    ``$SPARKVISION_SINK_HOST`` or this host's address.
    """
    if not is_connect(spark):
        host = str(spark.conf.get("spark.driver.host", None) or socket.gethostname())
        return str(spark.conf.get("spark.driver.bindAddress", None) or host), host
    advertise = os.environ.get(ENV_SINK_HOST)
    if not advertise:
        try:
            advertise = socket.gethostbyname(socket.gethostname())
        except OSError:
            advertise = "127.0.0.1"
    return "0.0.0.0", advertise


class SinkStore:
    """A rank's :class:`~sparkvision.spark.filestore.Store`: every operation done by the driver's sink."""

    def __init__(self, ticket: dict[str, str], root: str = "") -> None:
        self.ticket, self.root = dict(ticket), root
        host, _, port = ticket["address"].rpartition(":")
        self._where = (host, int(port))

    def child(self, rel: str) -> SinkStore:
        return SinkStore(self.ticket, join(self.root, check_rel(rel)))

    def __repr__(self) -> str:
        return f"SinkStore({self.ticket['address']}, {self.root!r})"

    def _open(self, op: str, rel: str, **extra: Any) -> socket.socket:
        sock = socket.create_connection(self._where, timeout=TIMEOUT_S)
        path = join(self.root, check_rel(rel))
        _send_json(sock, {"token": self.ticket["token"], "op": op, "path": path, **extra})
        return sock

    def _call(self, op: str, rel: str = "", **extra: Any) -> dict[str, Any]:
        with self._open(op, rel, **extra) as sock:
            return _reply(_recv_json(sock), rel)

    def reader(self, rel: str) -> Iterator[bytes]:
        with self._open("get", rel) as sock:
            _reply(_recv_json(sock), rel)
            while chunk := _recv(sock, FRAME_MAX):
                yield chunk

    @contextmanager
    def writer(self, rel: str) -> Iterator[Write]:
        with self._open("put", rel) as sock:

            def write(data: bytes) -> None:
                try:
                    for i in range(0, len(data), CHUNK):
                        _send(sock, bytes(data[i : i + CHUNK]))
                except OSError:  # the driver gave up on the file: its reply says why
                    _reply(_recv_json(sock), rel)
                    raise

            yield write  # an exception here closes the socket: the driver aborts the file
            _send(sock, b"")
            _reply(_recv_json(sock), rel)

    def list(self, rel: str = "") -> list[str]:
        return [str(n) for n in self._call("list", rel)["names"]]

    def delete(self, rel: str) -> None:
        self._call("delete", rel)

    def exists(self, rel: str) -> bool:
        return bool(self._call("exists", rel)["exists"])

    def progress(self, obj: dict[str, Any]) -> None:
        """Rank 0's live progress, for the driver's bar (and the progress file)."""
        self._call("progress", progress=obj)


def _reply(reply: dict[str, Any], rel: str) -> dict[str, Any]:
    if reply.get("ok"):
        return reply
    if reply.get("missing"):
        raise FileNotFoundError(rel)
    raise SinkError(f"output sink: {reply.get('error', 'failed')} ({rel})")
