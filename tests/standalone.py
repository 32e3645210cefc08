"""A real Spark standalone cluster for the tests: one master and two workers on 127.0.0.1.

``local-cluster[...]`` runs executors in separate JVMs but still inside Spark's test harness; a
user's cluster is a master and workers started with ``spark-class``, each worker launching
executors in its own work dir. This fixture starts exactly that from the pyspark installation
(pip's pyspark ships ``bin/spark-class`` and the jars), so the tests exercise the same scheduling,
executor launch, file shipping (``spark.archives``) and executor loss as a real cluster.

The daemons get a clean environment (no ``PYSPARK_PYTHON``, ``PYTHONPATH``, ``VIRTUAL_ENV`` or venv
on ``PATH``), like a cluster node that never saw the driver's venv: which Python the executors run
is decided by the application (the driver's ``PYSPARK_PYTHON``, or ``--ship-env``).

Each daemon runs in its own process group, and the executors and their Python workers are its
children, so stopping kills every group and checks nothing is left, even after a test SIGKILLed an
executor.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyspark
import pytest

SPARK_HOME = Path(pyspark.__file__).parent
EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"
WORKERS = 2
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_env(local_dir: Path) -> dict[str, str]:
    """This process's environment without anything that points at the driver's Python."""
    venv = Path(sys.prefix)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH", "VIRTUAL_ENV", "SPARK_REMOTE")
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).is_relative_to(venv)
    )
    env.update(
        SPARK_HOME=str(SPARK_HOME),
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_LOCAL_DIRS=str(local_dir),  # shuffle/block files, under the test's tmp dir
        SPARK_DAEMON_MEMORY="512m",
    )
    return env


def read_proc(pid: int) -> tuple[int, str] | None:
    """(parent pid, command line) of a live process, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ")".
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    return ppid, cmdline


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StandaloneCluster:
    """A master and its workers; what a test needs to point a job at them and to break them."""

    root: Path
    master_port: int = field(default_factory=free_port)
    webui_port: int = field(default_factory=free_port)
    work_dirs: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    @property
    def webui_url(self) -> str:
        return f"http://127.0.0.1:{self.webui_port}"

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs[1:]]

    def start(self, workers: int = WORKERS, cores: int = 1, memory: str = "2g") -> StandaloneCluster:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = daemon_env(self.root / "local")
        spark_class = str(SPARK_HOME / "bin" / "spark-class")
        self.launch(
            [
                spark_class,
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.master_port),
                "--webui-port",
                str(self.webui_port),
            ],
            logs / "master.log",
            env,
        )
        for i in range(workers):
            work = self.root / f"worker{i}"
            work.mkdir(parents=True, exist_ok=True)
            self.work_dirs.append(work)
            self.launch(
                [
                    spark_class,
                    "org.apache.spark.deploy.worker.Worker",
                    self.master_url,
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    str(cores),
                    "--memory",
                    memory,
                    "--work-dir",
                    str(work),
                    "--webui-port",
                    "0",
                ],
                logs / f"worker{i}.log",
                env,
            )
        self.wait(lambda s: s.get("aliveworkers", 0) >= workers, f"{workers} workers to register")
        return self

    def launch(self, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        with open(log, "wb") as out:  # the child keeps its own descriptor
            # spark-class ends in `exec java ...`: the pid is the JVM's, and the new session makes it
            # the leader of a group that its executors and their Python workers join.
            self.procs.append(
                subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
                )
            )

    def state(self) -> dict:
        """The master's view (``/json/``): workers, alive workers, active and completed apps."""
        with urllib.request.urlopen(f"{self.webui_url}/json/", timeout=5) as r:
            return json.loads(r.read())

    def wait(self, ready, what: str, timeout: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Spark daemon exited ({dead[0].args[1]}):\n{self.log_tail()}")
            try:
                s = self.state()
                if ready(s):
                    return s
            except OSError:
                pass  # the master's web UI is not up yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.log_tail()}")
            time.sleep(0.3)

    def executor_pids(self) -> list[int]:
        """PIDs of the live executor JVMs our workers launched (the running application's)."""
        workers = set(self.worker_pids)
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            info = read_proc(int(entry.name))
            if info and info[0] in workers and EXECUTOR_CLASS in info[1]:
                pids.append(int(entry.name))
        return sorted(pids)

    def wait_executors(self, n: int, timeout: float = START_TIMEOUT_S) -> list[int]:
        """Block until ``n`` executor JVMs run (an application has started on every worker)."""
        deadline = time.monotonic() + timeout
        while len(pids := self.executor_pids()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pids)} of {n} executors after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)
        return pids

    def wait_no_executors(self, timeout: float = 60.0) -> None:
        """Block until the workers have stopped every executor (an application has ended)."""
        deadline = time.monotonic() + timeout
        while pids := self.executor_pids():
            if time.monotonic() > deadline:
                raise RuntimeError(f"executors {pids} still run {timeout:.0f}s after their application")
            time.sleep(0.2)

    def clean_apps(self) -> None:
        """Delete the work dirs of applications that have finished (a shipped environment is
        unpacked in each executor's dir, gigabytes that no later test needs). The fixture's own
        stop deletes everything; workers' ``spark.worker.cleanup`` would only do so days later."""
        self.wait_no_executors()
        try:
            running = {a["id"] for a in self.state().get("activeapps", [])}
        except OSError:
            running = set()
        for work in self.work_dirs:
            for app in work.glob("app-*"):
                if app.name not in running:
                    shutil.rmtree(app, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted((self.root / "logs").glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)

    def stop(self) -> None:
        """Kill every daemon's process group (executors and Python workers included) and wait
        until no process of them is left."""
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            for p in self.procs:
                if group_alive(p.pid):
                    os.killpg(p.pid, sig)
            deadline = time.monotonic() + grace
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            while any(group_alive(p.pid) for p in self.procs) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not any(group_alive(p.pid) for p in self.procs):
                break
        left = [p.pid for p in self.procs if group_alive(p.pid)]
        for work in self.work_dirs:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(self.root / "local", ignore_errors=True)
        if left:
            raise RuntimeError(f"Spark daemon process groups still alive after SIGKILL: {left}")


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """One master and two 1-core workers for the whole session; ``.master_url`` is what a test
    passes as ``--master``."""
    cluster = StandaloneCluster(tmp_path_factory.mktemp("standalone"))
    atexit.register(cluster.stop)  # also when pytest is interrupted before the teardown runs
    try:
        cluster.start()
    except (OSError, RuntimeError) as e:
        cluster.stop()
        pytest.fail(f"could not start the standalone cluster: {e}", pytrace=False)
    try:
        yield cluster
    finally:
        atexit.unregister(cluster.stop)
        cluster.stop()
