"""What ``--ship-env`` packs, checked without a cluster (tests/test_standalone.py ships the real
environment to a standalone cluster's executors).

The venv layout test packs a fresh, empty venv: the same code path as the 7 GB one, in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sparkvision.errors import ParamError
from sparkvision.spark import shipenv


def extract(archive: Path, dest: Path) -> None:
    """Unzip keeping the Unix modes, as Spark's unzip does (Python's extractall drops them)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            path = Path(zf.extract(info, dest))
            mode = info.external_attr >> 16
            if mode and not info.is_dir():
                path.chmod(mode & 0o7777)


def test_packed_venv_is_a_python_of_its_own(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    archive = tmp_path / "env.zip"
    shipenv.pack_venv(venv, archive)
    names = set(zipfile.ZipFile(archive).namelist())
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert {"bin/python", f"bin/python{version}", f"lib/python{version}/os.py"} <= names
    assert "pyvenv.cfg" not in names and not any(n.startswith("lib64") for n in names)
    assert not any(f"/python{version}/test/" in n or "/site-packages/pip/" in n for n in names)

    unpacked = tmp_path / "node" / "environment"
    extract(archive, unpacked)
    # A clean environment: no venv, no PYTHONPATH, only the unpacked directory.
    probe = "import os, sys; print(sys.prefix); print(os.__file__)"
    out = subprocess.run(
        [str(unpacked / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout.split()
    assert out == [str(unpacked), str(unpacked / "lib" / f"python{version}" / "os.py")]


def test_source_archive_is_the_package_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(shipenv.ENV_CACHE, str(tmp_path))
    first = shipenv.packed_source()
    assert first.parent == tmp_path / "envs" and first.name.startswith("src-")
    names = zipfile.ZipFile(first).namelist()
    assert "__init__.py" in names and "spark/shipenv.py" in names  # unpacked as ./sparkvision
    assert not any("__pycache__" in n for n in names)
    mtime = first.stat().st_mtime_ns
    assert shipenv.packed_source() == first and first.stat().st_mtime_ns == mtime


def test_fingerprint_follows_the_source_only_when_asked():
    assert shipenv.fingerprint("venv", with_source=True) == shipenv.fingerprint("venv", with_source=True)
    assert shipenv.fingerprint("venv", with_source=True) != shipenv.fingerprint("venv", with_source=False)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(shipenv.ENV_CACHE, str(tmp_path))
    assert shipenv.cache_dir() == tmp_path / "envs"
    monkeypatch.delenv(shipenv.ENV_CACHE)
    assert shipenv.cache_dir() == Path.home() / ".cache" / "sparkvision" / "envs"


def test_a_system_python_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)
    with pytest.raises(ParamError, match="is not in a virtual environment or a conda environment"):
        shipenv.ship_env_conf()


@pytest.mark.parametrize("module, packer", [("venv_pack", "pack_venv"), ("conda_pack", "pack_conda")])
def test_a_missing_packer_is_one_clear_error(monkeypatch, tmp_path, module, packer):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when it is not installed
    with pytest.raises(ParamError, match=r"pip install 'sparkvision\[cluster\]'"):
        getattr(shipenv, packer)(Path(sys.prefix), tmp_path / "x.zip")
    assert not os.path.exists(tmp_path / "x.zip")


def test_archives_of_environments_that_are_gone_are_pruned(tmp_path):
    import fcntl
    import time

    cache, alive = tmp_path / "envs", tmp_path / "venv"
    cache.mkdir()
    alive.mkdir()

    def archive(tag: str, prefix: Path | None, age_days: float = 0) -> Path:
        a = cache / f"env-{tag}-0123456789abcdef.zip"
        a.write_bytes(b"zip")
        if prefix is not None:
            (cache / f"env-{tag}.prefix").write_text(str(prefix))
        old = time.time() - age_days * 86400
        os.utime(a, (old, old))
        return a

    kept = archive("aaaaaaaa", alive)  # its environment exists
    gone = archive("bbbbbbbb", tmp_path / "deleted-venv")  # a deleted CI clone's
    legacy_new = archive("cccccccc", None, age_days=1)  # packed before records: kept a week
    legacy_old = archive("dddddddd", None, age_days=8)
    busy = archive("eeeeeeee", tmp_path / "also-deleted")
    with open(cache / f".{busy.name}.lock", "w") as lock:
        fcntl.flock(
            lock, fcntl.LOCK_EX
        )  # someone is shipping it (flock: per open file, so it counts here too)
        deleted = shipenv.prune_archives(cache)
    assert sorted(deleted) == sorted([gone, legacy_old])
    assert kept.exists() and legacy_new.exists() and busy.exists()
    assert not gone.exists() and not (cache / "env-bbbbbbbb.prefix").exists()
    assert (cache / "env-aaaaaaaa.prefix").exists()
