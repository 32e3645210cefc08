"""The server's security model: settings, the API token, data roots and upload limits.

- Bound to anything but loopback, the server refuses to start without an API token (from
  ``--token-file``, ``$SPARKVISION_API_TOKEN`` or ``--token``, which ``ps`` shows); with a token
  set, every mutating endpoint (job submit, cancel, resume) requires ``Authorization: Bearer
  TOKEN`` or ``X-API-Token``, checked before the request body is read. A token in a query string
  is never accepted, and :class:`RedactTokens` keeps one out of the access log.
- Every server-side path a client names must lie inside a configured data root after resolving
  symlinks; ``..`` is rejected outright and so are URIs with a scheme other than ``file:``.
- Request bodies are limited per endpoint (uploads: per file and per request, counted as they
  stream in; everything else: ``max_json_bytes``) and uploaded images in pixels (checked from the
  header, before decoding).
- Errors are :class:`ApiError` -> ``{"error": message}`` with a 4xx status; never a stack trace.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field

from sparkvision.data.images import RejectError, open_image

ENV_TOKEN = "SPARKVISION_API_TOKEN"
MULTIPART_OVERHEAD_BYTES = 1024 * 1024  # part headers and boundaries of an upload request
QUERY_TOKEN = re.compile(r"([?&][\w.-]*(?:token|key|secret|password)[\w.-]*=)[^&#\s]*", re.IGNORECASE)


class ApiError(Exception):
    """An error the client caused or can fix; becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass
class Settings:
    """What the server is configured with; its defaults are also ``sparkvision serve``'s (one place)."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_roots: list[str] = field(default_factory=list)
    db_url: str = "sqlite:///sparkvision-jobs.db"
    model_dir: str | None = None  # for /api/classify
    index_dir: str | None = None  # for /api/search
    token: str | None = None  # default: token_file's content, else $SPARKVISION_API_TOKEN
    token_file: str | None = None  # a file holding the token: unlike --token, not shown by ps
    master: str | None = None
    remote: str | None = None  # a Spark Connect server instead of a master
    conf: dict[str, str] = field(default_factory=dict)
    ship_env: bool = False
    max_upload_bytes: int = 10 * 1024 * 1024  # per file
    max_json_bytes: int = 1024 * 1024  # body of every endpoint but the uploads (a job submission)
    max_files: int = 64  # per classify request
    max_pixels: int = (
        4096 * 4096
    )  # below ingest's MAX_PIXELS_DEFAULT: a request's image is decoded in the server
    batch_size: int = 64  # micro-batch: most requests per model call
    batch_wait_ms: float = 5.0  # micro-batch: longest wait for more requests
    torch_threads: int = 1  # intra-op threads for serving; more only spin on a busy machine
    start_runner: bool = True

    def __post_init__(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give the API token once: --token or --token-file, not both")
        if self.token_file is not None:
            self.token = read_token_file(self.token_file)
        if self.token is None:
            self.token = os.environ.get(ENV_TOKEN) or None
        self.data_roots = [os.path.realpath(os.path.expanduser(r)) for r in self.data_roots]

    def upload_request_bytes(self, files: int) -> int:
        """The body limit of an endpoint taking up to ``files`` uploads: their bytes plus room for
        multipart headers."""
        return self.max_upload_bytes * files + MULTIPART_OVERHEAD_BYTES

    @property
    def max_request_bytes(self) -> int:
        """The body limit of ``/api/classify``, the endpoint taking the most files."""
        return self.upload_request_bytes(self.max_files)


def read_token_file(path: str) -> str:
    """The API token in ``path`` (surrounding whitespace, e.g. the final newline, removed)."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--token-file {path}: cannot be read ({e})") from None
    if not token:
        raise ValueError(f"--token-file {path} is empty")
    return token


class RedactTokens(logging.Filter):
    """Hide the value of any ``token``-like query parameter in a log record's arguments.

    The API takes its token only from headers, but a client may still put one in a URL
    (``?token=...``), and uvicorn's access log prints every request's path and query string.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "=" in a for a in record.args):
            record.args = tuple(
                QUERY_TOKEN.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_startup(settings: Settings) -> None:
    """Refuse to serve an unsafe configuration; the message says how to fix it."""
    if not is_loopback(settings.host) and not settings.token:
        raise ValueError(
            f"--host {settings.host} is not loopback: set an API token with --token or ${ENV_TOKEN} "
            "(mutating endpoints then require 'Authorization: Bearer TOKEN'), or bind to 127.0.0.1"
        )
    for root in settings.data_roots:
        if not os.path.isdir(root):
            raise ValueError(f"--data-root {root} is not a directory")
    if settings.max_upload_bytes <= 0 or settings.max_pixels <= 0:
        raise ValueError("upload limits must be positive")


def check_token(settings: Settings, authorization: str | None, x_api_token: str | None) -> None:
    if not settings.token:
        return  # loopback without a token (check_startup refuses anything else)
    given = x_api_token
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if not given:
        raise ApiError(
            401, "this endpoint needs the API token: send 'Authorization: Bearer TOKEN'", "token_missing"
        )
    if not hmac.compare_digest(given.encode(), settings.token.encode()):
        raise ApiError(403, "the API token is wrong", "token_wrong")


def _within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


GLOB_CHARS = "*?[]{}\\"


def safe_path(raw: str, roots: list[str], *, must_exist: bool = False, what: str = "path") -> str:
    """Resolve a client-given path inside one of ``roots`` or raise a 4xx :class:`ApiError`.

    Relative paths are taken relative to the first root. ``..`` is refused before resolving (so
    nothing is even looked up), and the resolved path, symlinks followed, must stay in a root.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise ApiError(422, f"{what} is empty", "bad_path")
    p = raw.strip()
    if "\x00" in p:
        raise ApiError(422, f"{what} contains a NUL byte", "bad_path")
    if p.startswith("file://"):
        p = p[len("file://") :]
    elif p.startswith("file:"):
        p = p[len("file:") :]
    elif "://" in p:
        raise ApiError(
            422, f"{what} {raw!r}: only local paths inside the data roots are accepted", "bad_path"
        )
    if any(ch in p for ch in GLOB_CHARS):
        # Spark expands Hadoop glob patterns ({a,b}, *, ?, [..]) in every path it reads or writes:
        # a pattern would escape the literal check below (issue 15: "{x,../outside}").
        raise ApiError(
            422, f"{what} {raw!r} contains a glob character ({GLOB_CHARS}); give a literal path", "bad_path"
        )
    if ".." in p.replace("\\", "/").split("/"):
        raise ApiError(403, f"{what} {raw!r} contains '..'; give a path inside the data roots", "path_escape")
    if not roots:
        raise ApiError(403, "the server has no data roots; start it with --data-root DIR", "no_data_roots")
    candidates = [p] if os.path.isabs(p) else [os.path.join(r, p) for r in roots]
    for cand in candidates:
        resolved = os.path.realpath(cand)
        root = next((r for r in roots if _within(resolved, r)), None)
        if root is None:
            continue
        if must_exist and not os.path.exists(resolved):
            continue
        return resolved
    if must_exist and any(any(_within(os.path.realpath(c), r) for r in roots) for c in candidates):
        raise ApiError(404, f"{what} {raw!r} does not exist", "not_found")
    raise ApiError(403, f"{what} {raw!r} is outside the data roots ({', '.join(roots)})", "path_escape")


def relative_name(path: str, roots: list[str]) -> str:
    """How listings name a path: relative to its data root (prefixed with the root's index if several)."""
    for i, r in enumerate(roots):
        if _within(path, r):
            rel = os.path.relpath(path, r)
            return rel if i == 0 else os.path.join(r, rel)
    return path


def check_image(data: bytes, settings: Settings, name: str = "upload") -> None:
    """Size and pixel limits, read from the header before any pixel is decoded: 413 / 422.

    The pixel limit is :func:`sparkvision.data.images.open_image`, the check ingest and decoding
    use, with the server's own (smaller) ``settings.max_pixels``. A corrupt body past the header is
    caught by the decoder (:func:`sparkvision.transforms.preprocess.decode_image` raises
    :class:`RejectError`), which the endpoints turn into 422 too.
    """
    if len(data) > settings.max_upload_bytes:
        raise ApiError(
            413, f"{name} is {len(data):,} bytes; the limit is {settings.max_upload_bytes:,}", "too_large"
        )
    try:
        open_image(data, settings.max_pixels)
    except RejectError as e:
        err = reject_to_api(e, name)
        err.status = 413 if e.reason == "too_many_pixels" else err.status
        raise err from None


def reject_to_api(e: RejectError, name: str) -> ApiError:
    return ApiError(422, f"{name}: {e.reason}" + (f" ({e.detail})" if e.detail else ""), e.reason)
