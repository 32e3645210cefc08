"""The rules every operation's paths obey, whichever front-end gave them.

* An output produced whole (a prediction table, features, an index) is written to a temporary
  sibling and moved into place only when the operation succeeds: a failed or cancelled job
  leaves nothing that looks complete, and an overwritten output is replaced only then.

* An input that is a local path must exist: said at once, before a JVM starts.
* An output is never one of the operation's inputs, nor inside one, nor around one (writing a
  directory that holds an input would replace the input).
* An output that already holds data is refused unless the operation continues it (``resume``
  of a training run, ``ingest`` appending to an image table) or ``overwrite`` is given: a
  mistyped ``out`` must not destroy a table, a model or the source images.

Local paths are checked with ``os`` before Spark starts; other URIs (``hdfs://``, ``s3a://``)
through Spark's Hadoop FileSystem once a session exists.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sparkvision.errors import ParamError
from sparkvision.spark import storage


def local_path(uri: str) -> str | None:
    """The filesystem path of a local URI (``/x``, ``file:/x``, ``file:///x``), else None."""
    if uri.startswith("file://"):
        return os.path.realpath(uri[len("file://") :])
    if uri.startswith("file:"):
        return os.path.realpath(uri[len("file:") :])
    if "://" in uri:
        return None
    return os.path.realpath(os.path.expanduser(uri))


def holds_data(path: str) -> bool:
    """A file, or a directory with anything in it (an empty directory holds nothing to lose)."""
    if os.path.isdir(path):
        with os.scandir(path) as entries:
            return any(True for _ in entries)
    return os.path.exists(path)


def _nested(a: str, b: str) -> bool:
    try:
        return os.path.commonpath([a, b]) in (a, b)
    except ValueError:
        return False


def check_inputs_exist(op: Any, p: Any) -> None:
    for name in (*op.inputs, *op.optional_inputs):
        value = getattr(p, name, None)
        if isinstance(value, str):
            local = local_path(value)
            if local is not None and not os.path.exists(local):
                raise ParamError(name, f"{value} does not exist")


def check_models(op: Any, p: Any) -> None:
    """Each model directory given loads (read once per process, on this side): a corrupt or
    misfitting model is one line naming the parameter, before a job is queued or Spark starts."""
    from sparkvision.inference.runtime import read_blob

    for name in op.models:
        value = getattr(p, name, None)
        if isinstance(value, str) and local_path(value) is not None:
            try:
                read_blob(local_path(value) or value, param=name)
            except FileNotFoundError as e:
                raise ParamError(name, f"{value} is not a model directory: {e}") from None


def check_outputs(op: Any, p: Any, spark: Any = None) -> None:
    """Refuse outputs that would destroy data (see the module docstring). ``spark``: also check
    non-local URIs, through Hadoop's FileSystem."""
    inputs = [
        (n, getattr(p, n)) for n in (*op.inputs, *op.optional_inputs) if isinstance(getattr(p, n, None), str)
    ]
    overwrite = bool(getattr(p, "overwrite", False))
    for name in op.outputs:
        out = getattr(p, name, None)
        if not isinstance(out, str) or name in op.writes_into:
            continue
        local = local_path(out)
        for in_name, value in inputs:
            in_local = local_path(value)
            same = (
                _nested(local, in_local)
                if local and in_local
                else storage.qualify(out) == storage.qualify(value)
            )
            if same:
                raise ParamError(
                    name, f"{out} overlaps the input {in_name} ({value}); write the output elsewhere"
                )
        if local is not None:
            exists = holds_data(local)
        elif spark is not None:
            exists = storage.exists(spark, out)
        else:
            continue  # a remote URI: checked again once Spark is up
        if exists and not overwrite and not op.continues(p, out, spark):
            raise ParamError(
                name,
                f"{out} already holds data; choose a new path, or give overwrite "
                "to replace it" + (" (or resume to continue it)" if op.resumable else ""),
            )


ContinuesFn = Callable[[Any, str, Any], bool]


def never(p: Any, out: str, spark: Any) -> bool:
    return False


def when_resuming(p: Any, out: str, spark: Any) -> bool:
    """A training run continues its own output directory when asked to resume."""
    return bool(getattr(p, "resume", False))


def _exists(path: str, spark: Any) -> bool:
    local = local_path(path)
    if local is not None:
        return os.path.lexists(local)
    return spark is not None and storage.exists(spark, path)


def _remove(path: str, spark: Any) -> None:
    local = local_path(path)
    if local is not None:
        if os.path.isdir(local) and not os.path.islink(local):
            shutil.rmtree(local)
        elif os.path.lexists(local):
            os.remove(local)
    else:
        storage.delete(spark, path)


def _move(src: str, dst: str, spark: Any) -> None:
    local_src, local_dst = local_path(src), local_path(dst)
    if local_src is not None and local_dst is not None:
        os.rename(local_src, local_dst)
    else:
        storage.rename(spark, src, dst)


def _repoint_metadata(final: str, tmp: str) -> None:
    """An output's own JSON notes (``_dedup.json`` names its output) name the final path."""
    local, old = local_path(final), local_path(tmp)
    if local is None or old is None or not os.path.isdir(local):
        return
    with os.scandir(local) as it:
        entries = [e for e in it if e.name.endswith(".json") and e.is_file()]
    for entry in entries:
        with open(entry.path) as f:
            text = f.read()
        if old in text or tmp in text:
            with open(entry.path, "w") as f:
                f.write(text.replace(old, local).replace(tmp, final))


@contextmanager
def staged(p: Any, names: tuple[str, ...], spark: Any) -> Iterator[tuple[Any, Callable[[Any], Any]]]:
    """``(params writing to temporary siblings, commit)``. ``commit(result)`` moves each into place
    (replacing what ``overwrite`` allowed) and returns the result with the final paths in it; on
    an exception, or with no commit, the temporaries are removed."""
    tmp = {
        n: f"{getattr(p, n).rstrip('/')}._sparkvision-tmp-{uuid.uuid4().hex[:8]}"
        for n in names
        if isinstance(getattr(p, n, None), str)
    }
    committed = False

    def commit(result: Any) -> Any:
        nonlocal committed
        for n, t in tmp.items():
            final = getattr(p, n)
            if _exists(final, spark):
                _remove(final, spark)
            _move(t, final, spark)
            _repoint_metadata(final, t)
        committed = True
        text = json.dumps(result, default=str)
        for n, t in tmp.items():
            text = text.replace(json.dumps(t)[1:-1], json.dumps(getattr(p, n))[1:-1])
        return json.loads(text)

    try:
        yield p.model_copy(update=tmp), commit
    finally:
        if not committed:
            for t in tmp.values():
                try:
                    _remove(t, spark)
                except OSError:
                    pass
