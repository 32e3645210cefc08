"""Issue 15's path and output findings, tried as a hostile or careless user would: no glob escapes
the data roots, no output destroys existing data (web, CLI and Python alike), a cancel in a job's
first second cancels, resume re-checks paths against today's roots, and evaluating an empty split
leaves the model's evaluation alone."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import write_image_folder, write_tiny_model
from fastapi.testclient import TestClient
from test_web_api import CLASSES, write_image_table
from typer.testing import CliRunner

from sparkvision import api
from sparkvision.cli import app
from sparkvision.ops import ParamError
from sparkvision.ops.base import Operation, Params
from sparkvision.ssl.config import FinetuneConfig
from sparkvision.ssl.finetune import finetune
from sparkvision.web.app import create_app
from sparkvision.web.kinds import KINDS
from sparkvision.web.security import Settings


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "root"
    write_tiny_model(root / "models" / "cnn", CLASSES, {"test_acc": 0.25})
    write_image_table(str(root / "tables" / "tiny"))
    write_image_folder(root / "folder", {"a": 3, "b": 3})
    (tmp_path / "outside" / "secret").mkdir(parents=True)
    write_image_folder(tmp_path / "outside" / "secret", {"s": 2})
    return root


def client_for(root, **kw):
    return TestClient(
        create_app(Settings(data_roots=[str(root)], db_url="sqlite://", start_runner=False, **kw))
    )


def submit(c, kind, params):
    return c.post("/api/jobs", json={"kind": kind, "params": params})


def snapshot(path) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), path)] = fh.read()
    return out


@pytest.mark.parametrize(
    "source", ["{folder,../outside/secret}", "folder/*", "fold?r", "[f]older", "fold\\er"]
)
def test_a_glob_never_reaches_spark(root, source):
    with client_for(root) as c:
        r = submit(c, "ingest", {"source": source, "table": "tables/stolen"})
        assert r.status_code == 422 and "glob" in r.json()["error"], r.text
    assert not (root / "tables" / "stolen").exists()


@pytest.mark.parametrize(
    "kind, params",
    [
        (
            "predict",
            {"model_dir": "models/cnn", "table": "tables/tiny", "out": "folder"},
        ),  # the source images
        (
            "predict",
            {"model_dir": "models/cnn", "table": "tables/tiny", "out": "tables/tiny"},
        ),  # its own input
        ("embed", {"model_dir": "models/cnn", "table": "tables/tiny", "out": "models/cnn"}),  # a model dir
        ("train", {"table": "tables/tiny", "out": "models/cnn", "epochs": 1}),
        ("ingest", {"source": "folder", "table": "models/cnn"}),
        ("ingest", {"source": "folder", "table": "folder/a"}),  # inside its input
        ("dedup", {"table": "tables/tiny", "out": "tables"}),  # around its input
        ("index", {"features": "tables/tiny", "out": "folder"}),
    ],
)
def test_web_outputs_never_destroy_data(root, kind, params):
    before = snapshot(root)
    with client_for(root) as c:
        r = submit(c, kind, params)
        assert r.status_code in (409, 422), r.text
        body = r.json()["error"]
        assert "already holds data" in body or "overlaps the input" in body, body
    assert snapshot(root) == before


def test_overwrite_is_the_one_way_to_replace(root):
    with client_for(root) as c:
        r = submit(
            c,
            "predict",
            {"model_dir": "models/cnn", "table": "tables/tiny", "out": "folder", "overwrite": True},
        )
        assert r.status_code == 201, r.text
        # Appending to an image table is ingest's purpose, not a destruction: accepted.
        r = submit(c, "ingest", {"source": "folder", "table": "tables/tiny"})
        assert r.status_code == 201, r.text


def test_cli_and_python_refuse_too_before_spark_starts(root):
    before = snapshot(root)
    r = CliRunner().invoke(
        app,
        [
            "predict",
            str(root / "models" / "cnn"),
            str(root / "tables" / "tiny"),
            str(root / "folder"),
            "--master",
            "bogus://never-started",
        ],
    )
    out = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2 and "OUT: " in out and "already holds data" in out, out
    r = CliRunner().invoke(
        app,
        [
            "train",
            "--table",
            str(root / "tables" / "tiny"),
            "--out",
            str(root / "models" / "cnn"),
            "--master",
            "bogus://never-started",
        ],
    )
    assert r.exit_code == 2 and "--out: " in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(
        app, ["ingest", str(root / "nope"), str(root / "tables" / "x"), "--master", "bogus://never-started"]
    )
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "SOURCE: " in out and "does not exist" in out, out
    with pytest.raises(ParamError) as e:
        api.embed(
            spark=None,
            model_dir=str(root / "models" / "cnn"),
            table=str(root / "tables" / "tiny"),
            out=str(root / "tables" / "tiny" / "features"),
        )
    assert e.value.param == "out" and "overlaps" in e.value.message
    assert snapshot(root) == before


def test_resume_rechecks_paths_against_todays_roots(root, tmp_path):
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    with TestClient(create_app(Settings(data_roots=[str(root)], db_url=db, start_runner=False))) as c:
        jid = submit(
            c, "predict", {"model_dir": "models/cnn", "table": "tables/tiny", "out": "preds"}
        ).json()["id"]
        assert c.post(f"/api/jobs/{jid}/cancel").json()["state"] == "cancelled"
    other = tmp_path / "other_root"
    other.mkdir()
    with TestClient(create_app(Settings(data_roots=[str(other)], db_url=db, start_runner=False))) as c:
        r = c.post(f"/api/jobs/{jid}/resume")
        assert r.status_code == 403 and "outside the data roots" in r.json()["error"], r.text
        assert c.get(f"/api/jobs/{jid}").json()["state"] == "cancelled"


def test_a_cancel_in_the_first_second_cancels(spark, root, tmp_path, monkeypatch):
    """The job is cancelled before its Spark work starts; that work never runs and writes nothing."""
    marker = tmp_path / "written"

    class SlowStartParams(Params):
        pass

    def run(spark_, p, progress):
        time.sleep(1.5)  # driver-side set-up, before any Spark job exists
        spark_.range(2).repartition(2).rdd.map(lambda x: time.sleep(3) or x).count()
        marker.write_text("results")
        return {"ok": True}

    monkeypatch.setitem(KINDS, "slowstart", Operation("slowstart", SlowStartParams, run, "test"))
    settings = Settings(data_roots=[str(root)], db_url=f"sqlite:///{tmp_path / 'r.db'}", start_runner=True)
    with TestClient(create_app(settings, spark_factory=lambda: spark)) as c:
        jid = submit(c, "slowstart", {}).json()["id"]
        t0 = time.time()
        while c.get(f"/api/jobs/{jid}").json()["state"] != "running":
            assert time.time() - t0 < 30
            time.sleep(0.05)
        assert c.post(f"/api/jobs/{jid}/cancel").status_code == 200
        while (j := c.get(f"/api/jobs/{jid}").json())["state"] == "running":
            assert time.time() - t0 < 60
            time.sleep(0.2)
        assert j["state"] == "cancelled", j
    time.sleep(0.5)
    assert not marker.exists()


def test_evaluate_on_an_empty_split_keeps_the_evaluation(spark, tiny_table, tmp_path):
    model = str(tmp_path / "m")
    finetune(
        spark,
        tiny_table,
        model,
        None,
        FinetuneConfig(epochs=1, batch_size=16, model_kwargs={"widths": [8, 16], "hidden": 32}),
    )
    api.evaluate(spark, model_dir=model, table=tiny_table, split="test")
    with open(os.path.join(model, "evaluation.json")) as f:
        before = json.load(f)
    with pytest.raises(ParamError) as e:
        api.evaluate(spark, model_dir=model, table=tiny_table, split="nosuchsplit")
    assert e.value.param == "split" and "no labelled rows" in e.value.message
    with open(os.path.join(model, "evaluation.json")) as f:
        assert json.load(f) == before


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"model_kwargs": {"hidden": 1e9}}, "model_kwargs"),  # a float width: cannot be built
        ({"model_kwargs": {"hidden": 10**9}}, "model_kwargs"),  # trillions of weights: no worker holds them
        ({"image_size": 4096}, "image_size"),
        ({"weight_decay": 1e308}, "weight_decay"),
        ({"epochs": -3}, "epochs"),
    ],
)
def test_parameters_that_can_never_work_are_refused_at_submit(root, bad, field):
    with client_for(root) as c:
        r = submit(c, "train", {"table": "tables/tiny", "out": "models/new", **bad})
        assert r.status_code == 422 and field in r.json()["error"], r.text


def test_a_split_that_does_not_exist_is_refused_before_training(spark, tiny_table, tmp_path):
    t0 = time.time()
    with pytest.raises(ParamError) as e:
        api.train(spark, table=tiny_table, out=str(tmp_path / "m"), epochs=20, eval_split="bogus")
    assert e.value.param == "eval_split" and "no rows in split 'bogus'" in e.value.message
    assert time.time() - t0 < 30 and not (tmp_path / "m").exists()


def test_outputs_appear_only_when_the_job_succeeds(spark, root, tiny_table, tmp_path):
    """A staged output is written aside and moved into place at the end: a failure leaves nothing
    at the output path (nor beside it), an overwrite replaces the old output only on success."""
    table = tiny_table
    work = tmp_path / "work"
    work.mkdir()
    out = str(work / "preds")
    s = api.predict(spark, model_dir=str(root / "models" / "cnn"), table=table, out=out)
    assert "_sparkvision-tmp-" not in json.dumps(s)
    assert os.path.isfile(os.path.join(out, "_SUCCESS")) and os.listdir(work) == ["preds"]
    before = snapshot(out)
    # A table Spark cannot read (int64 labels where the schema says int): the model loads and the
    # paths pass, so the job fails inside its Spark job, after the output was started.
    unreadable = str(root / "tables" / "tiny")
    with pytest.raises(Exception):  # noqa: B017 - any failure of the job: the point is what it leaves
        api.predict(spark, model_dir=str(root / "models" / "cnn"), table=unreadable, out=out, overwrite=True)
    assert snapshot(out) == before  # the old output is untouched
    assert sorted(os.listdir(work)) == ["preds"]  # no temporary left behind


def test_a_job_failing_half_way_leaves_the_old_output(spark, tmp_path):
    """The staging itself: an operation that wrote part of its output and then failed."""

    class OutParams(Params):
        out: str
        overwrite: bool = False

    def run(spark_, p, progress):
        spark_.range(10).write.parquet(p.out)  # a complete-looking table ...
        raise RuntimeError("... and then the job dies")

    op = Operation("halfway", OutParams, run, "test", outputs=("out",), staged_outputs=("out",))
    out = tmp_path / "t"
    spark.range(3).write.parquet(str(out))
    before = snapshot(out)
    with pytest.raises(RuntimeError):
        op.execute(spark, OutParams(out=str(out), overwrite=True))
    assert snapshot(out) == before and os.listdir(tmp_path) == ["t"]


def test_a_model_that_cannot_load_is_refused_at_submit(root):
    broken = root / "models" / "broken"
    broken.mkdir()
    for f in os.listdir(root / "models" / "cnn"):
        if os.path.isfile(root / "models" / "cnn" / f):
            (broken / f).write_bytes((root / "models" / "cnn" / f).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # corrupt weights
    with client_for(root) as c:
        r = submit(c, "predict", {"model_dir": "models/broken", "table": "tables/tiny", "out": "preds"})
        assert r.status_code == 422 and "model_dir" in r.json()["error"], r.text
        assert "Traceback" not in r.text and "\n" not in r.json()["error"]
    assert not (root / "preds").exists()
