"""Options and output shared by every command: the Spark options (--master, --remote, --conf,
--ship-env), --json, and error handling."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sparkvision.data.images import RejectError
from sparkvision.errors import JobFailed
from sparkvision.spark.session import get_spark, parse_conf

console = Console()
err_console = Console(stderr=True)

Master = Annotated[
    str | None,
    typer.Option(
        "--master", help="Spark master URL (default $SPARKVISION_MASTER or local[*]).", show_default=False
    ),
]
Conf = Annotated[
    list[str] | None,
    typer.Option("--conf", help="Spark setting key=value; repeatable, overrides sparkvision's defaults."),
]
Remote = Annotated[
    str | None,
    typer.Option(
        "--remote",
        help="Spark Connect server sc://host:port (default $SPARK_REMOTE); instead of --master.",
        show_default=False,
    ),
]
ShipEnv = Annotated[
    bool,
    typer.Option(
        "--ship-env",
        help="Pack this Python environment and ship it to the executors (nodes without the package).",
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")]

# Every command that runs on Spark takes these, under these names (one definition: the generated
# operation commands and `serve` both use it).
SPARK_OPTIONS: dict[str, Any] = {"master": Master, "remote": Remote, "conf": Conf, "ship_env": ShipEnv}
SPARK_DEFAULTS: dict[str, Any] = {"master": None, "remote": None, "conf": None, "ship_env": False}


def spark_from(master: str | None, conf: list[str] | None, remote: str | None = None, ship_env: bool = False):
    return get_spark(master, parse_conf(conf or []), remote=remote, ship_env=ship_env)


def emit(
    summary: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None] | None = None
) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        sys.stdout.flush()
    elif render is not None:
        render(summary)
    else:
        render_kv(summary)


def render_kv(summary: dict[str, Any], title: str | None = None) -> None:
    t = Table(title=title, show_header=False, box=None)
    t.add_column(no_wrap=True)
    # Fold, never cut: a value is often a path or URI that the user copies into the next command.
    t.add_column(overflow="fold")
    for k, v in summary.items():
        if isinstance(v, dict) and v:
            v = ", ".join(f"{kk}: {vv}" for kk, vv in v.items())
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        t.add_row(f"[bold]{escape(str(k))}[/bold]", escape(str(v)))
    console.print(t)


def counts_table(title: str, counts: dict[str, int]) -> Table:
    t = Table(title=title)
    t.add_column("name")
    t.add_column("rows", justify="right")
    t.add_column("share", justify="right")
    total = sum(counts.values()) or 1
    for k, v in counts.items():
        t.add_row(str(k), f"{v:,}", f"{100 * v / total:.1f}%")
    return t


def fail(message: str, as_json: bool, code: int = 2) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"error": message}) + "\n")
    else:
        err_console.print(f"[red]error:[/red] {escape(message)}")  # paths may hold [..]
    raise typer.Exit(code)


def guarded(fn: Callable[[], dict[str, Any]], as_json: bool) -> dict[str, Any]:
    """Run a command body, turning our expected errors into a message and exit code 2."""
    try:
        return fn()
    except (ValueError, FileNotFoundError, KeyError, RejectError, JobFailed) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        fail(str(msg), as_json)
        raise  # unreachable; fail() raises
    except (PySparkException, Py4JJavaError) as e:  # a Spark job failed: its reason, not its stack
        from sparkvision.spark.distributed import spark_failure  # torch: only once something failed

        fail(str(spark_failure(e)), as_json)
        raise
