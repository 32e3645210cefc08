"""Reading uploaded images: bounded body reads and a fast path for small, plain multipart bodies.

:func:`read_uploads` is what the classify and search endpoints call.

``/api/classify`` is the server's hot path, and Starlette's general form parser (python-multipart
callbacks, a spooled temporary file per file part) costs ~50 us per small request. Browsers and
HTTP clients send something much simpler: ``--boundary CRLF headers CRLF CRLF data CRLF
--boundary ... --boundary--``. :func:`parse_simple_multipart` splits such a body with
``bytes.find`` and returns ``None`` for anything else (a preamble, an epilogue, a part without
``Content-Disposition: form-data; name=...``, undecodable names, more parts than allowed), so the
caller falls back to Starlette's parser, which then gives the same answers and the same errors as
before for every unusual body. Multipart bodies over ``FAST_MULTIPART_BYTES`` (or chunked ones)
go to Starlette's streaming parser directly, as before, so a big upload is never held in memory.
"""

from __future__ import annotations

from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.requests import Request

from sparkvision.web.security import ApiError, Settings

FAST_MULTIPART_BYTES = 4 * 1024 * 1024  # larger multipart bodies are streamed, not held in memory
RAW_TYPES = ("image/", "application/octet-stream")

# The request body of an upload endpoint for the OpenAPI schema: those endpoints read the body
# themselves (no FastAPI File() parameters), so the schema has to be given.
UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "file": {"type": "string", "format": "binary"}}}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


async def read_uploads(request: Request, settings: Settings, field_names: tuple[str, ...],
                       max_files: int) -> list[tuple[str, bytes]]:
    """``(filename, bytes)`` per uploaded image: multipart fields ``field_names`` or one raw body.

    Every file is bounded by ``settings.max_upload_bytes`` (413) and the whole body by
    ``settings.max_request_bytes``; no image at all is a 422, another content type a 415.
    """
    ctype = request.headers.get("content-type", "")
    limit = settings.max_upload_bytes
    if ctype.startswith("multipart/form-data"):
        length = request.headers.get("content-length", "")
        parts = None
        if length.isdigit() and int(length) <= FAST_MULTIPART_BYTES:  # small: read it, split it
            body = await read_body(request, FAST_MULTIPART_BYTES)
            boundary = multipart_boundary(ctype)
            parts = parse_simple_multipart(body, boundary, max_files, max_files + 10) if boundary else None
            if parts is None:
                request = replay(request, body)
        else:  # big or chunked: Starlette's parser streams it to spooled files, bounded in total
            request = capped(request, settings.max_request_bytes)
        if parts is not None:  # the usual shape, split without the general parser
            out = []
            for key, filename, data in parts:
                if key in field_names and filename is not None:
                    name = filename or key
                    if len(data) > limit:
                        raise ApiError(413, f"{name} is over the {limit:,}-byte upload limit", "too_large")
                    out.append((name, data))
        else:
            out = await form_uploads(request, field_names, max_files, limit)
        if not out:
            raise ApiError(422, f"no image uploaded: send multipart field {' or '.join(field_names)!s}",
                           "no_upload")
        return out
    if ctype.startswith(RAW_TYPES):
        data = await read_body(request, limit)  # one image: never hold more than the per-file limit
        if len(data) > limit:
            raise ApiError(413, f"upload is {len(data):,} bytes; the limit is {limit:,}", "too_large")
        return [("upload", data)]
    raise ApiError(415, "send images as multipart/form-data (field 'files') or as a raw image/* body",
                   "unsupported_media_type")


async def form_uploads(request: Request, field_names: tuple[str, ...], max_files: int,
                       limit: int) -> list[tuple[str, bytes]]:
    """Any multipart body, through Starlette's general parser (the fallback of the fast path)."""
    out = []
    try:
        async with request.form(max_files=max_files, max_fields=max_files + 10) as form:
            for key, value in form.multi_items():
                if key in field_names and isinstance(value, UploadFile):
                    data = await value.read(limit + 1)
                    name = value.filename or key
                    if len(data) > limit:
                        raise ApiError(413, f"{name} is over the {limit:,}-byte upload limit", "too_large")
                    out.append((name, data))
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed multipart is the client's error
        raise ApiError(400, f"could not read the multipart body: {e}", "bad_upload") from None
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refused with 413 once it passes ``limit`` bytes.

    The ``BodyLimit`` middleware already refuses a too-large Content-Length; this also bounds a
    chunked body, which has none.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the {limit:,}-byte limit", "too_large")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def capped(request: Request, limit: int) -> Request:
    """A copy of ``request`` whose body stream raises a 413 :class:`ApiError` once past ``limit`` bytes."""
    receive = request.receive
    seen = 0

    async def counting_receive():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, f"request body is over the {limit:,}-byte limit", "too_large")
        return message

    return Request(request.scope, counting_receive)


def replay(request: Request, body: bytes) -> Request:
    """A copy of ``request`` whose body is ``body`` (already read), for Starlette's form parser."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def multipart_boundary(content_type: str) -> bytes | None:
    _, params = parse_options_header(content_type)
    return params.get(b"boundary") or None


def parse_simple_multipart(body: bytes, boundary: bytes, max_files: int,
                           max_fields: int) -> list[tuple[str, str | None, bytes]] | None:
    """``(field name, filename or None, data)`` per part of a plain multipart body, or ``None``.

    ``None`` means "not the simple shape": the caller must use the general parser.
    """
    delim = b"--" + boundary
    sep = b"\r\n" + delim
    if not body.startswith(delim):
        return None  # a preamble
    pos = len(delim)
    parts: list[tuple[str, str | None, bytes]] = []
    files = fields = 0
    while True:
        if body.startswith(b"--", pos):  # the close delimiter
            return parts if body[pos + 2:] in (b"", b"\r\n") else None
        if not body.startswith(b"\r\n", pos):
            return None
        pos += 2
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return None
        disposition = None
        for line in body[pos:head_end].split(b"\r\n"):
            key, colon, value = line.partition(b":")
            if not colon or not key or key != key.strip():
                return None
            if key.lower() == b"content-disposition":
                disposition = value.strip()
        if disposition is None:
            return None
        kind, options = parse_options_header(disposition)
        if kind != b"form-data" or not options.get(b"name"):
            return None
        try:
            name = options[b"name"].decode()
            filename = options[b"filename"].decode() if b"filename" in options else None
        except UnicodeDecodeError:
            return None
        if filename is None:
            fields += 1
        else:
            files += 1
        if files > max_files or fields > max_fields:
            return None  # the general parser raises its "too many" error
        start = head_end + 4
        end = body.find(sep, start)
        if end < 0:
            return None
        parts.append((name, filename, body[start:end]))
        pos = end + len(sep)
