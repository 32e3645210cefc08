"""A Spark Connect server for the tests: the one that ships with pyspark, on 127.0.0.1.

``connect_server`` (session-scoped) starts ``sbin/start-connect-server.sh --wait`` from the
installed pyspark package (its ``jars/`` hold ``spark-connect_2.13``) with ``--master local[2]``
on a free port. Its Python workers run this interpreter (the venv), with the repository on their
``PYTHONPATH``. Its pid, log, conf, scratch and warehouse directories are under the test's
temporary directory, so nothing is left in the pyspark installation or the user's ``/tmp``. It
is stopped after the tests: SIGTERM to its process group (the JVM stops its Python workers as it
exits), a wait until the JVM and the workers are gone, SIGKILL after a grace period: no JVM or
Python worker is left running.

Imported by ``tests/conftest.py`` for its fixture.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyspark
import pytest

SPARK_HOME = Path(pyspark.__file__).resolve().parent
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240  # a cold JVM on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class ConnectServer:
    """A running server; :attr:`url` is what ``--remote`` takes."""

    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"sc://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's process group, then wait until the JVM and its Python daemons
        (each in a group of its own) are gone; SIGKILL whatever is left after ``grace_s``."""
        procs = [self.proc.pid, *descendants(self.proc.pid)]
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while any(alive(p) for p in procs) and time.monotonic() < deadline:
            self.proc.poll()  # reap the script, the group's leader
            time.sleep(0.2)
        for pid in procs:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux: from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_connect_server(workdir: Path, cores: int = 2, driver_memory: str = "2g") -> ConnectServer:
    """Start the server and wait until its gRPC port answers; its log is ``workdir/server.log``."""
    dirs = {name: workdir / name for name in ("pid", "logs", "conf", "local", "warehouse")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    python = sys.executable
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {
        **os.environ,
        "SPARK_HOME": str(SPARK_HOME),
        "SPARK_CONF_DIR": str(dirs["conf"]),  # empty: no spark-defaults.conf from elsewhere
        "SPARK_PID_DIR": str(dirs["pid"]),
        "SPARK_LOG_DIR": str(dirs["logs"]),
        "SPARK_LOCAL_DIRS": str(dirs["local"]),
        "SPARK_IDENT_STRING": "sparkvision-tests",
        "PYSPARK_PYTHON": python,
        "PYTHONPATH": pythonpath,
    }
    env.pop("SPARK_REMOTE", None)
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    settings = {
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
        "spark.pyspark.python": python,
        "spark.executorEnv.PYTHONPATH": pythonpath,
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.local.dir": str(dirs["local"]),
        "spark.sql.warehouse.dir": str(dirs["warehouse"]),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "3",
        "spark.connect.progress.reportInterval": "500ms",
    }
    cmd = [
        str(SPARK_HOME / "sbin" / "start-connect-server.sh"),
        "--wait",  # stay in the foreground: this process is the server, stopped through its group
        "--master",
        f"local[{cores}]",
        "--driver-memory",
        driver_memory,
    ]
    for key, value in settings.items():
        cmd += ["--conf", f"{key}={value}"]
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches the JVM below the script
        )
    server = ConnectServer(port, proc, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the Spark Connect server did not start on port {port}:\n{server.log_tail()}")
        time.sleep(0.25)
    return server


@pytest.fixture(scope="session")
def connect_server(tmp_path_factory):
    """One Spark Connect server (``local[2]``) for the whole test session."""
    server = start_connect_server(tmp_path_factory.mktemp("connect_server"))
    try:
        yield server
    finally:
        server.stop()
