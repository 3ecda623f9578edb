"""HTTP service: genre of a cover, similar covers, thumbnails and the web page.

``create_app(engine)`` builds a FastAPI app around an :class:`~stylegen.query.engine.Engine`: every
query endpoint is a thin adapter over ``Engine.query`` (the path the CLI and ``evaluate`` take),
so an upload gets exactly the answer ``stylegen classify`` gives for the same file, a cover of
the index included (found by content hash, its own vote left out). Nothing lives at module
level: every app owns its engine, its limits, its static files and its lock.

Thread safety and memory: FastAPI runs the (synchronous) endpoints in its thread pool. An
upload's bytes are read (at most ``max_upload_bytes``) outside the lock; decoding, embedding
and search all happen inside ``Engine.query`` under one ``threading.Lock`` owned by the app,
so at most one image is decoded at a time (a decoded image at the pixel limit is ~120 MB).

Bad input is answered with a 4xx and ``{"error": "one-line message"}``; the server keeps serving.
"""

from __future__ import annotations

import functools
import io
import json
import mimetypes
import pathlib
import threading
from collections.abc import Callable
from importlib import resources
from typing import IO, Annotated, Any, Protocol, TypeVar

from fastapi import FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stylegen.errors import (
    BadImageError,
    ImageTooLargeError,
    IndexMismatchError,
    IndexNotFoundError,
    ModelNotFoundError,
    StylegenError,
    UnknownCoverError,
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


# --------------------------------------------------------------------------- app


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
            413: "upload or image too large", 415: "not an image", 422: "invalid or missing field",
            500: "server misconfigured (index or heads missing)"}
    return {c: {"description": text[c], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for c in codes}


IMAGE_MEDIA_TYPES = "image/jpeg, image/png, image/webp, image/gif"


def _query_body(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI request body: multipart form with exactly one of ``image`` or ``id``.

    ``oneOf`` with one ``required`` each says "exactly one": a body with both matches both
    branches and one with neither matches none. The image part's media types are declared
    in ``encoding``, so generated requests (schemathesis) send images, not arbitrary bytes.
    """
    properties = {
        "image": {"type": "string", "format": "binary", "description": "a cover image (JPEG, PNG, WebP...)"},
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
                  "by": {"type": "string", "enum": list(BY), "default": "both"}}

IdForm = Annotated[int | None, Form(alias="id", ge=0, description="cover id in the index")]
# an image part without a filename arrives as text (RFC 7578 makes the filename optional)
ImageFile = Annotated[UploadFile | str | None, File(description="a cover image (JPEG, PNG, WebP...)")]


class _Service:
    """What the routes share: the engine, the lock that serialises its calls, the upload
    limit, a thumbnail cache and the maps laid out so far."""

    def __init__(self, engine: Engine, max_upload_bytes: int) -> None:
        self.engine = engine
        self.max_upload_bytes = max_upload_bytes
        self.lock = threading.Lock()
        self.maps: dict[str, dict] = {}  # by -> the map's data, laid out once per app
        self.thumbnail = functools.lru_cache(maxsize=512)(self._thumbnail)

    def locked(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return fn(*args, **kwargs)

    @staticmethod
    def _thumbnail(path: str) -> bytes:
        return thumbnail_jpeg(pathlib.Path(path), THUMBNAIL_SIDE)

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
        return data, filename

    def query(self, image: UploadFile | str | None, cover_id: int | None, **options: Any) -> tuple[dict, Any]:
        """(query description, QueryResult) for an upload or a cover id, via ``Engine.query``."""
        if image is not None and cover_id is not None:
            raise RequestError("give either an image or an id, not both", 400)
        if cover_id is not None:
            result = self.locked(self.engine.query, cover_id, **options)
            return {"kind": "id", "id": cover_id, "thumbnail": thumbnail_url(cover_id)}, result
        if image is None:
            raise RequestError("give an image upload (field 'image') or a cover id ('id')", 422)
        data, filename = self.upload_bytes(image)
        result = self.locked(self.engine.query, data, label=filename or "upload", **options)
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
) -> FastAPI:
    """The stylegen HTTP app around ``engine``.

    Uploads are limited to ``max_upload_bytes`` (the request body is cut off while it is
    received, and at most ``max_upload_bytes + 1`` bytes of the file are read) and to the
    pixel limit of :mod:`stylegen.sources.images` (checked from the header before decoding, the
    same limit as for the collection). Engine calls are serialised by a lock owned by this
    app (see the module docstring).
    """
    static = load_static()
    if "index.html" not in static:
        raise FileNotFoundError("stylegen/static/index.html is missing from the package")
    app = FastAPI(
        title="stylegen",
        summary="Judge an album by its cover: genre and similar covers from cover art.",
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    service = _Service(engine, max_upload_bytes)
    _add_error_handlers(app, service)
    _add_query_routes(app, service)
    _add_collection_routes(app, service)
    _add_page_routes(app, static)
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    return app


def _add_error_handlers(app: FastAPI, service: _Service) -> None:
    """Every error is ``{"error": "one line"}`` with its status."""

    @app.exception_handler(StylegenError)
    async def _stylegen_error(request: Request, exc: StylegenError) -> JSONResponse:
        return error_response(http_status_for(exc), exc)

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
              responses=_error_responses(400, 404, 413, 415, 422, 500))
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
              responses=_error_responses(400, 404, 413, 415, 422, 500))
    def similar(
        image: ImageFile = None,
        cover_id: IdForm = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = DEFAULT_K,
        by: Annotated[By, Form()] = "both",
    ) -> dict:
        """Upload a cover as ``image`` or name one with ``id``; ``k`` neighbours ``by`` style,
        content or both.

        Answers ``{"query": {...}, "k": 12, "by": "both", "neighbours": [{"id", "similarity",
        "genres", "artist", "album", "is_query", "thumbnail"}, ...]}``; ``is_query`` marks the
        query itself when it is a cover of the index (by content hash).
        """
        query, result = service.query(image, cover_id, k=k, by=by, classify=False)
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


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the declared multipart bodies of the query routes."""
    if app.openapi_schema is None:
        app.openapi_schema = with_query_bodies(FastAPI.openapi(app), {
            "/classify": _query_body({**TOP_FIELD, **METHOD_FIELD, **EXPLAIN_FIELD}),
            "/similar": _query_body(SIMILAR_FIELDS)})
    return app.openapi_schema


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    **limits: int,
) -> None:
    """Run the app with uvicorn (loopback only unless ``host`` says otherwise).

    ``limits`` are passed to :func:`create_app` (``max_upload_bytes``).
    """
    import uvicorn

    uvicorn.run(create_app(engine, **limits), host=host, port=port, log_level=log_level)
