"""One definition per operation: the CLI, the web job API and the Python API take every default and
every validity rule from the operation's parameters model, and all three refuse an unknown name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.main import get_command
from typer.testing import CliRunner

from sparkvision import api
from sparkvision.cli import app
from sparkvision.cli.operation import cli_meta, flag_of, values_from_cli
from sparkvision.ops import OPERATIONS, ParamError
from sparkvision.ops.base import Cli
from sparkvision.web.app import create_app
from sparkvision.web.kinds import KINDS
from sparkvision.web.security import Settings

CLI_NAMES = {
    "fashion-mnist": ("datasets", "fashion-mnist"),
    "scenes": ("datasets", "scenes"),
    "synthetic-landsat": ("datasets", "synthetic-landsat"),
}


def required_values(op) -> dict[str, str]:
    return {name: f"x_{name}" for name, f in op.params.model_fields.items() if f.is_required()}


def cli_args(op, values: dict[str, str]) -> list[str]:
    """The command line that gives ``values``: positionals in field order, then options."""
    fields = op.params.model_fields
    pos = [v for k, v in values.items() if cli_meta(fields[k]).positional]
    opts = []
    for k, v in values.items():
        if not cli_meta(fields[k]).positional:
            opts += [flag_of(k, fields[k]), v]
    return pos + opts


def click_command(name: str):
    cmd = get_command(app)
    for part in CLI_NAMES.get(name, (name,)):
        cmd = cmd.commands[part]
    return cmd


def test_every_operation_is_on_the_cli_the_web_and_the_python_api():
    names = set(OPERATIONS)
    assert {
        "ingest",
        "train",
        "evaluate",
        "predict",
        "pretrain",
        "finetune",
        "distill",
        "embed",
        "index",
        "search",
        "dedup",
    } <= names
    for name, op in OPERATIONS.items():
        assert click_command(name) is not None
        assert getattr(api, name.replace("-", "_")) is op  # the Python API is the operation itself
        if op.web:
            assert KINDS[name] is op  # the web kind too: same params model, same checks
    assert set(KINDS) == {n for n, op in OPERATIONS.items() if op.web}


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_cli_defaults_are_the_models_defaults(name):
    """Parse a command line that gives only the required values; what the command would validate
    equals the model built from the same values in Python, field by field."""
    op = OPERATIONS[name]
    req = required_values(op)
    cmd = click_command(name)
    ctx = cmd.make_context(name, cli_args(op, req))
    from_cli = op.params.model_validate(values_from_cli(ctx.params))
    from_python = op.params(**req)
    assert from_cli.model_dump() == from_python.model_dump()
    # Every field is on the command line, and a scalar's shown default is the model's.
    shown = {p.name: p for p in cmd.params}
    for fname, f in op.params.model_fields.items():
        assert fname in shown, f"{name}: {fname} missing from the CLI"
        default = f.get_default(call_default_factory=True)
        if not f.is_required() and isinstance(default, (bool, int, float, str)):
            assert shown[fname].default == default, (name, fname)


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_cli_refuses_an_unknown_option_and_names_a_bad_value(name):
    op = OPERATIONS[name]
    args = cli_args(op, required_values(op))
    r = CliRunner().invoke(app, [*CLI_NAMES.get(name, (name,)), *args, "--no-such-option", "1"])
    assert r.exit_code == 2 and "no-such-option" in r.output
    # A bounded integer out of range: one line naming the flag, no traceback, before Spark starts.
    bounded = [
        (k, f)
        for k, f in op.params.model_fields.items()
        if any(getattr(m, "ge", None) == 1 for m in f.metadata) and not cli_meta(f).positional
    ]
    if bounded:
        k, f = bounded[0]
        r = CliRunner().invoke(app, [*CLI_NAMES.get(name, (name,)), *args, flag_of(k, f), "0", "--json"])
        assert r.exit_code == 2, r.output
        assert flag_of(k, f) in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_python_api_refuses_an_unknown_parameter(name):
    op = OPERATIONS[name]
    with pytest.raises(ParamError) as e:
        op(spark=object(), **required_values(op), no_such_param=1)
    assert e.value.param == "no_such_param"


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("opsroot")
    settings = Settings(data_roots=[str(root)], db_url="sqlite://", start_runner=False)
    with TestClient(create_app(settings)) as c:
        yield c


def test_web_schema_defaults_are_the_models_defaults(web):
    kinds = {k["kind"]: k for k in web.get("/api/jobs/kinds").json()["kinds"]}
    assert set(kinds) == set(KINDS)
    for name, kind in kinds.items():
        op = OPERATIONS[name]
        props = kind["schema"]["properties"]
        defaults = op.params(**required_values(op)).model_dump(mode="json")
        for fname, f in op.params.model_fields.items():
            assert fname in props, (name, fname)
            if not f.is_required():
                assert props[fname].get("default") == defaults[fname], (name, fname)
        assert kind["resumable"] == op.resumable and kind["reports_epochs"] == op.reports_epochs


def test_web_refuses_an_unknown_parameter(web):
    for name, op in KINDS.items():
        r = web.post("/api/jobs", json={"kind": name, "params": {**required_values(op), "no_such_param": 1}})
        assert r.status_code == 422, (name, r.text)
        assert "no_such_param" in r.json()["error"], r.json()


def test_shared_rules_worded_per_front_end():
    """The library names the field; the CLI words it as the flag."""
    with pytest.raises(ParamError) as e:
        api.train.validate({"table": "t", "out": "o", "model_kwargs": {"widht": 3}})
    assert e.value.param == "model_kwargs" and "widht" in str(e.value)
    r = CliRunner().invoke(app, ["train", "--table", "t", "--out", "o", "--model-kwargs", '{"widht": 3}'])
    assert r.exit_code == 2 and "--model-kwargs" in r.output and "widht" in r.output
    r = CliRunner().invoke(
        app, ["pretrain", "--table", "t", "--out", "o", "--pool", "train", "--epochs", "0"]
    )
    assert r.exit_code == 2 and "--epochs" in r.output


def test_distill_recipe_is_fine_tunings_with_its_own_defaults():
    d, f = OPERATIONS["distill"].defaults(), OPERATIONS["finetune"].defaults()
    assert (d["batch_size"], d["epochs"], d["label_smoothing"], d["encoder_lr_scale"]) == (256, 10, 0.0, 1.0)
    assert (f["batch_size"], f["epochs"], f["label_smoothing"]) == (128, 40, 0.1)
    assert d["lr"] == f["lr"] and d["augment"] == f["augment"]  # the rest is fine-tuning's, not a copy


def test_pretrain_quick_try_needs_no_warmup_choice():
    """`pretrain --epochs 1` on a preset with a 1-epoch warm-up keeps the preset's share of it."""
    from sparkvision.ops.pretrain import overrides
    from sparkvision.ssl.presets import resolve

    p = api.pretrain.validate({"table": "t", "out": "o", "epochs": 1})
    cfg = resolve(p.preset, **overrides(p))
    assert cfg.epochs == 1 and 0 <= cfg.warmup_epochs < 1
    p = api.pretrain.validate({"table": "t", "out": "o", "monitor_split": "none"})
    assert resolve(p.preset, **overrides(p)).monitor_split is None  # "none" skips, it is not "the preset's"


def test_cli_metadata_is_only_on_the_params():
    """Flags that differ from --field-name sit on the field (Annotated), nowhere else."""
    assert flag_of("pool_split", OPERATIONS["pretrain"].params.model_fields["pool_split"]) == "--pool"
    source = cli_meta(OPERATIONS["ingest"].params.model_fields["source"])
    assert isinstance(source, Cli) and source.positional
    assert not cli_meta(OPERATIONS["ingest"].params.model_fields["glob"]).positional


def test_commands_reference_is_generated_from_the_operations():
    """docs/commands.md is what scripts/commands_doc.py writes now: the reference cannot drift."""
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("commands_doc", root / "scripts" / "commands_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (root / "docs" / "commands.md").read_text() == mod.render(), "run scripts/commands_doc.py"
