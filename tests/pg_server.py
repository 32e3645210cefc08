"""A throwaway PostgreSQL server for the tests: initdb + postgres in a temp folder, trust auth on loopback.

Used by the ``postgres_server`` / ``postgres_url`` fixtures in ``conftest.py``. The server:

- lives in ``tempfile.mkdtemp()`` (data dir, log, unix socket), removed on :meth:`PgServer.stop`;
- listens on 127.0.0.1 on a free port (and on a unix socket in that folder), ``trust`` auth, user
  ``postgres``; durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``): it is thrown
  away anyway;
- runs as the ``postgres`` system user when the tests run as root (``initdb`` refuses root); as the
  current user otherwise;
- is a child of the test process (``postgres`` started directly, not through ``pg_ctl``, so it is
  waited for and reaped), and a small watchdog process stops it if the test process dies without
  tearing down (SIGKILL, a hard timeout): no server outlives the tests.

The binaries are found in ``$SPARKVISION_PG_BIN``, then ``pg_config --bindir``, then the newest
``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql`` package).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

NEEDED = ("initdb", "postgres")


def find_pg_bin() -> str | None:
    """The folder holding ``initdb`` and ``postgres``, or None."""
    candidates = []
    if os.environ.get("SPARKVISION_PG_BIN"):
        candidates.append(os.environ["SPARKVISION_PG_BIN"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> float:
        try:
            return float(path.rstrip("/").split("/")[-2])
        except ValueError:
            return 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(initdb))
    for d in candidates:
        if d and all(os.access(os.path.join(d, exe), os.X_OK) for exe in NEEDED):
            return d
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServerError(RuntimeError):
    pass


# Run by the watchdog: wait for the test process to go, then stop the server and remove its folder.
WATCHDOG = """
import os, shutil, signal, sys, time
parent, server, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
while alive(parent):
    time.sleep(1)
if alive(server):
    os.kill(server, signal.SIGQUIT)
    for _ in range(100):
        time.sleep(0.1)
        if not alive(server):
            break
    else:
        os.kill(server, signal.SIGKILL)
shutil.rmtree(tmp, ignore_errors=True)
"""


class PgServer:
    """One throwaway server; :meth:`start` then :meth:`stop` (idempotent, always safe to call)."""

    def __init__(self, bindir: str, start_timeout_s: float = 60) -> None:
        self.bindir = bindir
        self.start_timeout_s = start_timeout_s
        self.tmp: str | None = None
        self.port: int | None = None
        self.user = "postgres"  # the database superuser initdb creates
        self._creds: dict = {}  # user/group for subprocess when we are root
        self._proc: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None

    @property
    def data(self) -> str:
        return os.path.join(self.tmp, "data")

    @property
    def logfile(self) -> str:
        return os.path.join(self.tmp, "server.log")

    def _exe(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PgServer:
        import psycopg

        self.tmp = tempfile.mkdtemp(prefix="sparkvision-pg-")
        try:
            if os.geteuid() == 0:
                try:
                    pw = pwd.getpwnam("postgres")
                except KeyError:
                    raise PgServerError(
                        "running as root and there is no 'postgres' user to run the server as"
                    ) from None
                os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
                self._creds = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            with open(os.path.join(self.tmp, "initdb.log"), "w+b") as out:
                try:
                    p = subprocess.run(
                        [
                            self._exe("initdb"),
                            "-D",
                            self.data,
                            "-U",
                            self.user,
                            "-A",
                            "trust",
                            "-E",
                            "UTF8",
                            "--locale=C",
                            "--no-sync",
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=self.tmp,
                        timeout=120,
                        **self._creds,
                    )
                except subprocess.TimeoutExpired as e:
                    raise PgServerError("initdb took more than 120 s") from e
                if p.returncode != 0:
                    out.seek(0)
                    raise PgServerError(
                        f"initdb failed ({p.returncode}):\n{out.read().decode(errors='replace')}"
                    )
            last = ""
            for _ in range(3):  # a port found free may be taken before the server binds it
                self.port = free_port()
                with open(self.logfile, "ab") as log:
                    self._proc = subprocess.Popen(
                        [
                            self._exe("postgres"),
                            "-D",
                            self.data,
                            "-p",
                            str(self.port),
                            "-k",
                            self.tmp,
                            "-c",
                            "listen_addresses=127.0.0.1",
                            "-c",
                            "fsync=off",
                            "-c",
                            "synchronous_commit=off",
                            "-c",
                            "full_page_writes=off",
                            "-c",
                            "max_connections=40",
                            "-c",
                            "shared_buffers=16MB",
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=self.tmp,
                        start_new_session=True,
                        **self._creds,
                    )  # Ctrl-C goes to pytest, which tears down
                self._start_watchdog()
                deadline = time.monotonic() + self.start_timeout_s
                while time.monotonic() < deadline and self._proc.poll() is None:
                    try:
                        psycopg.connect(self.conninfo(), connect_timeout=5).close()
                        return self
                    except psycopg.OperationalError:
                        time.sleep(0.2)
                last = self._log_tail()
                if self._proc.poll() is None:
                    raise PgServerError(
                        f"postgres did not accept connections within {self.start_timeout_s:.0f} s:\n{last}"
                    )
                self._reap()
            raise PgServerError(f"postgres would not start:\n{last}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (fast shutdown, then immediate, then SIGKILL) and remove its folder."""
        self._reap()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _reap(self) -> None:
        if self._proc is not None:
            for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGQUIT, 10), (signal.SIGKILL, 10)):
                if self._proc.poll() is not None:
                    break
                try:
                    self._proc.send_signal(sig)
                    self._proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    continue
                except OSError:
                    break
            self._proc = None
        if self._watchdog is not None:
            if self._watchdog.poll() is None:
                self._watchdog.kill()
            self._watchdog.wait(10)
            self._watchdog = None

    def _start_watchdog(self) -> None:
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(self._proc.pid), self.tmp],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
        )

    def _log_tail(self) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ databases
    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        name = "sv_test_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
