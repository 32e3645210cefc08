"""Error bodies and messages in the web's words: ``{"error": "field: message", "code": ...}``.

A client of the API sends JSON fields, not command-line flags, so a message should name the
field: pydantic's errors become ``field: message`` on one line, and a library message that names
a CLI flag (``--keep``, ``--linear needs --encoder``) names the job parameter instead, when the
kind has a parameter of that name. The library's own messages stay as they are (the CLI shows them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from sparkvision.ops.base import param_errors

CLI_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")  # what pydantic adds to a validator's message
LOCATIONS = ("body", "query", "path", "header")  # where FastAPI says a field came from, not part of its name
MAX_ERRORS = 10


def error_response(status: int, message: str, code: str | None = None, **extra: Any) -> JSONResponse:
    """The API's one error shape: ``{"error": message, "code": code, **extra}``."""
    return JSONResponse({"error": message, "code": code, **extra}, status_code=status)


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def validation_message(
    errors: Sequence[Mapping[str, Any]], prefix: str = "invalid parameters", whole: str = "request"
) -> str:
    """``prefix: field: message; field: message`` from pydantic / FastAPI error dicts, on one line.

    ``whole`` names an error about no field in particular (a model-level validator).
    """
    parts = []
    for e in errors[:MAX_ERRORS]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in LOCATIONS)
        msg = one_line(e.get("msg", ""))
        for p in PYDANTIC_PREFIXES:
            msg = msg.removeprefix(p)
        parts.append(f"{loc or whole}: {msg}")
    return f"{prefix}: " + "; ".join(parts)


def pydantic_message(e: ValidationError, prefix: str) -> str:
    """``prefix: field: message; ...`` for a parameters model, worded as the operations layer words it."""
    return f"{prefix}: " + "; ".join(f"{name}: {one_line(msg)}" for name, msg in param_errors(e)[:MAX_ERRORS])


def flags_to_fields(message: str, fields: Iterable[str]) -> str:
    """``message`` with each ``--some-flag`` that is one of ``fields`` (as ``some_flag``) written as the field."""
    names = set(fields)

    def field(m: re.Match[str]) -> str:
        name = m.group(1).replace("-", "_")
        return name if name in names else m.group(0)

    return one_line(CLI_FLAG.sub(field, message))
