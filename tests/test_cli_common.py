"""CLI output helpers: messages are printed as given, never interpreted as rich markup."""

from __future__ import annotations

import io

import pytest
import typer
from rich.console import Console

from sparkvision.cli import common


def test_error_messages_keep_square_brackets(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=buf, width=200))
    with pytest.raises(typer.Exit) as exc:
        common.fail("no table at s3://bucket/[red]run[/red]/x", as_json=False)
    assert exc.value.exit_code == 2
    assert "s3://bucket/[red]run[/red]/x" in buf.getvalue()


def test_summaries_keep_square_brackets(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=buf, width=200))
    common.render_kv({"model": "runs/[bold]m", "classes": ["a[1]", "b"]})
    assert "runs/[bold]m" in buf.getvalue() and "a[1], b" in buf.getvalue()
