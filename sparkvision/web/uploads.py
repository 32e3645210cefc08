"""Reading uploaded images: bounded body reads and a fast path for small, plain multipart bodies.

:func:`read_uploads` is what the classify and search endpoints call.

``/api/classify`` is the server's hot path, and a general multipart parser (python-multipart
callbacks) costs ~50 us per small request. Browsers and HTTP clients send something much simpler:
``--boundary CRLF headers CRLF CRLF data CRLF --boundary ... --boundary--``.
:func:`parse_simple_multipart` splits such a body with ``bytes.find`` and returns ``None`` for
anything else (a preamble, an epilogue, a part without ``Content-Disposition: form-data;
name=...``, undecodable names, more parts than allowed), so the caller falls back to
:func:`stream_uploads` (python-multipart), which gives the same answers and the errors of the
general parser for every unusual body. Multipart bodies over ``FAST_MULTIPART_BYTES`` (or chunked
ones) go to :func:`stream_uploads` directly: parsed as they stream in, each kept file bounded by
the per-file limit as its bytes arrive. Unlike Starlette's form parser, nothing is spooled to a
temporary file, so a too-large upload is refused after at most ``limit`` bytes of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from sparkvision.web.security import ApiError, Settings

if TYPE_CHECKING:  # python-multipart defines its callback types for type checkers only
    from python_multipart.multipart import MultipartCallbacks

FAST_MULTIPART_BYTES = 4 * 1024 * 1024  # larger multipart bodies are streamed, not held in memory
RAW_TYPES = ("image/", "application/octet-stream")

# The request body of an upload endpoint for the OpenAPI schema: those endpoints read the body
# themselves (no FastAPI File() parameters), so the schema has to be given.
UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "file": {"type": "string", "format": "binary"},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


async def read_uploads(
    request: Request, settings: Settings, field_names: tuple[str, ...], max_files: int
) -> list[tuple[str, bytes]]:
    """``(filename, bytes)`` per uploaded image: multipart fields ``field_names`` or one raw body.

    Every file is bounded by ``settings.max_upload_bytes`` (413) as it streams in, so a too-large
    file is refused as soon as its bytes pass the limit, never received whole or spooled to disk;
    the whole body is bounded by the ``BodyLimit`` middleware. No image at all is a 422, another
    content type a 415.
    """
    ctype = request.headers.get("content-type", "")
    limit = settings.max_upload_bytes
    if ctype.startswith("multipart/form-data"):
        boundary = multipart_boundary(ctype)
        if boundary is None:
            raise ApiError(
                400, "could not read the multipart body: the Content-Type has no boundary", "bad_upload"
            )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) <= FAST_MULTIPART_BYTES:  # small: read it, split it
            body = await read_body(request, FAST_MULTIPART_BYTES)
            parts = parse_simple_multipart(body, boundary, max_files, max_files + 10)
            if parts is None:
                out = await stream_uploads(one_chunk(body), boundary, field_names, max_files, limit)
            else:  # the usual shape, split without the general parser
                out = []
                for key, filename, data in parts:
                    if key in field_names and filename is not None:
                        name = filename or key
                        if len(data) > limit:
                            raise ApiError(
                                413, f"{name} is over the {limit:,}-byte upload limit", "too_large"
                            )
                        out.append((name, data))
        else:  # big or chunked: parsed as it streams in
            out = await stream_uploads(request.stream(), boundary, field_names, max_files, limit)
        if not out:
            raise ApiError(
                422, f"no image uploaded: send multipart field {' or '.join(field_names)!s}", "no_upload"
            )
        return out
    if ctype.startswith(RAW_TYPES):
        data = await read_body(request, limit)  # one image: never hold more than the per-file limit
        if len(data) > limit:
            raise ApiError(413, f"upload is {len(data):,} bytes; the limit is {limit:,}", "too_large")
        return [("upload", data)]
    raise ApiError(
        415,
        "send images as multipart/form-data (field 'files') or as a raw image/* body",
        "unsupported_media_type",
    )


def header_text(raw: bytes) -> str:
    """A part's field or file name: UTF-8, else Latin-1 (what Starlette's parser does)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class UploadParts:
    """python-multipart callbacks that keep the file parts named ``field_names`` in memory.

    A kept file is refused (413) the moment its data passes ``limit`` bytes; the other parts are
    counted (``max_files`` files, ``max_files + 10`` fields, as Starlette's form parser allows)
    and dropped as they stream past. Nothing goes to disk.
    """

    def __init__(self, field_names: tuple[str, ...], max_files: int, limit: int) -> None:
        self.field_names = field_names
        self.max_files = max_files
        self.max_fields = max_files + 10
        self.limit = limit
        self.files = self.fields = 0
        self.out: list[tuple[str, bytes]] = []
        self.header_name = self.header_value = self.disposition = b""
        self.name = ""
        self.data: bytearray | None = None  # the part being kept

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.disposition, self.data = b"", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise ApiError(
                400,
                "could not read the multipart body: a part's Content-Disposition has no name",
                "bad_upload",
            )
        field = header_text(options[b"name"])
        if b"filename" in options:
            self.files += 1
            if self.files > self.max_files:
                raise ApiError(
                    400,
                    f"could not read the multipart body: too many files (at most {self.max_files})",
                    "bad_upload",
                )
            if field in self.field_names:
                self.name, self.data = header_text(options[b"filename"]) or field, bytearray()
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise ApiError(
                    400,
                    f"could not read the multipart body: too many fields (at most {self.max_fields})",
                    "bad_upload",
                )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.data is not None:
            if len(self.data) + end - start > self.limit:
                raise ApiError(413, f"{self.name} is over the {self.limit:,}-byte upload limit", "too_large")
            self.data += data[start:end]

    def on_part_end(self) -> None:
        if self.data is not None:
            self.out.append((self.name, bytes(self.data)))
            self.data = None


async def stream_uploads(
    chunks: AsyncIterator[bytes], boundary: bytes, field_names: tuple[str, ...], max_files: int, limit: int
) -> list[tuple[str, bytes]]:
    """``(filename, bytes)`` per file part named in ``field_names`` of a multipart body, parsed
    chunk by chunk as it arrives (see :class:`UploadParts` for the limits)."""
    parts = UploadParts(field_names, max_files, limit)
    parser = MultipartParser(boundary, parts.callbacks())
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:  # malformed multipart is the client's error
        raise ApiError(400, f"could not read the multipart body: {e}", "bad_upload") from None
    return parts.out


async def one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


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


def multipart_boundary(content_type: str) -> bytes | None:
    _, params = parse_options_header(content_type)
    return params.get(b"boundary") or None


def parse_simple_multipart(
    body: bytes, boundary: bytes, max_files: int, max_fields: int
) -> list[tuple[str, str | None, bytes]] | None:
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
            return parts if body[pos + 2 :] in (b"", b"\r\n") else None
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
