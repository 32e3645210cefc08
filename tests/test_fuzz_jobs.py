"""A seeded fuzz of web job parameters and paths: every case is a 4xx with a message or a job whose
every path lies inside the data roots and whose outputs destroy nothing; nothing outside the roots
is read, and nothing anywhere changes at submit."""

from __future__ import annotations

import os
import random

from conftest import write_image_folder, write_tiny_model
from fastapi.testclient import TestClient

from sparkvision.web.app import create_app
from sparkvision.web.kinds import KINDS
from sparkvision.web.security import Settings

PATHS = [
    "folder",
    "tables/tiny",
    "models/cnn",
    "new/out",
    "../outside",
    "folder/../../outside",
    "/etc",
    "link_out",
    "link_out/x",
    "{folder,../outside}",
    "fold*",
    "file:///etc/passwd",
    "hdfs://nn/x",
    "",
    " ",
    "a\x00b",
    "folder/a",
    "tables",
    ".",
    "~/x",
    "new/../../outside",
    "nested/deep/new",
]
VALUES = [0, -1, 1, 2, 10**12, 1e308, float("nan"), True, None, "none", "x" * 5000, [], {}, {"a": 1}, [1, 2]]


def snapshot(path) -> dict[str, float]:
    out = {}
    for d, dirs, files in os.walk(path, followlinks=False):
        for f in files + dirs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = os.lstat(p).st_mtime
    return out


def test_fuzzed_job_parameters_stay_inside_the_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_image_folder(root / "folder", {"a": 2, "b": 2})
    write_image_folder(outside, {"s": 2})
    (root / "tables" / "tiny").mkdir(parents=True)
    (root / "tables" / "tiny" / "_sparkvision.json").write_text("{}")
    write_tiny_model(root / "models" / "cnn", ["a", "b"])
    os.symlink(outside, root / "link_out")
    before_root, before_out = snapshot(root), snapshot(outside)
    real_root = os.path.realpath(root)
    rng = random.Random(15)
    statuses: dict[int, int] = {}
    with TestClient(
        create_app(Settings(data_roots=[str(root)], db_url="sqlite://", start_runner=False))
    ) as c:
        for _ in range(900):
            name = rng.choice(sorted(KINDS))
            kind = KINDS[name]
            fields = list(kind.params.model_fields)
            paths = (*kind.inputs, *kind.optional_inputs, *kind.outputs)
            hostile = rng.random() < 0.5  # half the cases also get odd values in other fields
            params = {}
            for f in fields:
                if f in paths:
                    if kind.params.model_fields[f].is_required() or rng.random() < 0.5:
                        params[f] = rng.choice(PATHS)
                elif hostile and rng.random() < 0.3:
                    params[f] = rng.choice(VALUES + PATHS)
            if rng.random() < 0.1:
                params["no_such_param"] = 1
            r = (
                c.post("/api/jobs", json={"kind": name, "params": params})
                if "nan" not in repr(params)
                else None
            )
            if r is None:
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code in (201, 403, 404, 409, 413, 422), (name, params, r.status_code, r.text)
            if r.status_code != 201:
                assert r.json()["error"], r.text
                continue
            job = r.json()
            for f in (*kind.inputs, *kind.optional_inputs, *kind.outputs):
                v = job["params"].get(f)
                if v is not None:
                    assert os.path.commonpath([os.path.realpath(v), real_root]) == real_root, (name, f, v)
            for f in kind.outputs:
                v = job["params"].get(f)
                if v is not None and f not in kind.writes_into and not job["params"].get("overwrite"):
                    holds = os.path.isdir(v) and os.listdir(v) or os.path.isfile(v)
                    assert not holds or kind.continues(kind.params.model_validate(job["params"]), v, None), (
                        name,
                        f,
                        v,
                    )
    assert snapshot(root) == before_root and snapshot(outside) == before_out
    assert statuses.get(201, 0) >= 5 and sum(statuses.values()) > 300, statuses  # both sides were exercised
