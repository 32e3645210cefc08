"""Hadoop's file-name glob (``pathGlobFilter``) in Python, for a driver without a JVM.

Spark's ``pathGlobFilter`` matches each file name with Hadoop's ``GlobPattern``. A classic
session asks the JVM for that class; a Spark Connect client has no JVM, so it uses this port of
``GlobPattern``'s translation to a regular expression: ``*`` and ``?``, ``[...]`` and ``[!...]``,
``{a,b}`` alternatives (nestable), backslash escapes. ``tests/test_connect.py`` checks it against
the JVM's answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Characters a regex gives a meaning that a Hadoop glob does not (GlobPattern escapes the same set).
_REGEX_ONLY = ".$()|+"


def glob_regex(glob: str) -> str:
    """The regular expression Hadoop's ``GlobPattern`` compiles ``glob`` to; ``ValueError`` for a
    glob it refuses (a dangling escape, an unclosed ``[`` or ``{``)."""
    out: list[str] = []
    in_brackets = False
    curly_open = 0
    i = 0
    while i < len(glob):
        c = glob[i]
        if c == "\\":
            i += 1
            if i >= len(glob):
                raise ValueError(f"glob {glob!r}: missing escaped character at the end")
            out.append("\\" + glob[i])
        elif c in _REGEX_ONLY:
            out.append("\\" + c)
        elif c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "{":
            out.append("(?:")
            curly_open += 1
        elif c == "," and curly_open > 0:
            out.append("|")
        elif c == "}" and curly_open > 0:
            curly_open -= 1
            out.append(")")
        elif c == "[":
            if in_brackets:
                raise ValueError(f"glob {glob!r}: unclosed character class at {i}")
            in_brackets = True
            out.append(c)
        elif c == "^":
            out.append(c if in_brackets else "\\^")
        elif c == "!":
            out.append("^" if in_brackets and glob[i - 1] == "[" else "!")
        elif c == "]":
            in_brackets = False
            out.append(c)
        else:
            out.append(c)
        i += 1
    if in_brackets:
        raise ValueError(f"glob {glob!r}: unclosed character class")
    if curly_open > 0:
        raise ValueError(f"glob {glob!r}: unclosed group")
    return "".join(out)


def glob_matcher(glob: str) -> Callable[[str], bool]:
    """Whether a file name matches ``glob`` the way ``pathGlobFilter`` decides it (whole name)."""
    pattern = re.compile(glob_regex(glob), re.DOTALL)
    return lambda name: pattern.fullmatch(name) is not None
