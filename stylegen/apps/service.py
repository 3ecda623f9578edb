"""HTTP service: genre of a cover, similar covers, thumbnails and the web page.

``create_app(engine)`` builds a FastAPI app around an :class:`~stylegen.query.engine.Engine`: every
query endpoint is a thin adapter over ``Engine.query`` (the path the CLI and ``evaluate`` take),
so an upload gets exactly the answer ``stylegen classify`` gives for the same file, a cover of
the index included (found by content hash, its own vote left out). Nothing lives at module
level: every app owns its engine, its limits, its static files and its lock.

Micro-batching, thread safety and memory: FastAPI runs the (synchronous) endpoints in its
thread pool. A query request takes one of ``max_queue`` places (else 503 with ``Retry-After``),
reads its upload (at most ``max_upload_bytes``) and has it read by ``Engine.prepare`` (content
hash, index lookup, decoding with the index's preprocessing) in its own thread, at most
``decode_slots`` at a time (default 1: the one decode limiter, thumbnails included; a decoded
image at the pixel limit is ~120 MB), while the worker runs the previous batch. It then waits for
:class:`~stylegen.apps.batching.Batcher`'s one worker, which answers up to ``batch_size``
requests that arrived within ``batch_window_ms`` with one ``Engine.query_batch`` call (one
forward pass, the same answers as one at a time) under a ``threading.Lock`` owned by the app,
the lock every other engine call takes too. Uploads must be JPEG, PNG, WebP, GIF or BMP by
their first bytes; nothing else reaches a decoder.

Access (like Jupyter's): requests whose Host is not a loopback name or an allowed name are
refused (DNS rebinding); with a token every route but ``/healthz`` asks for it (``Authorization:
Bearer``, or ``?token=`` once in the browser, then an HttpOnly SameSite=Strict cookie); the query
routes and failed logins are rate-limited per client address. :func:`hosts_for_bind` refuses to
expose the service beyond loopback without a token.

Bad input is answered with a 4xx and ``{"error": "one-line message"}`` (server paths left out);
the server keeps serving.
"""

from __future__ import annotations

import functools
import hmac
import io
import ipaddress
import json
import math
import mimetypes
import pathlib
import re
import threading
import time
from collections.abc import Callable, Iterable
from http.cookies import SimpleCookie
from importlib import resources
from typing import IO, Annotated, Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stylegen.apps.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_PENDING, DEFAULT_WINDOW_S, Batcher
from stylegen.errors import (
    BadImageError,
    ImageTooLargeError,
    IndexMismatchError,
    IndexNotFoundError,
    ModelNotFoundError,
    StylegenError,
    UnknownCoverError,
    UnsupportedImageError,
)
from stylegen.query.options import BY, DEFAULT_K, DEFAULT_TOP, MAX_K, MAX_TOP, METHODS, By, Method
from stylegen.sources.images import DEFAULT_MAX_PIXELS, open_image, pixel_limit

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
THUMBNAIL_SIDE = 256
# Room for multipart boundaries, part headers and the small form fields around the image.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # Host names always accepted (any port)
WILDCARD_BINDS = ("0.0.0.0", "::", "")
DEFAULT_RATE_LIMIT = "120/min"  # per client, for POST /classify and /similar (and failed logins)
PUBLIC_PATHS = frozenset({"/healthz"})  # answered without the token
LIMITED_PATHS = frozenset({"/classify", "/similar"})  # they decode, embed and search
TOKEN_COOKIE = "stylegen_token"
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 b64token: safe in a header and a cookie
UPLOAD_FORMATS = "JPEG, PNG, WebP, GIF or BMP"
# an absolute path (POSIX, ~/..., C:\...), not a URL or a media type like image/jpeg; in quotes
# it may hold spaces
ABSOLUTE_PATH = re.compile(r"""(?<=(?P<q>['"]))(?:~|[A-Za-z]:)?[/\\][^'"\n]*(?=(?P=q))"""
                           r"""|(?<![\w.~:/\\-])(?:~|[A-Za-z]:)?(?:[/\\][^\s/\\'"`]+)+[/\\]?""")

T = TypeVar("T")


class Engine(Protocol):
    """What the service needs from an index + heads (see ``stylegen.query.engine.Engine``)."""

    def query(self, item: Any, *, top: int = 3, method: str | None = None, k: int = 0,
              by: str = "both", classify: bool = True, label: str | None = None) -> Any:
        """A ``QueryResult``: ``genres``, ``levels``, ``neighbours``, ``row``, ``size``."""
        ...

    def cover_path(self, cover_id: int) -> pathlib.Path:
        """The image file of a cover; ``UnknownCoverError`` for an unknown id."""
        ...

    def info(self) -> dict:
        """``{"count", "backbone", "parts", "genres", ...}``."""
        ...

    # Optional (``stylegen.query.engine.Engine`` has both; without them an upload is decoded
    # by ``query`` in the batch worker, one request at a time):
    # prepare(item, label) -> prepared item; query_batch([(item, options), ...]) -> results.


# --------------------------------------------------------------------------- errors


class RequestError(StylegenError):
    """The request itself is malformed (no query given, two queries given)."""

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status


def http_status_for(exc: StylegenError) -> int:
    """The HTTP status a user-facing error is answered with."""
    status = getattr(exc, "http_status", None)
    if isinstance(status, int):
        return status
    if isinstance(exc, IndexMismatchError | IndexNotFoundError | ModelNotFoundError):
        return 500  # the server is misconfigured, not the request
    return 400


def one_line(message: object) -> str:
    """Collapse a message to one line."""
    return " ".join(str(message).split()) or "error"


def redact_paths(message: str, private: Iterable[str] = ()) -> str:
    """``message`` without server paths: each ``private`` path (the index folder) becomes "the
    index", any other absolute path its last part (``/srv/covers/a.jpg: truncated`` ->
    ``a.jpg: truncated``)."""
    for path in sorted((p for p in private if "/" in p or "\\" in p), key=len, reverse=True):
        message = message.replace(path, "the index")
    return ABSOLUTE_PATH.sub(lambda m: re.split(r"[/\\]", m.group().rstrip("/\\"))[-1], message)


def private_paths(engine: Any) -> tuple[str, ...]:
    """The engine's index folder as given and resolved (left out of error messages), if known."""
    root = getattr(getattr(engine, "index", None), "root", None)
    if root is None:
        return ()
    root = pathlib.Path(root)
    return str(root), str(root.resolve())


def validation_message(errors: list[dict[str, Any]]) -> str:
    """One line from FastAPI's validation errors: ``by: Input should be 'style', ...``."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
        name = ".".join(loc) or "request"
        parts.append(f"{name}: {error.get('msg', 'invalid')}")
    return one_line("; ".join(parts) or "invalid request")


# --------------------------------------------------------------------------- images


def thumbnail_jpeg(path: pathlib.Path, max_side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of the image at ``path`` with its longer side at most ``max_side``."""
    try:
        small = open_image(path, draft_size=max_side)
    except BadImageError as exc:
        raise type(exc)(f"{path.name}: {exc}") from None
    small.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85, optimize=True)
    return buffer.getvalue()


def image_format(data: bytes) -> str | None:
    """The upload's format from its first bytes (JPEG, PNG, WEBP, GIF, BMP), else None.

    Only these reach a decoder: Pillow would otherwise try every format it knows (TIFF, PPM,
    EPS handed to Ghostscript, ...) on whatever is uploaded.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    return None


def read_limited(file: IO[bytes], max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` from ``file``; ``ImageTooLargeError`` if there is more."""
    data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"upload is larger than the limit of {max_bytes:,} bytes")
    return data


def text_part_bytes(value: str) -> bytes:
    """The bytes of a multipart part that arrived without a filename (as text).

    Starlette decodes such a part as UTF-8, or as Latin-1 when it is not valid UTF-8. An
    image is never valid UTF-8 (PNG starts with 0x89, JPEG with 0xFF, GIF and WebP carry
    binary sizes), so its Latin-1 text encodes back to the exact bytes sent; text that was
    valid UTF-8 goes back to UTF-8 (and is then refused as not an image).
    """
    try:
        raw = value.encode("latin-1")
        raw.decode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8")
    except UnicodeDecodeError:
        return raw
    return raw if value.isascii() else value.encode("utf-8")


# --------------------------------------------------------------------------- JSON


def to_plain(value: Any) -> Any:
    """Engine output as plain JSON types (numpy scalars and arrays, paths, tuples)."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if hasattr(value, "tolist"):
        return to_plain(value.tolist())
    return str(value)


def thumbnail_url(cover_id: int) -> str:
    return f"/covers/{int(cover_id)}"


def with_thumbnails(neighbours: list[dict]) -> list[dict]:
    """Each neighbour with ``"thumbnail": "/covers/{id}"`` added."""
    return [{**n, "thumbnail": thumbnail_url(n["id"])} for n in neighbours]


def error_response(status: int, message: object) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status)


def load_static(package: str = "stylegen", folder: str = "static") -> dict[str, bytes]:
    """The web page's files, by name, read from the installed package."""
    root = resources.files(package) / folder
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


# --------------------------------------------------------------------------- access


def host_name(value: str) -> str:
    """A Host header's name without its port, lower case: ``[::1]:8000`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else ""
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_loopback(host: str) -> bool:
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str | None:
    """The token, or None for none; a clear error for one that cannot travel in a header."""
    if token is None:
        return None
    if not TOKEN_CHARS.fullmatch(token):
        raise StylegenError("the token must be non-empty and use only letters, digits and - . _ ~ + / = "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    return token


def hosts_for_bind(bind: str, token: str | None, allow_hosts: Iterable[str] = ()) -> tuple[str, ...]:
    """The Host names (beyond loopback) to accept when serving on ``bind``.

    Beyond loopback a token is required (else the one-line refusal). Then the bound name or
    address is accepted as well as ``allow_hosts``; binding every interface (``0.0.0.0``,
    ``::``) with no ``allow_hosts`` accepts any Host ("*"), as Jupyter does for remote
    access: the token, not the Host name, guards it, and a page that rebinds a name gets no
    token (the cookie belongs to the name the user opened).
    """
    token = check_token(token)
    hosts = tuple(allow_hosts)
    allowed_host_names(hosts)  # a clear error for a bad name, before anything starts
    if is_loopback(bind):
        return hosts
    if token is None:
        raise StylegenError(f"refusing to serve on {bind or '0.0.0.0'} without a token: anyone who can reach it could "
                            "read every cover; give --token TOKEN (or set STYLEGEN_TOKEN), or bind 127.0.0.1")
    if bind in WILDCARD_BINDS:
        return hosts or ("*",)
    return (bind, *hosts)


def allowed_host_names(hosts: Iterable[str]) -> frozenset[str]:
    """Loopback names plus ``hosts`` (any port; "*": any name), checked and normalised."""
    names = set(LOOPBACK_HOSTS)
    for host in hosts:
        name = "*" if host.strip() == "*" else host_name(host)
        if name != "*" and not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*)|[0-9a-f:.]+", name):
            raise StylegenError(f"not a host name: {host!r} (give a name or an address, e.g. --allow-host example.org)")
        names.add(name)
    return frozenset(names)


class RateLimiter:
    """A token bucket per client: ``count`` requests per ``seconds``, in bursts of up to ``count``.

    Used from the event loop only (by :class:`GuardMiddleware`), so it needs no lock. Clients
    whose bucket has refilled are forgotten once more than ``max_clients`` are remembered.
    """

    def __init__(self, count: float, seconds: float, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000) -> None:
        self.capacity = count
        self.rate = count / seconds  # tokens a second
        self.clock = clock
        self.max_clients = max_clients
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)

    @classmethod
    def parse(cls, text: str | None) -> RateLimiter | None:
        """``120/min`` (also ``N/s``, ``N/h``); None for ``0``, ``off`` or None (no limit)."""
        if text is None or text.strip().lower() in ("0", "off", "none"):
            return None
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*", text, re.IGNORECASE)
        if not match or int(match[1]) < 1:
            raise StylegenError(f"rate limit {text!r} is not N/min (or N/s, N/h) with N >= 1, or off")
        return cls(int(match[1]), {"s": 1.0, "m": 60.0, "h": 3600.0}[match[2][0].lower()])

    def take(self, client: str) -> float:
        """0.0 when ``client`` may go ahead (a token is taken), else the seconds until it may."""
        now = self.clock()
        tokens, then = self.buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        allowed = tokens >= 1
        self.buckets[client] = (tokens - 1 if allowed else tokens, now)
        if len(self.buckets) > self.max_clients:
            self._forget_full(now)
        return 0.0 if allowed else (1 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        self.buckets = {client: (tokens, then) for client, (tokens, then) in self.buckets.items()
                        if tokens + (now - then) * self.rate < self.capacity}


def presented_tokens(scope: Scope, headers: Headers) -> list[str]:
    """What the request offers as the token: ``Authorization: Bearer``, the cookie, ``?token=``."""
    offered = []
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(value.strip())
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header offers nothing
        cookie.clear()
    if TOKEN_COOKIE in cookie:
        offered.append(cookie[TOKEN_COOKIE].value)
    return offered + query_tokens(scope)


def query_tokens(scope: Scope) -> list[str]:
    return [v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")) if k == "token"]


def token_matches(offered: str, token: str) -> bool:
    """Constant-time comparison (of UTF-8 bytes: ``compare_digest`` refuses non-ASCII text)."""
    return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), token.encode("utf-8"))


def drop_query_token(scope: Scope) -> bool:
    """Remove ``token=`` from the request's query string in place, so that neither the routes
    nor uvicorn's access log (which reads the same scope) see it; True if there was one."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k != "token"]
    if len(kept) == len(pairs):
        return False
    scope["query_string"] = urlencode(kept).encode("latin-1")
    return True


def token_cookie(token: str, scope: Scope) -> bytes:
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    return f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{secure}".encode("latin-1")


def with_header(send: Send, name: bytes, value: bytes) -> Send:
    """``send`` that adds one header to the response."""

    async def send_with_header(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return send_with_header


class GuardMiddleware:
    """Host check, then the token, then the rate limit, before any route reads the body.

    The rate limit counts the query routes and every request that fails the token, per
    client address (uvicorn's, so behind a local proxy the forwarded one). A valid
    ``?token=`` on a GET (the page opened from the link ``stylegen serve`` prints) sets
    the token cookie, so the page's own requests and thumbnails carry it from then on.
    """

    def __init__(self, app: ASGIApp, hosts: frozenset[str], token: str | None,
                 limiter: RateLimiter | None) -> None:
        self.app = app
        self.hosts = hosts
        self.token = token
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        token = self.token
        in_url = token is not None and any([token_matches(t, token) for t in query_tokens(scope)])
        if drop_query_token(scope) and token is not None and in_url and scope["method"] == "GET":
            send = with_header(send, b"set-cookie", token_cookie(token, scope))
        await self.app(scope, receive, send)

    def host_allowed(self, headers: Headers) -> bool:
        return "*" in self.hosts or host_name(headers.get("host", "")) in self.hosts

    def authorized(self, scope: Scope, headers: Headers) -> bool:
        if self.token is None or scope["path"] in PUBLIC_PATHS:
            return True
        return any([token_matches(t, self.token) for t in presented_tokens(scope, headers)])

    def refusal(self, scope: Scope, headers: Headers) -> Response | None:
        """The error response for a request that may not go on, or None."""
        if not self.host_allowed(headers):
            name = " ".join(headers.get("host", "").split())[:100] or "(none)"
            return error_response(400, f"host not allowed: {name} (stylegen serve --allow-host NAME accepts a name)")
        authorized = self.authorized(scope, headers)
        if self.limiter is not None and (scope["path"] in LIMITED_PATHS or not authorized):
            client = scope.get("client")
            wait = self.limiter.take(client[0] if client else "unknown")
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                response = error_response(429, f"too many requests: try again in {seconds} s")
                response.headers["Retry-After"] = str(seconds)
                return response
        if not authorized:
            response = error_response(401, "a token is required: send 'Authorization: Bearer TOKEN', "
                                           "or open the page once as /?token=TOKEN")
            response.headers["WWW-Authenticate"] = 'Bearer realm="stylegen"'
            return response
        return None



def content_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when absent or malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a 413 before they fill memory or disk.

    With a declared Content-Length over the limit, the first read of the body fails, so none
    of it is read; otherwise the bytes are counted as they arrive (chunked uploads) and the
    read that passes the limit fails. Either way the route answers 413 (as JSON).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = content_length(scope)
        if length is not None and length > self.max_bytes:
            await self.app(scope, _refuse_body, send)  # the route's reader raises the 413
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited_receive, send)


async def _refuse_body() -> Message:
    raise StarletteHTTPException(413)


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "malformed request (both an image and an id)", 404: "unknown cover id",
            413: "upload or image too large", 415: f"not a {UPLOAD_FORMATS} image",
            422: "invalid or missing field", 500: "server misconfigured (index or heads missing)",
            401: "the token is missing or wrong", 429: "too many requests (see Retry-After)",
            503: "the service is busy: its queue is full (see Retry-After)"}
    return {c: {"description": text[c], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for c in codes}


IMAGE_MEDIA_TYPES = "image/jpeg, image/png, image/webp, image/gif, image/bmp"


def _query_body(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI request body: multipart form with exactly one of ``image`` or ``id``.

    ``oneOf`` with one ``required`` each says "exactly one": a body with both matches both
    branches and one with neither matches none. The image part's media types are declared
    in ``encoding``, so generated requests (schemathesis) send images, not arbitrary bytes.
    """
    properties = {
        "image": {"type": "string", "format": "binary", "description": f"a cover image ({UPLOAD_FORMATS})"},
        "id": {"type": "integer", "minimum": 0, "description": "a cover id in the index"},
        **fields,
    }
    schema = {"type": "object", "properties": properties,
              "oneOf": [{"required": ["image"]}, {"required": ["id"]}]}
    return {"required": True, "content": {"multipart/form-data": {
        "schema": schema, "encoding": {"image": {"contentType": IMAGE_MEDIA_TYPES}}}}}


def with_query_bodies(schema: dict[str, Any], bodies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The generated OpenAPI ``schema`` with the request body of each ``POST path`` in
    ``bodies`` replaced by the declared one (FastAPI's own says every field is optional and
    would be merged with ours), and the component schemas only those bodies used removed."""
    dropped = set()
    for path, body in bodies.items():
        operation = schema["paths"][path]["post"]
        ref = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {}).get("$ref")
        if ref:
            dropped.add(ref.rsplit("/", 1)[-1])
        operation["requestBody"] = body
    components = schema.get("components", {}).get("schemas", {})
    text = json.dumps(schema["paths"])
    for name in dropped:
        if f"/{name}\"" not in text:
            components.pop(name, None)
    return schema


EXPLAIN_FIELD = {"explain": {"type": "boolean", "default": False,
                             "description": "add the kNN voters and each tap layer's share"}}
TOP_FIELD = {"top": {"type": "integer", "minimum": 1, "maximum": MAX_TOP, "default": DEFAULT_TOP}}
METHOD_FIELD = {"method": {"type": "string", "enum": list(METHODS),
                           "description": "default: the index's validated best"}}
SIMILAR_FIELDS = {"k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K},
                  "by": {"type": "string", "enum": list(BY), "default": "both"},
                  "verify": {"type": "boolean", "default": False}}

IdForm = Annotated[int | None, Form(alias="id", ge=0, description="cover id in the index")]
# an image part without a filename arrives as text (RFC 7578 makes the filename optional)
ImageFile = Annotated[UploadFile | str | None, File(description=f"a cover image ({UPLOAD_FORMATS})")]


DEFAULT_DECODE_SLOTS = 1  # one decoded image in memory at a time; it still overlaps the batch running


class _Service:
    """What the routes share: the engine, the lock that serialises its calls, the decode
    slots (the one decode limiter), the batcher, the upload limit, a thumbnail cache, the maps
    laid out so far and the paths error messages leave out."""

    def __init__(self, engine: Engine, max_upload_bytes: int, *, batch_size: int = DEFAULT_MAX_BATCH,
                 batch_window_ms: float = 1000 * DEFAULT_WINDOW_S, max_queue: int = DEFAULT_MAX_PENDING,
                 decode_slots: int | None = None, forward_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.engine = engine
        self.forward_batch = forward_batch
        self.max_upload_bytes = max_upload_bytes
        self.lock = threading.Lock()
        self.decoding = threading.BoundedSemaphore(decode_slots or DEFAULT_DECODE_SLOTS)
        self.batcher = Batcher(self._run_batch, max_batch=batch_size, window=batch_window_ms / 1000,
                               max_pending=max_queue)
        self.maps: dict[str, dict] = {}  # by -> the map's data, laid out once per app
        self.thumbnail = functools.lru_cache(maxsize=512)(self._thumbnail)
        self.private = private_paths(engine)

    def locked(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return fn(*args, **kwargs)

    def _thumbnail(self, path: str) -> bytes:
        with self.decoding:
            return thumbnail_jpeg(pathlib.Path(path), THUMBNAIL_SIDE)

    def _run_batch(self, requests: list[tuple[Any, dict[str, Any]]]) -> list[Any]:
        """The batcher's worker: one ``query_batch`` for the batch (or ``query`` per request
        for an engine without it); one result or exception per request."""
        with self.lock:
            batch = getattr(self.engine, "query_batch", None)
            if batch is not None:
                return batch(requests, batch_size=self.forward_batch)
            out: list[Any] = []
            for item, options in requests:
                try:
                    out.append(self.engine.query(item, **options))
                except Exception as exc:  # noqa: BLE001  (answered to its own request only)
                    out.append(exc)
            return out

    def public_message(self, exc: Exception) -> str:
        """The error's message without server paths."""
        return redact_paths(one_line(exc), self.private)

    def too_large(self) -> str:
        return f"upload is larger than the limit of {self.max_upload_bytes:,} bytes"

    def upload_bytes(self, image: UploadFile | str) -> tuple[bytes, str]:
        """The upload's bytes (at most the limit) and its file name."""
        if isinstance(image, str):  # a part without a filename
            data, filename = text_part_bytes(image), ""
            if len(data) > self.max_upload_bytes:
                raise ImageTooLargeError(self.too_large())
        else:
            data, filename = read_limited(image.file, self.max_upload_bytes), image.filename or ""
        if not data:
            raise BadImageError("the upload is empty")
        if image_format(data) is None:
            raise UnsupportedImageError(f"not an image stylegen accepts: uploads must be {UPLOAD_FORMATS}")
        return data, filename

    def query(self, image: UploadFile | str | None, cover_id: int | None, **options: Any) -> tuple[dict, Any]:
        """(query description, QueryResult) for an upload or a cover id, answered in a batch
        of requests by ``Engine.query_batch`` (the same answer as ``Engine.query``)."""
        if image is not None and cover_id is not None:
            raise RequestError("give either an image or an id, not both", 400)
        if image is None and cover_id is None:
            raise RequestError("give an image upload (field 'image') or a cover id ('id')", 422)
        with self.batcher.admit():
            if cover_id is not None:
                result = self.batcher.call(cover_id, options)
                return {"kind": "id", "id": cover_id, "thumbnail": thumbnail_url(cover_id)}, result
            assert image is not None
            data, filename = self.upload_bytes(image)
            label = filename or "upload"
            item: Any = data
            prepare = getattr(self.engine, "prepare", None)
            if prepare is not None:  # hash, look up and decode here, while the worker runs a batch
                with self.decoding:
                    item = prepare(data, label)
            result = self.batcher.call(item, {**options, "label": label})
        width, height = result.size or (None, None)
        query = {"kind": "upload", "filename": filename, "bytes": len(data),
                 "width": width, "height": height, "in_index": result.row is not None}
        if result.row is not None:
            query["id"] = result.row
        return query, result


def create_app(
    engine: Engine,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    token: str | None = None,
    allowed_hosts: Iterable[str] = (),
    rate_limit: str | None = DEFAULT_RATE_LIMIT,
    batch_size: int = DEFAULT_MAX_BATCH,
    batch_window_ms: float = 1000 * DEFAULT_WINDOW_S,
    max_queue: int = DEFAULT_MAX_PENDING,
    decode_slots: int | None = None,
    forward_batch: int = DEFAULT_MAX_BATCH,
) -> FastAPI:
    """The stylegen HTTP app around ``engine``.

    Uploads are limited to ``max_upload_bytes`` (the request body is cut off while it is
    received, and at most ``max_upload_bytes + 1`` bytes of the file are read), to JPEG, PNG,
    WebP, GIF and BMP (by their first bytes) and to the pixel limit of
    :mod:`stylegen.sources.images` (checked from the header before decoding, the same limit as
    for the collection). Query requests are answered in micro-batches of up to ``batch_size``
    arriving within ``batch_window_ms`` (``batch_size=1``: one at a time); at most
    ``max_queue`` wait at once (more: 503 with ``Retry-After``); at most ``decode_slots``
    images are decoded at once (None: one); a batch goes through the
    featurizer ``forward_batch`` images at a time (the fastest size depends on the CPU:
    docs/benchmarks.md, issue 24). Engine calls are serialised
    by a lock owned by this app (see the module docstring).

    Requests must name a loopback host or one of ``allowed_hosts`` ("*": any) in their Host
    header; with a ``token`` every route but ``/healthz`` asks for it; ``rate_limit``
    (``N/min``, None: off) applies per client to the query routes and failed logins.
    The interactive docs (Swagger UI, ReDoc load scripts from a CDN) are off; the schema is
    at ``/openapi.json``.
    """
    static = load_static()
    if "index.html" not in static:
        raise FileNotFoundError("stylegen/static/index.html is missing from the package")
    token = check_token(token)
    limiter = RateLimiter.parse(rate_limit)
    app = FastAPI(
        title="stylegen",
        summary="Judge an album by its cover: genre and similar covers from cover art.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    app.add_middleware(GuardMiddleware, hosts=allowed_host_names(allowed_hosts), token=token, limiter=limiter)
    service = _Service(engine, max_upload_bytes, batch_size=batch_size, batch_window_ms=batch_window_ms,
                       max_queue=max_queue, decode_slots=decode_slots, forward_batch=forward_batch)
    app.state.service = service  # its batcher's counters, for load tests and tests
    _add_error_handlers(app, service)
    _add_query_routes(app, service)
    _add_collection_routes(app, service)
    _add_page_routes(app, static)
    app.openapi = functools.partial(_openapi, app, token is not None, limiter is not None)  # type: ignore[method-assign]
    return app


def _add_error_handlers(app: FastAPI, service: _Service) -> None:
    """Every error is ``{"error": "one line"}`` with its status."""

    @app.exception_handler(StylegenError)
    async def _stylegen_error(request: Request, exc: StylegenError) -> JSONResponse:
        response = error_response(http_status_for(exc), service.public_message(exc))
        if getattr(exc, "retry_after", None) is not None:  # the queue is full (503)
            response.headers["Retry-After"] = str(exc.retry_after)  # type: ignore[attr-defined]
        return response

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal server error (see the server's log)")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            message = service.too_large()
        elif exc.status_code == 404 and exc.detail == "Not Found":
            message = f"not found: {request.url.path}"
        else:
            message = exc.detail
        response = error_response(exc.status_code, message)
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response


def _add_query_routes(app: FastAPI, service: _Service) -> None:
    """``POST /classify`` and ``POST /similar``: thin adapters over ``Engine.query``."""

    @app.post("/classify", summary="Genre of a cover",
              responses=_error_responses(400, 404, 413, 415, 422, 500, 503))
    def classify(
        image: ImageFile = None,
        cover_id: IdForm = None,
        top: Annotated[int, Form(ge=1, le=MAX_TOP)] = DEFAULT_TOP,
        method: Annotated[Method | None, Form()] = None,
        explain: Annotated[bool, Form()] = False,
    ) -> dict:
        """Upload a cover as ``image`` or name one in the index with ``id``; ``top`` genres.

        Answers ``{"query": {...}, "method": ..., "genres": [{"genre", "probability", "path"},
        ...], "levels": {level: [{"genre", "probability"}, ...]}}``. A cover of the index
        (uploaded or by id) is answered from its stored vector, its own vote left out.
        """
        query, result = service.query(image, cover_id, top=top, method=method, explain=explain)
        answer = {"query": query, "method": result.method, "genres": to_plain(result.genres),
                  "levels": to_plain(result.levels)}
        if getattr(result, "explanation", None) is not None:  # explain=true: voters, per-tap shares
            answer["explanation"] = to_plain(result.explanation)
        return answer

    @app.post("/similar", summary="Covers that look alike",
              responses=_error_responses(400, 404, 413, 415, 422, 500, 503))
    def similar(
        image: ImageFile = None,
        cover_id: IdForm = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = DEFAULT_K,
        by: Annotated[By, Form()] = "both",
        verify: Annotated[bool, Form()] = False,
    ) -> dict:
        """Upload a cover as ``image`` or name one with ``id``; ``k`` neighbours ``by`` style,
        content or both.

        Answers ``{"query": {...}, "k": 12, "by": "both", "neighbours": [{"id", "similarity",
        "genres", "artist", "album", "is_query", "thumbnail"}, ...]}``; ``is_query`` marks the
        query itself when it is a cover of the index (by content hash). ``verify``: copies of
        the query verified by local features come first, with ``verified``, ``inliers`` and
        ``transform`` on every neighbour.
        """
        query, result = service.query(image, cover_id, k=k, by=by, classify=False, **({"verify": True} if verify else {}))
        return {"query": query, "k": k, "by": by, "neighbours": with_thumbnails(to_plain(result.neighbours))}


def _add_collection_routes(app: FastAPI, service: _Service) -> None:
    """Thumbnails, what the index holds, liveness and the collection's map."""

    @app.get(
        "/covers/{cover_id}",
        summary="Thumbnail of a cover in the index",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **_error_responses(404, 422)},
    )
    def cover(cover_id: Annotated[int, Path(ge=0)]) -> Response:
        """A JPEG, longer side at most 256 pixels."""
        path = pathlib.Path(service.locked(service.engine.cover_path, cover_id))
        if not path.is_file():
            raise UnknownCoverError(f"cover {cover_id} has no image file")
        return Response(
            service.thumbnail(str(path)),
            media_type="image/jpeg",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    @app.get("/api/info", summary="What the index holds")
    def info() -> dict:
        """``engine.info()`` plus the service's upload limits."""
        details = to_plain(service.locked(service.engine.info))
        limits = {"max_upload_bytes": service.max_upload_bytes, "max_pixels": pixel_limit(DEFAULT_MAX_PIXELS)}
        return {**details, "limits": limits}

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/map", summary="2-D map of the collection (positions, genres, titles)")
    def map_data(by: Annotated[By, Query()] = "both") -> dict:
        from stylegen.apps.maps import map_for_engine

        if by not in service.maps:
            service.maps[by] = service.locked(map_for_engine, service.engine, by)
        return service.maps[by]


def _add_page_routes(app: FastAPI, static: dict[str, bytes]) -> None:
    """The page, the map page and their static files (no external assets)."""

    def static_response(name: str) -> Response:
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if media_type == "text/html":
            headers["Content-Security-Policy"] = PAGE_CSP
            headers["Referrer-Policy"] = "no-referrer"  # the page may be opened with ?token=
        return Response(static[name], media_type=media_type, headers=headers)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> Response:
        return static_response("index.html")

    @app.get("/map", response_class=HTMLResponse, include_in_schema=False)
    def map_page() -> Response:
        return static_response("map.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in static:
            raise StarletteHTTPException(404, f"no static file {name!r}")
        return static_response(name)


def _openapi(app: FastAPI, secured: bool = False, limited: bool = False) -> dict[str, Any]:
    """FastAPI's schema with the declared multipart bodies of the query routes, the bearer
    token (``secured``) and the 429 of the query routes (``limited``)."""
    if app.openapi_schema is None:
        schema = with_query_bodies(FastAPI.openapi(app), {
            "/classify": _query_body({**TOP_FIELD, **METHOD_FIELD, **EXPLAIN_FIELD}),
            "/similar": _query_body(SIMILAR_FIELDS)})
        app.openapi_schema = with_access(schema, secured, limited)
    return app.openapi_schema


def with_access(schema: dict[str, Any], secured: bool, limited: bool) -> dict[str, Any]:
    """``schema`` with the bearer token on every operation but ``/healthz`` (and its 401), and
    the 429 of the rate-limited routes."""
    if secured:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["token"] = {
            "type": "http", "scheme": "bearer", "description": "the token `stylegen serve` was given"}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if secured and path not in PUBLIC_PATHS:
                operation["security"] = [{"token": []}]
                operation["responses"].update(_error_responses(401))
            if limited and path in LIMITED_PATHS:
                operation["responses"].update(_error_responses(429))
    return schema


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    token: str | None = None,
    allow_hosts: Iterable[str] = (),
    rate_limit: str | None = DEFAULT_RATE_LIMIT,
    **limits: Any,
) -> None:
    """Run the app with uvicorn (loopback only unless ``host`` says otherwise).

    Beyond loopback a ``token`` is required (see :func:`hosts_for_bind` for the Host names
    then accepted). ``limits`` are passed to :func:`create_app` (``max_upload_bytes``,
    ``batch_size``, ``batch_window_ms``, ``max_queue``, ``decode_slots``, ``forward_batch``).
    """
    import uvicorn

    hosts = hosts_for_bind(host, token, allow_hosts)
    app = create_app(engine, token=token, allowed_hosts=hosts, rate_limit=rate_limit, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
