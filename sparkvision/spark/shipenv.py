"""Pack this Python environment and ship it to the executors (``--ship-env``).

On a cluster whose nodes lack the package (YARN, Kubernetes, a standalone cluster of bare
machines) the executors need the driver's Python, torch and sparkvision. PySpark's answer is
``spark.archives``: an archive of the environment that every executor downloads and unpacks in its
working directory as ``./environment``, and ``spark.pyspark.python=./environment/bin/python``.

What this adds to a plain ``venv-pack``/``conda-pack`` call, and why:

* **The interpreter travels too.** A venv's ``bin/python`` is an absolute symlink to the Python it
  was made from, which a node need not have (venv-pack's documented caveat). So a venv's archive
  carries the base interpreter, its standard library and, for a shared build, ``libpython``
  beside it, with ``bin/python`` a two-line launcher that finds that library: a self-contained
  Python that needs only the same OS and CPU architecture as the driver. A conda environment holds
  its own interpreter already.
* **sparkvision itself goes too, even from an editable install** (``pip install -e``), whose hook
  in site-packages points at a source directory on the driver that no node has. The hook is left
  out, and the source travels in a second, small archive unpacked as ``./sparkvision`` beside the
  environment (PySpark puts an executor's working directory on its workers' ``sys.path``). Kept
  apart so that editing the code repacks a few hundred kilobytes, not the environment.
* **Packed once, reused.** A large torch environment takes a while to pack, so the archives are
  kept under ``$SPARKVISION_CACHE/envs`` (default ``~/.cache/sparkvision/envs``), named by a
  fingerprint: of the Python version and every installed distribution and version for the
  environment, of the files for the source. A later run with the same environment ships the
  same file. Archives of environments that no longer exist are deleted when another is packed
  (:func:`prune_archives`): each environment path has its own, several gigabytes each.
* **An uncompressed zip.** Spark unpacks it on the driver and on every executor of every run, so
  making and unpacking it should be a plain copy: compressing a multi-gigabyte torch environment
  takes minutes and saves little on a cluster's network. Not a ``.tar``: Spark 4 unpacks a plain
  tar in Java, which drops the executable bits (``./environment/bin/python``: "Permission
  denied") and refuses links; its zip unpacking keeps them (``.tar.gz`` goes through the ``tar``
  command and keeps them too, but must be gzipped). Zip stores no links: each is stored as the
  file it points to, and the venv's ``lib64 -> lib`` is left out.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import sparkvision
from sparkvision.errors import ParamError

ENV_CACHE = "SPARKVISION_CACHE"
ARCHIVE_ALIAS = "environment"  # the directory each executor unpacks the archive into
SOURCE_ALIAS = "sparkvision"  # an editable install's source: importable from the executor's directory
# Bump when what goes into an archive changes, so that cached archives are rebuilt.
LAYOUT_VERSION = 3

# Left out of every archive; each needs a reason the executors can do without it.
EXCLUDE = (
    # The executor JVM runs the cluster's own Spark, and its Python workers import pyspark from the
    # cluster's SPARK_HOME/python/lib/pyspark.zip, which Spark puts first on their PYTHONPATH; the
    # jars (about 460 MB) are read only by a JVM that pyspark launches on a driver.
    "lib/python*/site-packages/pyspark/jars/*",
    # The browser driver of sparkvision's `test` extra: no executor code imports it.
    "lib/python*/site-packages/playwright/*",
    # torch.compile's GPU code generator (about 0.9 GB). torch imports it only when compiling, and
    # sparkvision never compiles: eager torch runs the same on CPUs and GPUs without it.
    "lib/python*/site-packages/triton/*",
)
# Parts of the base interpreter's standard library that no executor task uses: the CPython test
# suite, the IDE, Tk, pip's bootstrap wheels, and the static library and Makefile for building
# extensions. Its site-packages are not the venv's and are invisible to it, so they stay behind too.
STDLIB_SKIP = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip"}


def ship_env_conf() -> dict[str, str]:
    """The Spark settings that ship this environment: the archives and the interpreter in them."""
    archives = [f"{packed_environment()}#{ARCHIVE_ALIAS}"]
    if editable_sparkvision():
        archives.append(f"{packed_source()}#{SOURCE_ALIAS}")
    return {"spark.archives": ",".join(archives), "spark.pyspark.python": f"./{ARCHIVE_ALIAS}/bin/python"}


def cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE)
    return Path(root) / "envs" if root else Path.home() / ".cache" / "sparkvision" / "envs"


def environment_kind() -> str:
    """``conda`` or ``venv`` for the interpreter running this process; anything else cannot be
    packed (a system Python's packages are mixed with the operating system's)."""
    if (Path(sys.prefix) / "conda-meta").is_dir():
        return "conda"
    if sys.prefix != sys.base_prefix:
        return "venv"
    raise ParamError(
        "ship_env",
        f"{sys.executable} is not in a virtual environment or a conda environment, so there is "
        "nothing to pack: install sparkvision in one (python -m venv ENV) and run it from there",
    )


def packed_environment() -> Path:
    """The archive of this environment, packed now unless the cache already holds it."""
    kind = environment_kind()
    prefix = Path(sys.prefix)
    out_dir = cache_dir()
    fp = fingerprint(kind, with_source=not editable_sparkvision())
    tag = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:8]
    archive = out_dir / f"env-{tag}-{fp}.zip"
    if not archive.exists():
        make_dir(out_dir)
        with open(out_dir / f".{archive.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be packing the same environment
            if not archive.exists():
                pack(kind, prefix, archive)
                (out_dir / f"env-{tag}.prefix").write_text(str(prefix.resolve()))
                for old in out_dir.glob(f"env-{tag}-*.zip"):  # earlier versions of this environment
                    if old != archive:
                        old.unlink(missing_ok=True)
                        (out_dir / f".{old.name}.lock").unlink(missing_ok=True)
            prune_archives(out_dir)
    say(f"shipping the Python environment {archive} ({archive.stat().st_size / 1e9:.1f} GB) to the executors")
    return archive


def prune_archives(out_dir: Path, max_age_s: float = 7 * 86400) -> list[Path]:
    """Delete the archives of environments that are gone; returns what was deleted.

    Each environment path gets its own multi-gigabyte archive, so a machine that makes throwaway
    environments (a CI job's fresh clone, a deleted venv) would fill its disk with them. An
    archive goes when the environment it was packed from (``env-TAG.prefix``) no longer exists, or,
    for an archive without that record, when it is older than ``max_age_s``; never while another
    process holds its lock (it may be packing or shipping it).
    """
    deleted = []
    for archive in out_dir.glob("env-*-*.zip"):
        tag = archive.name.split("-")[1]
        record = out_dir / f"env-{tag}.prefix"
        try:
            gone = (
                not Path(record.read_text().strip()).exists()
                if record.exists()
                else time.time() - archive.stat().st_mtime > max_age_s
            )
        except OSError:
            continue
        if not gone:
            continue
        with open(out_dir / f".{archive.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use
            archive.unlink(missing_ok=True)
        (out_dir / f".{archive.name}.lock").unlink(missing_ok=True)
        if not any(out_dir.glob(f"env-{tag}-*.zip")):
            record.unlink(missing_ok=True)
        deleted.append(archive)
    if deleted:
        say(f"deleted {len(deleted)} archive(s) of environments that no longer exist from {out_dir}")
    return deleted


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParamError("ship_env", f"cannot create the cache {path} (set ${ENV_CACHE}): {e}") from None


def say(message: str) -> None:
    print(f"sparkvision: {message}", file=sys.stderr, flush=True)


def fingerprint(kind: str, with_source: bool) -> str:
    """Changes whenever the environment would pack differently: its Python, its distributions and
    their versions, and sparkvision's files when they are inside it (a reinstall of changed code
    may keep the version)."""
    h = hashlib.sha256(f"{LAYOUT_VERSION}\n{kind}\n{sys.prefix}\n{sys.version}\n".encode())
    site = [p for p in sys.path if p.startswith(sys.prefix) and p.endswith("site-packages")]
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions(path=site))
    h.update("\n".join(dists).encode())
    if with_source:
        h.update(source_hash().encode())
    return h.hexdigest()[:16]


def source_hash() -> str:
    h = hashlib.sha256()
    root = package_dir()
    for path in source_files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def packed_source() -> Path:
    """A zip of an editable install's package directory (``__init__.py`` at its root), written
    once per version of the source."""
    out_dir = cache_dir()
    archive = out_dir / f"src-{source_hash()}.zip"
    if not archive.exists():
        make_dir(out_dir)
        root = package_dir()
        tmp = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                for path in source_files(root):
                    zf.write(path, path.relative_to(root).as_posix())
            os.replace(tmp, archive)
        except OSError as e:
            raise ParamError("ship_env", f"could not write {archive}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        for old in out_dir.glob("src-*.zip"):  # earlier versions of the source
            if old != archive:
                old.unlink(missing_ok=True)
    return archive


def package_dir() -> Path:
    return Path(sparkvision.__file__).resolve().parent


def source_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path


def site_packages_target() -> str:
    """Where a package goes inside the archive: ``lib/pythonX.Y/site-packages``."""
    return f"lib/python{python_version()}/site-packages"


def editable_sparkvision() -> bool:
    """Whether sparkvision is imported from outside the environment (``pip install -e``)."""
    return not package_dir().is_relative_to(Path(sys.prefix).resolve())


def pack(kind: str, prefix: Path, archive: Path) -> None:
    """Write the archive next to its final name, then move it there (no half-written archive is
    ever found by a later run)."""
    size = sum(f.stat().st_size for f in prefix.rglob("*") if f.is_file() and not f.is_symlink())
    say(
        f"packing the Python environment {prefix} ({size / 1e9:.1f} GB) for the executors into "
        f"{archive}; this takes a while, once for each change of the environment"
    )
    start = time.monotonic()
    tmp = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")
    try:
        if kind == "conda":
            pack_conda(prefix, tmp)
        else:
            pack_venv(prefix, tmp)
        os.replace(tmp, archive)
    except OSError as e:
        raise ParamError("ship_env", f"could not write {archive}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    say(f"packed {archive.stat().st_size / 1e9:.1f} GB in {time.monotonic() - start:.0f}s")


def pack_conda(prefix: Path, out: Path) -> None:
    try:
        import conda_pack
    except ImportError:
        raise ParamError(
            "ship_env", "packing a conda environment needs conda-pack: pip install 'sparkvision[cluster]'"
        ) from None
    env = conda_pack.CondaEnv.from_prefix(str(prefix), ignore_editable_packages=editable_sparkvision())
    for pattern in EXCLUDE + editable_hooks():
        env = env.exclude(pattern)
    # compress_level=0: conda-pack's zip always deflates, and level 0 only frames the bytes.
    env.pack(output=str(out), format="zip", compress_level=0, force=True)


def pack_venv(prefix: Path, out: Path) -> None:
    try:
        import venv_pack
        from venv_pack.core import rewrite_shebang
    except ImportError:
        raise ParamError(
            "ship_env", "packing a virtual environment needs venv-pack: pip install 'sparkvision[cluster]'"
        ) from None
    env = venv_pack.Env(str(prefix))
    # The venv's own interpreter links and config point at the base Python: replaced below.
    for pattern in (*EXCLUDE, *editable_hooks(), "bin/python", "bin/python3", "bin/python3.*", "pyvenv.cfg"):
        env = env.exclude(pattern)
    # strict_timestamps=False: a file dated before 1980 (which zip cannot say) is stored as 1980.
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True, strict_timestamps=False) as zf:
        for f in env.files:
            source = Path(f.source)
            if source.is_symlink() and (source.is_dir() or not source.exists()):
                continue  # lib64 -> lib: the same files again; or a link to nothing
            if f.target.startswith("bin/") and source.is_file():
                # Console scripts start with `#!/path/to/venv/bin/python`: made `#!/usr/bin/env python`.
                data, _ = rewrite_shebang(source.read_bytes(), f.target, str(prefix))
                write_bytes(zf, f.target, data, source.stat().st_mode)
            else:
                zf.write(source, f.target)
        for src, dst in base_interpreter():
            zf.write(src, dst)
        launcher = LAUNCHER.format(version=python_version()).encode()
        for name in ("bin/python", "bin/python3"):
            write_bytes(zf, name, launcher, 0o100755)


def write_bytes(zf: zipfile.ZipFile, target: str, data: bytes, mode: int) -> None:
    """A member with Unix permissions (Spark's unzip keeps them: the interpreter stays executable)."""
    info = zipfile.ZipInfo(target, date_time=time.localtime()[:6])
    info.external_attr = (mode & 0xFFFF) << 16
    zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def editable_hooks() -> tuple[str, ...]:
    """The site-packages files of an editable sparkvision install (a ``.pth`` and the finder it
    imports), which would send imports to the driver's source directory."""
    if not editable_sparkvision():
        return ()
    return (f"{site_packages_target()}/__editable__*sparkvision*",)


def base_interpreter() -> list[tuple[Path, str]]:
    """The files that make the venv's archive a Python of its own: the interpreter binary, the
    standard library (less :data:`STDLIB_SKIP`), the C headers (which torch's and triton's
    just-in-time compilers look for) and, for a shared build, libpython."""
    version = python_version()
    files = [(Path(sys.executable).resolve(), f"bin/python{version}")]
    stdlib = Path(sysconfig.get_path("stdlib"))
    for path in sorted(stdlib.rglob("*")):
        rel = path.relative_to(stdlib)
        top = rel.parts[0]
        if top in STDLIB_SKIP or top.startswith("config-") or (path.is_dir() and not path.is_symlink()):
            continue
        files.append((path, f"lib/python{version}/{rel.as_posix()}"))
    include = Path(sysconfig.get_path("include"))
    files += [
        (p, f"include/python{version}/{p.relative_to(include).as_posix()}") for p in source_files(include)
    ]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        files.append((Path(libdir) / soname, f"lib/{soname}"))
    return files


# `bin/python` in the archive: runs the packed interpreter with the packed libpython found first
# (a shared build's binary asks for it at the absolute path it was built for). The interpreter
# finds its standard library from its own location, so the directory can be unpacked anywhere.
LAUNCHER = """#!/bin/sh
env_dir=$(cd "$(dirname "$0")/.." && pwd)
LD_LIBRARY_PATH="$env_dir/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" exec "$env_dir/bin/python{version}" "$@"
"""
