"""HTTP service: genre of a cover, similar covers, thumbnails and the web page.

``create_app(engine)`` builds a FastAPI app around an :class:`Engine` (the real one opens a
FAISS index and genre heads; tests pass a fake). Nothing lives at module level: every app owns
its engine, its limits, its static files and its lock.

Thread safety: FastAPI runs the (synchronous) endpoints in its thread pool, so requests are
handled concurrently. Uploads are read and decoded in parallel, but every call into the engine
goes through one ``threading.Lock`` owned by the app, because model inference (torch, faiss) is
not guaranteed to be re-entrant. One engine call runs at a time per app.

Bad input is answered with a 4xx and ``{"error": "one-line message"}``; the server keeps serving.
"""

from __future__ import annotations

import functools
import io
import mimetypes
import pathlib
import threading
from collections.abc import Callable
from importlib import resources
from typing import IO, Annotated, Any, Literal, Protocol, TypeVar

import PIL.Image
from fastapi import FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stylegen.errors import (
    BadImageError,
    IndexMismatchError,
    IndexNotFoundError,
    ModelNotFoundError,
    StylegenError,
)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
THUMBNAIL_SIDE = 256
# Room for multipart boundaries, part headers and the small form fields around the image.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

By = Literal["style", "content", "both"]
T = TypeVar("T")


class Engine(Protocol):
    """What the service needs from an index + heads (see ``stylegen.engine``)."""

    def classify(self, image: PIL.Image.Image, top: int = 3) -> dict:
        """``{"genres": [{"genre", "probability", "path"}, ...], "levels": {level: [...]}}``."""
        ...

    def classify_id(self, cover_id: int, top: int = 3) -> dict:
        """Like :meth:`classify` for a cover in the index; ``KeyError`` for an unknown id."""
        ...

    def similar(self, image: PIL.Image.Image, k: int = 12, by: str = "both") -> list[dict]:
        """``[{"id", "similarity", "genres", "artist", "album", "is_query"}, ...]``."""
        ...

    def similar_id(self, cover_id: int, k: int = 12, by: str = "both") -> list[dict]:
        """Like :meth:`similar` for a cover in the index; ``KeyError`` for an unknown id."""
        ...

    def cover_path(self, cover_id: int) -> pathlib.Path:
        """The image file of a cover; ``KeyError`` for an unknown id."""
        ...

    def info(self) -> dict:
        """``{"count", "backbone", "parts", "genres", ...}``."""
        ...


# --------------------------------------------------------------------------- errors


class UnsupportedImageError(BadImageError):
    """The upload is not an image format that can be read."""

    http_status = 415


class ImageTooLargeError(BadImageError):
    """The upload has too many bytes or too many pixels."""

    http_status = 413


class UnknownCoverError(StylegenError):
    """No cover with this id in the index."""

    http_status = 404


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


def pixel_limit(max_pixels: int) -> int:
    """The effective pixel limit: ours, or PIL's bomb-warning threshold if that is lower."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pil_limit) if pil_limit else max_pixels


def open_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an uploaded image to RGB, refusing non-images, corrupt files and pixel bombs.

    The size in the header is checked *before* decoding. Images that PIL would only warn
    about (``DecompressionBombWarning``) are above :func:`pixel_limit` and so refused here as
    well, without touching the process-wide warning filters (not thread-safe).
    """
    if not data:
        raise BadImageError("the upload is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image has too many pixels ({one_line(exc)})") from None
    except Image.UnidentifiedImageError:
        raise UnsupportedImageError("not an image (or an unsupported image format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"image cannot be read: {one_line(exc)}") from None
    return _decode(image, max_pixels)


def _decode(image: Image.Image, max_pixels: int, max_side: int | None = None) -> Image.Image:
    width, height = image.size
    limit = pixel_limit(max_pixels)
    if width * height > limit:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {limit:,}"
        )
    try:
        if max_side is not None:
            image.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
        image.load()
        rgb = image.convert("RGB")
        if max_side is not None:
            rgb.thumbnail((max_side, max_side))
        return rgb
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image has too many pixels ({one_line(exc)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"image is corrupt or truncated: {one_line(exc)}") from None


def thumbnail_jpeg(
    path: pathlib.Path, max_side: int = THUMBNAIL_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> bytes:
    """A JPEG of the image at ``path`` with its longer side at most ``max_side``."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{path.name}: {one_line(exc)}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"{path.name}: {one_line(exc)}") from None
    with image:
        small = _decode(image, max_pixels, max_side=max_side)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85, optimize=True)
    return buffer.getvalue()


def read_limited(file: IO[bytes], max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` from ``file``; ``ImageTooLargeError`` if there is more."""
    data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"upload is larger than the limit of {max_bytes:,} bytes")
    return data


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


def first_given(*values: T | None, default: T) -> T:
    """The first value that is not None (form before query), else ``default``."""
    return next((v for v in values if v is not None), default)


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


IdForm = Annotated[int | None, Form(alias="id", ge=0, description="cover id in the index")]
IdQuery = Annotated[int | None, Query(alias="id", ge=0, description="cover id in the index")]
ByForm = Annotated[By | None, Form(alias="by", description="style, content or both")]
ByQuery = Annotated[By | None, Query(alias="by", description="style, content or both")]
ImageFile = Annotated[UploadFile | None, File(description="a cover image (JPEG, PNG, WebP...)")]


def create_app(
    engine: Engine,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FastAPI:
    """The stylegen HTTP app around ``engine``.

    Uploads are limited to ``max_upload_bytes`` (the request body is cut off while it is
    received, and at most ``max_upload_bytes + 1`` bytes of the file are read) and to
    ``max_pixels`` pixels (checked from the header before decoding). Engine calls are
    serialised by a lock owned by this app (see the module docstring).
    """
    app = FastAPI(
        title="stylegen",
        summary="Judge an album by its cover: genre and similar covers from cover art.",
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    lock = threading.Lock()
    static = load_static()
    if "index.html" not in static:
        raise FileNotFoundError("stylegen/static/index.html is missing from the package")

    def locked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with lock:
            return fn(*args, **kwargs)

    def by_id(fn: Callable[..., T], cover_id: int, *args: Any) -> T:
        try:
            return locked(fn, cover_id, *args)
        except KeyError:
            raise UnknownCoverError(f"unknown cover id {cover_id}") from None

    def read_query(image: UploadFile | None, cover_id: int | None) -> tuple[dict, Any]:
        """``(query description, PIL image or cover id)`` from the request."""
        if image is not None and cover_id is not None:
            raise RequestError("give either an image or an id, not both", 400)
        if cover_id is not None:
            return {"kind": "id", "id": cover_id, "thumbnail": thumbnail_url(cover_id)}, cover_id
        if image is None:
            raise RequestError("give an image upload (field 'image') or a cover id ('id')", 422)
        data = read_limited(image.file, max_upload_bytes)
        decoded = open_image_bytes(data, max_pixels)
        query = {
            "kind": "upload",
            "filename": image.filename or "",
            "bytes": len(data),
            "width": decoded.width,
            "height": decoded.height,
        }
        return query, decoded

    @functools.lru_cache(maxsize=512)
    def thumbnail(path: str) -> bytes:
        return thumbnail_jpeg(pathlib.Path(path), THUMBNAIL_SIDE, max_pixels)

    @app.exception_handler(StylegenError)
    async def _stylegen_error(request: Request, exc: StylegenError) -> JSONResponse:
        return error_response(http_status_for(exc), exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            message = f"upload is larger than the limit of {max_upload_bytes:,} bytes"
        elif exc.status_code == 404 and exc.detail == "Not Found":
            message = f"not found: {request.url.path}"
        else:
            message = exc.detail
        return error_response(exc.status_code, message)

    @app.post("/classify", summary="Genre of a cover")
    def classify(
        image: ImageFile = None,
        id_form: IdForm = None,
        id_query: IdQuery = None,
        top_form: Annotated[int | None, Form(alias="top", ge=1, le=100)] = None,
        top_query: Annotated[int | None, Query(alias="top", ge=1, le=100)] = None,
    ) -> dict:
        """Upload a cover as ``image`` or name one in the index with ``id``; ``top`` genres.

        Answers ``{"query": {...}, "genres": [{"genre", "probability", "path"}, ...],
        "levels": {level: [{"genre", "probability"}, ...]}}``.
        """
        top = first_given(top_form, top_query, default=3)
        query, target = read_query(image, first_given(id_form, id_query, default=None))
        if query["kind"] == "id":
            result = by_id(engine.classify_id, target, top)
        else:
            result = locked(engine.classify, target, top)
        return {
            "query": query,
            "genres": to_plain(result.get("genres", [])),
            "levels": to_plain(result.get("levels") or {}),
        }

    @app.post("/similar", summary="Covers that look alike")
    def similar(
        image: ImageFile = None,
        id_form: IdForm = None,
        id_query: IdQuery = None,
        k_form: Annotated[int | None, Form(alias="k", ge=1, le=200)] = None,
        k_query: Annotated[int | None, Query(alias="k", ge=1, le=200)] = None,
        by_form: ByForm = None,
        by_query: ByQuery = None,
    ) -> dict:
        """Upload a cover as ``image`` or name one with ``id``; ``k`` neighbours ``by`` style,
        content or both.

        Answers ``{"query": {...}, "k": 12, "by": "both", "neighbours": [{"id", "similarity",
        "genres", "artist", "album", "is_query", "thumbnail"}, ...]}``.
        """
        k = first_given(k_form, k_query, default=12)
        by = first_given(by_form, by_query, default="both")
        query, target = read_query(image, first_given(id_form, id_query, default=None))
        if query["kind"] == "id":
            found = by_id(engine.similar_id, target, k, by)
        else:
            found = locked(engine.similar, target, k, by)
        return {"query": query, "k": k, "by": by, "neighbours": with_thumbnails(to_plain(found))}

    @app.get(
        "/covers/{cover_id}",
        summary="Thumbnail of a cover in the index",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "unknown id"}},
    )
    def cover(cover_id: Annotated[int, Path(ge=0)]) -> Response:
        """A JPEG, longer side at most 256 pixels."""
        path = pathlib.Path(by_id(engine.cover_path, cover_id))
        if not path.is_file():
            raise UnknownCoverError(f"cover {cover_id} has no image file")
        return Response(
            thumbnail(str(path)),
            media_type="image/jpeg",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    @app.get("/api/info", summary="What the index holds")
    def info() -> dict:
        """``engine.info()`` plus the service's upload limits."""
        details = to_plain(locked(engine.info))
        limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels}
        return {**details, "limits": limits}

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> Response:
        return static_response("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in static:
            raise StarletteHTTPException(404, f"no static file {name!r}")
        return static_response(name)

    def static_response(name: str) -> Response:
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if media_type == "text/html":
            headers["Content-Security-Policy"] = PAGE_CSP
        return Response(static[name], media_type=media_type, headers=headers)

    return app


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    **limits: int,
) -> None:
    """Run the app with uvicorn (loopback only unless ``host`` says otherwise).

    ``limits`` are passed to :func:`create_app` (``max_upload_bytes``, ``max_pixels``).
    """
    import uvicorn

    uvicorn.run(create_app(engine, **limits), host=host, port=port, log_level=log_level)
