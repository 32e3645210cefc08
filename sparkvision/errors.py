"""The error the library raises for a bad value of one parameter, in words every front-end shares.

It lives below both the library and :mod:`sparkvision.ops` (which re-exports it from
:mod:`sparkvision.ops.base`): the operations import every library module, so a library module
importing ``sparkvision.ops`` would import itself half-initialised.
"""

from __future__ import annotations


class ParamError(ValueError):
    """A bad value of one named parameter. Front-ends word ``param`` their own way: the CLI as
    ``--flag``, the web as the JSON field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class JobFailed(RuntimeError):
    """A Spark job failed for a reason the user can act on, said in one line (a lost executor
    after every restart, a rank's own runtime error): front-ends print it without a traceback."""
