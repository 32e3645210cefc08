"""A typer command generated from an operation's parameters model.

Every option's flag, type, help and default comes from the operation's one definition
(:mod:`sparkvision.ops`); nothing here knows a particular operation. What the command line
adds is its own: ``--json``, ``--master``/``--conf`` for operations that run on Spark, the
rendering of the summary, and errors worded in flags (``--epochs: ...``) instead of fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args

import typer
from pydantic.fields import FieldInfo
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from sparkvision.cli.common import SPARK_DEFAULTS, SPARK_OPTIONS, emit, err_console, guarded, spark_from
from sparkvision.ops.base import Cli, Operation, ParamError

_SCALARS = (bool, int, float, str)


def cli_meta(f: FieldInfo) -> Cli:
    return next((m for m in f.metadata if isinstance(m, Cli)), Cli())


def flag_of(name: str, f: FieldInfo) -> str:
    """The flag a user types for a field, for error messages."""
    meta = cli_meta(f)
    if meta.positional:
        return (meta.metavar or name).upper()
    longs = [x.split("/")[0] for x in meta.flags if x.startswith("--")]
    return longs[0] if longs else f"--{name.replace('_', '-')}"


def _cli_type(ann: Any) -> tuple[Any, bool]:
    """(the type typer parses, whether the value is kept as given): scalars and Literals of them
    are typed; everything else (dicts, sizes, augment specs) goes to the model as text, where the
    field's own validator parses it."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _cli_type(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            inner, simple = _cli_type(args[0])
            return inner | None, simple
        return str | None, False
    if origin is Literal:
        kinds = {type(a) for a in typing.get_args(ann)}
        return (kinds.pop() if len(kinds) == 1 else str), True
    if origin is list:
        return list[str], True
    if ann in _SCALARS:
        return ann, True
    return str, False


def _default_text(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        changed = {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if getattr(value, f.name) not in (0, 0.0, (1.0, 1.0), None)
        }
        return ",".join(f"{k}={v}" for k, v in changed.items()) or "none"
    if isinstance(value, dict) and not value:
        return "{}"
    return str(value)


def _parameters(op: Operation) -> tuple[list[inspect.Parameter], dict[str, Any]]:
    params, annotations = [], {}
    for name, f in op.params.model_fields.items():
        meta = cli_meta(f)
        typ, simple = _cli_type(f.annotation if not f.metadata else f.rebuild_annotation())
        if not meta.positional and list in (
            typing.get_origin(typ),
            *map(typing.get_origin, typing.get_args(typ)),
        ):
            typ, simple = str | None, False  # an option's list is one comma-separated value ("a,b,c")
        required = f.is_required()
        default = None if required else f.get_default(call_default_factory=True)
        help_ = f.description or ""
        if not simple or isinstance(default, list):
            # Complex defaults show as text; the option stays None unless given, so the model's
            # own default applies (no copy of it here).
            if default is not None and default != []:
                help_ += f" [default: {_default_text(default)}]"
            typ = typ if typing.get_origin(typ) is list else str | None
            default = None
        if meta.positional:
            info = typer.Argument(
                ... if required else default,
                help=help_,
                metavar=meta.metavar,
                show_default=default is not None,
            )
        else:
            flags = meta.flags or (f"--{name.replace('_', '-')}",)
            info = typer.Option(
                ... if required else default, *flags, help=help_, show_default=default is not None
            )
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=typ))
        annotations[name] = typ
    return params, annotations


@contextmanager
def cli_progress(label: str) -> Iterator[Any]:
    """A :class:`~sparkvision.ops.base.Progress` drawn on stderr: operations that step through
    work outside Spark (index builds, dedup's phases) report to it; a Ctrl-C cancels."""
    bar = Progress(
        TextColumn(f"[bold]{label}[/bold]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )

    class _Report:
        task = None

        def update(self, percent: float, note: str = "") -> None:
            if self.task is None:
                self.task = bar.add_task(note, total=100.0)
                bar.start()
            bar.update(self.task, completed=percent, description=note)

        def log(self, line: str) -> None:
            err_console.print(line)

        def check_cancelled(self) -> None:
            pass

    try:
        yield _Report()
    finally:
        bar.stop()


def values_from_cli(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The parameter values a command line gave: an option left out is absent, so the model's
    default applies (the CLI shows that default but holds no copy of it for complex fields)."""
    return {
        k: v
        for k, v in kwargs.items()
        if v is not None and v != [] and v != () and k != "json_out" and k not in SPARK_OPTIONS
    }


def make_command(
    op: Operation, render: Callable[[dict[str, Any]], None] | None = None
) -> Callable[..., None]:
    """The typer command of ``op``: its options from the parameters model, then validate, run, emit."""
    params, annotations = _parameters(op)
    fields = op.params.model_fields
    spark_opts = op.needs_spark or op.spark_when is not None

    def command(**kwargs: Any) -> None:
        json_out = kwargs.pop("json_out", False)
        spark_args = {k: kwargs.pop(k, SPARK_DEFAULTS[k]) for k in SPARK_OPTIONS}
        values = values_from_cli(kwargs)

        def body() -> dict[str, Any]:
            try:
                p = op.validate(values)
                op.preflight(p)  # local paths: said before a JVM starts
                spark = spark_from(**spark_args) if op.wants_spark(p) else None
                with cli_progress(op.name) as progress:
                    return op.execute(spark, p, progress, preflighted=True)
            except ParamError as e:  # from validation or from the library: worded as the flag
                f = fields.get(e.param.split(".")[0])
                flag = flag_of(e.param, f) if f else f"--{e.param.replace('_', '-')}"
                raise ValueError(f"{flag}: {e.message}") from None

        emit(guarded(body, json_out), json_out, render)

    extra = [
        inspect.Parameter(
            "json_out",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
        )
    ]
    annotations["json_out"] = bool
    if spark_opts:
        for name, annotation in SPARK_OPTIONS.items():
            base, option = get_args(annotation)
            extra.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=base,
                    default=typer.Option(
                        SPARK_DEFAULTS[name], *option.param_decls, help=option.help, show_default=False
                    ),
                )
            )
            annotations[name] = base
    command.__signature__ = inspect.Signature(params + extra)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__doc__ = op.params.__doc__ or op.description
    command.__name__ = op.name.replace("-", "_")
    return command


def register(
    app: typer.Typer,
    op: Operation,
    render: Callable[[dict[str, Any]], None] | None = None,
    name: str | None = None,
) -> None:
    app.command(name or op.name)(make_command(op, render))


__all__ = ["cli_progress", "flag_of", "make_command", "register", "values_from_cli"]
