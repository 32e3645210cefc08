"""Walking a local image folder before Spark lists it, so that no file is read twice or lost.

Hadoop's local file system follows every symlink while Spark lists a folder recursively: a link
back to an ancestor is walked again and again until the kernel gives up (about 40 levels, so
every file is read 41 times), and two such links never finish. It also drops, without a word,
what it cannot name or stat: a name that is not valid UTF-8 (Java decodes it to U+FFFD and then
finds no such file) and a broken symlink.

So a local source is walked here first, with :func:`os.scandir`, which sees links as links:

- **Directory symlinks are never followed**, wherever they point (an ancestor, elsewhere in the
  tree, or outside it). Not following any of them is the rule that is simple to predict: no
  loops, no file counted twice, and no directory outside the folder that was named is read. Each one
  becomes a ``symlinked_dir`` reject so it does not vanish either; ingest its target as a source
  of its own to include it. Symlinks to *files* are read, as before (they cannot loop).
- A name that is not valid UTF-8 (file or directory) becomes a ``bad_name`` reject for every file
  under it; the path is shown with the bad bytes as ``\\xNN``.
- A broken symlink and a directory that cannot be listed become ``unreadable`` rejects.

Spark is then handed the root alone when no directory had to be kept from it (the usual case:
listing and reading are exactly as before); otherwise the largest subtrees free of such
directories, plus the loose files of the directories above them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

# (path as Spark spells it, reason, detail, size in bytes or None): one row of the rejects table.
RejectRow = tuple[str, str, str, int | None]

# Hadoop expands these in a path handed to Spark's reader (``SparkHadoopUtil.isGlobPath``).
HADOOP_GLOB_CHARS = "\\{}[]*?"


@dataclass
class FolderListing:
    """What Spark must read (``paths``, local paths) and the rejects found while walking."""

    paths: list[str]
    rejects: list[RejectRow] = field(default_factory=list)


def escape_glob(path: str) -> str:
    """``path`` with Hadoop's glob characters backslash-escaped, so Spark reads it literally."""
    return "".join("\\" + ch if ch in HADOOP_GLOB_CHARS else ch for ch in path)


def spark_spelling(path: str) -> str:
    """A local path as Spark's ``path`` column spells it (``file:/x y``); undecodable bytes as ``\\xNN``."""
    return "file:" + os.fsencode(path).decode("utf-8", "backslashreplace")


def is_valid_name(name: str) -> bool:
    """False for a name :func:`os.fsdecode` could only spell with surrogate escapes (bytes that
    are not UTF-8), which no Java or Arrow string can hold."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lsize(path: str) -> int | None:
    try:
        return os.lstat(path).st_size
    except OSError:
        return None


def list_local_folder(root: str, wanted: Callable[[str], bool] = lambda name: True) -> FolderListing:
    """Walk the local directory ``root`` (see the module docstring for the rules).

    ``wanted(file_name)`` is the caller's file-name filter (the ingest ``glob``): a file it
    refuses is not a reject. It is asked only about the files that become rejects here (Spark
    applies the same filter to the rest), so it may be slow.
    """
    root = os.path.normpath(root)
    rejects: list[RejectRow] = []
    kept_out: set[str] = set()  # directories Spark must not list: links, unlistable ones
    real_root = os.path.realpath(root) + os.sep
    stack = [(root, True)]  # (directory, its whole path is valid UTF-8)
    while stack:
        d, named = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as e:
            if d == root:
                raise  # nothing to ingest: the caller reports it, rather than an empty table
            rejects.append(
                (spark_spelling(d), "unreadable", f"directory cannot be listed: {e.strerror}", None)
            )
            kept_out.add(d)
            continue
        for entry in entries:
            ok = named and is_valid_name(entry.name)
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, ok))
            elif entry.is_symlink() and os.path.isdir(entry.path):
                target = os.path.realpath(entry.path) + os.sep
                where = "back into the source" if target.startswith(real_root) else "outside the source"
                rejects.append(
                    (
                        spark_spelling(entry.path),
                        "symlinked_dir",
                        f"directory symlink not followed (it points {where}); ingest its target on its own",
                        None,
                    )
                )
                kept_out.add(entry.path)
            elif not ok or (entry.is_symlink() and not os.path.exists(entry.path)):
                # Files Spark would skip without a word; ``wanted`` only runs on these few.
                if not wanted(os.fsencode(entry.name).decode("utf-8", "replace")):
                    continue
                if ok:
                    rejects.append((spark_spelling(entry.path), "unreadable", "broken symlink", None))
                else:
                    rejects.append(
                        (
                            spark_spelling(entry.path),
                            "bad_name",
                            "the path is not valid UTF-8, which Spark cannot read; rename it",
                            _lsize(entry.path),
                        )
                    )
    return FolderListing(paths=_subtrees(root, kept_out), rejects=rejects)


def _subtrees(root: str, kept_out: set[str]) -> list[str]:
    """The fewest paths that cover everything under ``root`` except ``kept_out`` and below."""
    if not kept_out:
        return [root]
    dirty = {root}  # directories with something kept out beneath them: listed here, not by Spark
    for p in kept_out:
        parent = os.path.dirname(p)
        while parent not in dirty and parent.startswith(root):
            dirty.add(parent)
            parent = os.path.dirname(parent)
    paths: list[str] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            continue  # already a reject from the walk
        for entry in entries:
            if entry.path in kept_out or not is_valid_name(entry.name):
                continue  # rejected by the walk; Spark could not spell the name anyway
            if entry.path in dirty:
                stack.append(entry.path)
            elif entry.is_dir(follow_symlinks=False) or os.path.exists(entry.path):  # not a broken link
                paths.append(entry.path)
    return sorted(paths)
