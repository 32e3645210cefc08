"""What every operation is made of: a parameters model, a ``run``, and what it declares about itself.

Each operation (ingest, train, predict, ...) is defined once, in its own module of this package,
as a pydantic model of its parameters (every default, choice and bound) and a
``run(spark, params, progress)``. The CLI (:mod:`sparkvision.cli`), the web job API
(:mod:`sparkvision.web`) and the Python API are generated from, or typed against, that one
definition, so no default or validity rule is written twice. What differs between operations
(which params are paths it reads or writes, whether it resumes from checkpoints, reports epochs,
produces a model) is declared on the :class:`Operation`, not kept in lists of names elsewhere.

Training recipes (:class:`~sparkvision.train.config.TrainConfig` and the SSL configs) are
pydantic dataclasses saved beside every model; an operation's parameters reuse their fields with
:func:`config_fields`, so e.g. the learning-rate default lives in the recipe only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from sparkvision.errors import ParamError  # defined below the library, which raises it too
from sparkvision.ops.paths import ContinuesFn, check_inputs_exist, check_models, check_outputs, never, staged
from sparkvision.spark.session import get_spark


class Params(BaseModel):
    """Base of every operation's parameters: unknown names are an error, never dropped."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Cli:
    """How a parameter shows on the command line, where its flag is not just ``--field-name``.

    Carried as ``Annotated`` metadata next to the field (pydantic ignores it), so the flag sits
    beside the one definition of the parameter.
    """

    flags: tuple[str, ...] = ()  # e.g. ("--pool",) or ("-k", "--k"); default --field-name
    positional: bool = False
    metavar: str | None = None


def param_errors(e: ValidationError) -> list[tuple[str, str]]:
    """``(field, message)`` pairs of a pydantic error, with unknown names worded as such."""
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int)) or "params"
        msg = "unknown parameter" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        out.append((loc, msg))
    return out


class Progress(Protocol):
    """What a running operation may report, and the one question it asks (cancelled?).

    The CLI passes a rich bar on stderr (:func:`sparkvision.cli.operation.cli_progress`), the
    web runner one that feeds the job row, the Python API :data:`NO_PROGRESS` by default.
    """

    def update(self, percent: float, note: str = "") -> None: ...

    def log(self, line: str) -> None: ...

    def check_cancelled(self) -> None: ...


class _NoProgress:
    def update(self, percent: float, note: str = "") -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


NO_PROGRESS: Progress = _NoProgress()


def counting(progress: Progress, total: int | None) -> Callable[[int, str], None]:
    """A ``(n, note)`` callback for library loops (FAISS builds, driver loops) that advances a
    percentage and gives the front-end a chance to cancel between steps."""
    done = [0]

    def advance(n: int, note: str = "") -> None:
        progress.check_cancelled()
        done[0] += n
        progress.update(100.0 * done[0] / total if total else 0.0, note)

    return advance


RunFn = Callable[[Any, Any, Progress], dict[str, Any]]


@dataclass(frozen=True)
class Operation:
    name: str
    params: type[Params]
    run: RunFn  # (spark, params, progress) -> JSON-able summary
    description: str
    inputs: tuple[str, ...] = ()  # params naming existing server-side paths
    optional_inputs: tuple[str, ...] = ()  # the same, when given
    outputs: tuple[str, ...] = ()  # params naming paths the operation writes
    result_key: str | None = None  # the param where its results are
    resumable: bool = False  # ``resume=True`` continues from checkpoints under ``out``
    reports_epochs: bool = False  # writes progress.json / metrics.jsonl under ``out`` while it runs
    produces_model: bool = False  # ``out`` is a model directory
    evaluates: bool = False  # its result is an evaluation (accuracy, confusion matrix)
    needs_spark: bool = True
    spark_when: Callable[[Any], bool] | None = None  # needs Spark for some parameters only
    web: bool = True  # offered as a web job kind
    module: str = "sparkvision"  # the library module it needs (for builds without it)
    check: Callable[[Any], None] | None = None  # cross-field rules, run before any Spark work
    summary_keys: tuple[str, ...] = ()  # scalar results shown as a finished job's metrics
    models: tuple[str, ...] = ()  # params naming model directories, loaded once before anything runs
    staged_outputs: tuple[str, ...] = ()  # outputs produced whole: written aside, moved into place on success
    writes_into: tuple[str, ...] = ()  # outputs that are directories it adds files to (evaluate's reports)
    continues: ContinuesFn = (
        never  # (params, out, spark) -> True where writing into existing data is the intent
    )

    def validate(self, values: dict[str, Any]) -> Params:
        """Parameters from plain values, then the cross-field rules. Raises :class:`ParamError`."""
        try:
            p = self.params.model_validate(values)
        except ValidationError as e:
            field_, msg = param_errors(e)[0]
            raise ParamError(field_, msg) from None
        if self.check is not None:
            self.check(p)
        return p

    def preflight(self, p: Any, spark: Any = None) -> None:
        """The path rules (:mod:`sparkvision.ops.paths`): local paths at once, other URIs once a
        session is given. Raises :class:`ParamError` before any work starts."""
        check_inputs_exist(self, p)
        check_models(self, p)
        check_outputs(self, p, spark)

    def execute(
        self, spark: Any, p: Any, progress: Progress = NO_PROGRESS, preflighted: bool = False
    ) -> dict[str, Any]:
        """What every front-end calls to run validated parameters: the path rules, then ``run``,
        writing :attr:`staged_outputs` aside and moving them into place only on success.
        ``preflighted``: the caller ran :meth:`preflight` before starting Spark, so only the
        outputs are checked again (remote URIs need the session; models are not re-read)."""
        progress.check_cancelled()
        if preflighted:
            check_outputs(self, p, spark)
        else:
            self.preflight(p, spark)
        if not self.staged_outputs:
            return self.run(spark, p, progress)
        with staged(p, self.staged_outputs, spark) as (aside, commit):
            result = self.run(spark, aside, progress)
            progress.check_cancelled()  # a cancelled job publishes nothing
            return commit(result)

    def __call__(self, spark: Any = None, progress: Progress = NO_PROGRESS, **values: Any) -> dict[str, Any]:
        """The Python API: ``ops.train(spark, table=..., out=..., epochs=5)``."""
        p = self.validate(values)
        self.preflight(p)  # local paths, before a JVM starts
        if spark is None and self.wants_spark(p):
            spark = get_spark()
        return self.execute(spark, p, progress, preflighted=True)

    def wants_spark(self, p: Any) -> bool:
        return self.spark_when(p) if self.spark_when is not None else self.needs_spark

    def defaults(self) -> dict[str, Any]:
        out = {}
        for name, f in self.params.model_fields.items():
            if not f.is_required():
                out[name] = f.get_default(call_default_factory=True)
        return out

    def unavailable(self) -> str | None:
        try:
            found = importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            found = False
        return None if found else f"job kind {self.name!r} is not available in this build (no {self.module})"

    def describe(self) -> dict[str, Any]:
        why = self.unavailable()
        return {
            "kind": self.name,
            "description": self.description,
            "available": why is None,
            "reason": why,
            "inputs": list(self.inputs),
            "optional_inputs": list(self.optional_inputs),
            "outputs": list(self.outputs),
            "resumable": self.resumable,
            "reports_epochs": self.reports_epochs,
            "evaluates": self.evaluates,
            "schema": self.params.model_json_schema(),
        }


def config_fields(
    config_cls: type,
    *,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    optional: Iterable[str] = (),
) -> dict[str, Any]:
    """The fields of a pydantic-dataclass recipe, ready for :func:`params_model`.

    ``defaults`` changes a default for this operation only (distill's recipe is fine-tuning's
    with other defaults). Fields in ``optional`` default to ``None``, meaning "the preset's
    value" (pretraining's presets).
    """
    optional = set(optional)
    fields: dict[str, FieldInfo] = config_cls.__pydantic_fields__  # type: ignore[attr-defined]
    defaults = defaults or {}
    out: dict[str, Any] = {}
    for name, fi in fields.items():
        if name in exclude:
            continue
        ann = fi.rebuild_annotation()  # the type with its bounds and validators
        kw: dict[str, Any] = {"description": fi.description}
        if name in optional:
            ann, kw["default"] = ann | None, None
        elif name in defaults:
            kw["default"] = defaults[name]
        elif fi.default_factory is not None:
            # A value, not the factory, so the web schema shows it (pydantic copies mutable defaults).
            kw["default"] = fi.get_default(call_default_factory=True)
        elif not fi.is_required():
            kw["default"] = fi.default
        out[name] = (ann, Field(**kw))
    return out


def params_model(name: str, doc: str, **fields: Any) -> type[Params]:
    """A :class:`Params` subclass from ``name=(annotation, FieldInfo)`` pairs."""
    model = create_model(name, __base__=Params, __doc__=doc, __module__="sparkvision.ops", **fields)
    return model


def config_from(config_cls: type, p: BaseModel, **extra: Any) -> Any:
    """The recipe object of an operation's parameters (the fields the two share)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: getattr(p, k) for k in type(p).model_fields if k in names}
    return config_cls(**{**values, **extra})


OPERATIONS: dict[str, Operation] = {}


def register(op: Operation) -> Operation:
    if op.name in OPERATIONS:
        raise ValueError(f"operation {op.name!r} is registered twice")
    OPERATIONS[op.name] = op
    return op
