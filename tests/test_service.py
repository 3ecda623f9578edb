"""The HTTP service against a fake engine: every endpoint and every bad input."""

from __future__ import annotations

import io
import random
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from stylegen import service
from stylegen.errors import BadImageError, DataError, IndexMismatchError
from stylegen.service import create_app

GENRES = ("metal", "jazz", "pop", "electronic")
SUBGENRES = {"metal": "thrash metal", "electronic": "techno"}
COLOURS = {"metal": (25, 20, 22), "jazz": (40, 70, 160), "pop": (235, 95, 170), "electronic": (40, 210, 190)}


# --------------------------------------------------------------------------- fake engine


@dataclass(frozen=True)
class FakeCover:
    path: Path
    genre: str
    artist: str
    album: str


def mean_colour(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((1, 1), Image.BOX), dtype=np.float32)[0, 0]


def draw_cover(i: int, genre: str, size: tuple[int, int]) -> Image.Image:
    """A generated 'cover': a flat genre colour with a few shapes in a lighter shade."""
    rng = random.Random(i)
    base = COLOURS[genre]
    img = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(img)
    w, h = size
    accent = tuple(min(255, c + 60 + rng.randrange(40)) for c in base)
    for _ in range(3):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(w // 10, w // 4)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=accent, width=max(2, w // 60))
    draw.rectangle((w // 10, h * 8 // 10, w * 9 // 10, h * 8 // 10 + h // 20), fill=accent)
    return img


def write_covers(folder: Path, n: int = 16) -> list[FakeCover]:
    """``n`` generated JPEG covers, genres in turn; cover 1 is wide (600x400)."""
    folder.mkdir(parents=True, exist_ok=True)
    covers = []
    for i in range(n):
        genre = GENRES[i % len(GENRES)]
        path = folder / f"cover_{i:02d}.jpg"
        draw_cover(i, genre, (600, 400) if i == 1 else (300, 300)).save(path, quality=90)
        covers.append(FakeCover(path, genre, f"Artist {i}", f"Album {i}"))
    return covers


class FakeEngine:
    """Deterministic stand-in for ``stylegen.engine.Engine``: everything from mean colours.

    Records its calls and the most calls it ever saw running at once (to test the lock).
    Returns numpy floats like a real engine would.
    """

    def __init__(self, covers: list[FakeCover], delay: float = 0.0) -> None:
        self.covers = covers
        self.colours = [mean_colour(Image.open(c.path)) for c in covers]
        self.delay = delay
        self.calls: list[tuple] = []
        self.active = 0
        self.max_active = 0
        self._counter = threading.Lock()

    @contextmanager
    def _call(self, *record: object):
        with self._counter:
            self.calls.append(record)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            yield
        finally:
            with self._counter:
                self.active -= 1

    def _check(self, cover_id: int) -> None:
        if not 0 <= cover_id < len(self.covers):
            raise KeyError(cover_id)

    def _genres(self, colour: np.ndarray, top: int) -> dict:
        dist = np.array([np.linalg.norm(colour - COLOURS[g]) for g in GENRES])
        prob = np.exp(-dist / 30.0)
        prob = (prob / prob.sum()).astype(np.float32)
        order = np.argsort(-prob)[:top]
        genres = [
            {
                "genre": GENRES[i],
                "probability": prob[i],
                "path": [GENRES[i], SUBGENRES[GENRES[i]]] if GENRES[i] in SUBGENRES else [GENRES[i]],
            }
            for i in order
        ]
        subs = [{"genre": SUBGENRES[GENRES[i]], "probability": prob[i]} for i in order
                if GENRES[i] in SUBGENRES]
        levels = {"genre": [{"genre": g["genre"], "probability": g["probability"]} for g in genres],
                  "subgenre": subs}
        return {"genres": genres, "levels": levels}

    def _neighbours(self, colour: np.ndarray, k: int, by: str, query: int | None) -> list[dict]:
        weights = {"style": np.array([1.0, 1.0, 1.0]), "content": np.array([1.0, 0.2, 0.2]),
                   "both": np.array([1.0, 0.6, 0.6])}[by]
        dist = np.array([np.linalg.norm((c - colour) * weights) for c in self.colours])
        sim = (1.0 - dist / 442.0).astype(np.float32)
        order = sorted(range(len(sim)), key=lambda i: (i != query, -sim[i], i))[:k]
        return [
            {"id": i, "similarity": sim[i], "genres": [self.covers[i].genre],
             "artist": self.covers[i].artist, "album": self.covers[i].album, "is_query": i == query}
            for i in order
        ]

    def classify(self, image: Image.Image, top: int = 3) -> dict:
        with self._call("classify", image.size, top):
            return self._genres(mean_colour(image), top)

    def classify_id(self, cover_id: int, top: int = 3) -> dict:
        with self._call("classify_id", cover_id, top):
            self._check(cover_id)
            return self._genres(self.colours[cover_id], top)

    def similar(self, image: Image.Image, k: int = 12, by: str = "both") -> list[dict]:
        with self._call("similar", image.size, k, by):
            return self._neighbours(mean_colour(image), k, by, None)

    def similar_id(self, cover_id: int, k: int = 12, by: str = "both") -> list[dict]:
        with self._call("similar_id", cover_id, k, by):
            self._check(cover_id)
            return self._neighbours(self.colours[cover_id], k, by, cover_id)

    def cover_path(self, cover_id: int) -> Path:
        with self._call("cover_path", cover_id):
            self._check(cover_id)
            return self.covers[cover_id].path

    def info(self) -> dict:
        with self._call("info"):
            return {"count": len(self.covers), "backbone": "fake-colour-mean",
                    "parts": ["style", "content"], "genres": list(GENRES)}


# --------------------------------------------------------------------------- helpers


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression-bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def upload(data: bytes, name: str = "cover.jpg", kind: str = "image/jpeg") -> dict:
    return {"image": (name, data, kind)}


def assert_error(response, status: int | tuple[int, ...]) -> str:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"] and "\n" not in body["error"]
    return body["error"]


def assert_alive(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.fixture
def covers(tmp_path: Path) -> list[FakeCover]:
    return write_covers(tmp_path / "covers")


@pytest.fixture
def engine(covers: list[FakeCover]) -> FakeEngine:
    return FakeEngine(covers)


@pytest.fixture
def client(engine: FakeEngine):
    with TestClient(create_app(engine)) as c:
        yield c


@pytest.fixture
def small_client(engine: FakeEngine):
    """Limits small enough to hit with test images: 10 kB, 10,000 pixels."""
    with TestClient(create_app(engine, max_upload_bytes=10_000, max_pixels=10_000)) as c:
        yield c


# --------------------------------------------------------------------------- endpoints


def test_healthz_and_info(client: TestClient, engine: FakeEngine) -> None:
    assert_alive(client)
    info = client.get("/api/info").json()
    assert info["count"] == len(engine.covers) and info["genres"] == list(GENRES)
    assert info["limits"] == {"max_upload_bytes": 20 * 1024 * 1024, "max_pixels": 50_000_000}


def test_page_and_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for marker in ('id="file-input"', 'id="drop-zone"', 'id="genre-bars"', 'id="similar-grid"',
                   'id="status"', "/static/app.js", "/static/style.css"):
        assert marker in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # works offline
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "#genre-bars" in js.text and "cover-card" in js.text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert_error(client.get("/static/missing.js"), 404)
    assert_error(client.get("/static/..%2Fservice.py"), 404)


def test_openapi_docs(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/classify", "/similar", "/covers/{cover_id}", "/api/info", "/healthz"} <= set(paths)


def test_classify_upload(client: TestClient, covers: list[FakeCover], engine: FakeEngine) -> None:
    data = covers[0].path.read_bytes()  # a metal cover
    body = client.post("/classify", files=upload(data, "metal.jpg"), data={"top": "3"}).json()
    assert body["query"] == {"kind": "upload", "filename": "metal.jpg", "bytes": len(data),
                             "width": 300, "height": 300}
    genres = body["genres"]
    assert genres[0]["genre"] == "metal" and len(genres) == 3
    assert genres[0]["path"] == ["metal", "thrash metal"]
    probs = [g["probability"] for g in genres]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert isinstance(probs[0], float)
    assert set(body["levels"]) == {"genre", "subgenre"}
    assert engine.calls == [("classify", (300, 300), 3)]


def test_classify_by_id_in_form_or_query(client: TestClient, engine: FakeEngine) -> None:
    by_form = client.post("/classify", data={"id": "2", "top": "2"})
    by_query = client.post("/classify?id=2&top=2")
    assert by_form.status_code == by_query.status_code == 200
    assert by_form.json() == by_query.json()
    body = by_form.json()
    assert body["query"] == {"kind": "id", "id": 2, "thumbnail": "/covers/2"}
    assert body["genres"][0]["genre"] == "pop" and len(body["genres"]) == 2
    assert engine.calls == [("classify_id", 2, 2), ("classify_id", 2, 2)]


def test_similar_upload_finds_the_same_cover(client: TestClient, covers: list[FakeCover],
                                             engine: FakeEngine) -> None:
    data = covers[3].path.read_bytes()
    body = client.post("/similar", files=upload(data), data={"k": "5", "by": "style"}).json()
    assert body["k"] == 5 and body["by"] == "style" and body["query"]["kind"] == "upload"
    neighbours = body["neighbours"]
    assert len(neighbours) == 5 and neighbours[0]["id"] == 3
    assert all(n["thumbnail"] == f"/covers/{n['id']}" for n in neighbours)
    assert [n["genres"] for n in neighbours[:2]] == [["electronic"], ["electronic"]]
    sims = [n["similarity"] for n in neighbours]
    assert sims == sorted(sims, reverse=True) and sims[0] > 0.95
    assert engine.calls == [("similar", (300, 300), 5, "style")]


def test_similar_by_id(client: TestClient, engine: FakeEngine) -> None:
    body = client.post("/similar?k=4&by=content", data={"id": "5"}).json()
    assert body["query"]["id"] == 5 and len(body["neighbours"]) == 4
    first = body["neighbours"][0]
    assert first["id"] == 5 and first["is_query"] is True and first["artist"] == "Artist 5"
    assert engine.calls == [("similar_id", 5, 4, "content")]


@pytest.mark.parametrize("by", ["style", "content", "both"])
def test_similar_passes_by(client: TestClient, engine: FakeEngine, by: str) -> None:
    assert client.post("/similar", data={"id": "1", "by": by}).json()["by"] == by
    assert engine.calls == [("similar_id", 1, 12, by)]


def test_cover_thumbnail(client: TestClient) -> None:
    square = client.get("/covers/0")
    assert square.status_code == 200 and square.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(square.content)).size == (256, 256)
    wide = Image.open(io.BytesIO(client.get("/covers/1").content))
    assert wide.format == "JPEG" and wide.size == (256, 171)


# --------------------------------------------------------------------------- bad input


def test_unknown_cover_id(client: TestClient) -> None:
    assert "999" in assert_error(client.get("/covers/999"), 404)
    assert "999" in assert_error(client.post("/classify", data={"id": "999"}), 404)
    assert "999" in assert_error(client.post("/similar?id=999"), 404)
    assert_alive(client)


@pytest.mark.parametrize("path", [
    "/covers/..%2F..%2Fetc%2Fpasswd",
    "/covers/../x",
    "/covers/%2e%2e/%2e%2e/etc/passwd",
    "/covers/..%5C..%5Cwindows",
    "/covers/0%2F..%2F..%2Fetc%2Fpasswd",
    "/covers/-1",
    "/covers/1.5",
    "/covers/abc",
    "/covers/%00",
])
def test_cover_path_traversal(client: TestClient, engine: FakeEngine, path: str) -> None:
    assert_error(client.get(path), (404, 422))
    assert not [c for c in engine.calls if c[0] == "cover_path"]  # no file was looked up
    assert_alive(client)


def test_bad_by_value(client: TestClient, engine: FakeEngine) -> None:
    message = assert_error(client.post("/similar", data={"id": "1", "by": "vibes"}), 422)
    assert "by" in message and "style" in message
    assert_error(client.post("/similar?id=1&by=STYLE"), 422)
    assert engine.calls == []
    assert_alive(client)


@pytest.mark.parametrize("params", [{"top": "0"}, {"top": "x"}, {"id": "-3"}, {"id": "one"}])
def test_bad_numbers(client: TestClient, params: dict) -> None:
    assert_error(client.post("/classify", data={"id": "1", **params}), 422)
    assert_alive(client)


def test_neither_or_both_queries(client: TestClient, covers: list[FakeCover], engine: FakeEngine) -> None:
    assert "image" in assert_error(client.post("/classify"), 422)
    assert "image" in assert_error(client.post("/similar", data={"k": "3"}), 422)
    both = client.post("/similar", files=upload(covers[0].path.read_bytes()), data={"id": "1"})
    assert "not both" in assert_error(both, 400)
    assert engine.calls == []
    assert_alive(client)


def test_non_image_upload(client: TestClient, engine: FakeEngine) -> None:
    for endpoint in ("/classify", "/similar"):
        response = client.post(endpoint, files=upload(b"hello, I am not a cover\n" * 20, "x.txt",
                                                      "text/plain"))
        assert "not an image" in assert_error(response, 415)
        assert_alive(client)
    assert_error(client.post("/classify", files=upload(b"")), 400)
    assert engine.calls == []


def test_corrupt_jpeg(client: TestClient, covers: list[FakeCover], engine: FakeEngine) -> None:
    data = covers[0].path.read_bytes()
    truncated = data[: len(data) // 2]
    assert "truncated" in assert_error(client.post("/classify", files=upload(truncated)), 400)
    assert_alive(client)
    garbage = data[:200] + bytes(random.Random(0).randrange(256) for _ in range(2000))
    assert_error(client.post("/similar", files=upload(garbage)), (400, 415))
    assert engine.calls == []
    assert_alive(client)


def test_oversize_upload(small_client: TestClient, engine: FakeEngine) -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    medium = jpeg_bytes(noise, quality=95)  # > 10 kB: cut off while reading the file part
    assert 10_000 < len(medium) < 10_000 + service.MULTIPART_OVERHEAD_BYTES
    assert "10,000" in assert_error(small_client.post("/classify", files=upload(medium)), 413)
    assert_alive(small_client)
    huge = medium * 8  # beyond the request body limit: refused while the body arrives
    assert len(huge) > 10_000 + service.MULTIPART_OVERHEAD_BYTES
    assert "10,000" in assert_error(small_client.post("/similar", files=upload(huge)), 413)
    assert_alive(small_client)

    def chunked():  # no Content-Length: counted while it streams in
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        yield from (medium for _ in range(8))
        yield b"\r\n--b--\r\n"

    streamed = small_client.post("/classify", content=chunked(),
                                 headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in streamed.request.headers
    assert_error(streamed, 413)
    assert engine.calls == []
    assert_alive(small_client)


def test_body_limit_stops_reading_the_body() -> None:
    import asyncio

    from starlette.exceptions import HTTPException

    pulled = []

    async def receive() -> dict:
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def app(scope, receive, send) -> None:  # reads the body for ever
        while True:
            await receive()

    async def send(message) -> None:
        raise AssertionError("nothing is sent by the middleware itself")

    middleware = service.BodyLimitMiddleware(app, max_bytes=5000)
    for headers in ([], [(b"content-length", b"999999")]):
        pulled.clear()
        scope = {"type": "http", "headers": headers}
        with pytest.raises(HTTPException) as info:
            asyncio.run(middleware(scope, receive, send))
        assert info.value.status_code == 413
        assert len(pulled) == (6 if not headers else 0)


def test_read_limited_reads_at_most_limit_plus_one() -> None:
    class Spy(io.BytesIO):
        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            self.asked: list[int] = []

        def read(self, n: int | None = -1) -> bytes:
            self.asked.append(n)
            return super().read(n)

    spy = Spy(b"x" * 1000)
    with pytest.raises(service.ImageTooLargeError):
        service.read_limited(spy, 100)
    assert spy.asked == [101]
    assert service.read_limited(io.BytesIO(b"x" * 100), 100) == b"x" * 100


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb(client: TestClient, small_client: TestClient, engine: FakeEngine) -> None:
    bomb = png_claiming(30_000, 30_000)
    assert len(bomb) < 200
    assert_error(client.post("/classify", files=upload(bomb, "bomb.png", "image/png")), 413)
    assert_alive(client)
    # within PIL's error threshold but over its warning threshold: refused, not just warned about
    warned = png_claiming(12_000, 12_000)
    with TestClient(create_app(engine, max_pixels=10**9)) as lax:
        assert "pixels" in assert_error(lax.post("/similar", files=upload(warned, "w.png")), 413)
        assert_alive(lax)
    # an honest image over a small max_pixels (200x200 > 10,000 pixels)
    honest = jpeg_bytes(Image.new("RGB", (200, 200), (9, 9, 9)))
    message = assert_error(small_client.post("/classify", files=upload(honest)), 413)
    assert "200x200" in message
    assert engine.calls == []
    assert_alive(small_client)


def test_unknown_route_and_method(client: TestClient) -> None:
    assert "/nope" in assert_error(client.get("/nope"), 404)
    assert_error(client.get("/classify"), 405)
    assert_alive(client)


# --------------------------------------------------------------------------- concurrency


def test_engine_calls_are_serialised(covers: list[FakeCover]) -> None:
    engine = FakeEngine(covers, delay=0.05)
    data = covers[0].path.read_bytes()
    with TestClient(create_app(engine)) as client:
        def one(i: int) -> int:
            if i % 2:
                return client.post("/similar", data={"id": str(i)}).status_code
            return client.post("/classify", files=upload(data)).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(16)))
    assert statuses == [200] * 16
    assert len(engine.calls) == 16
    assert engine.max_active == 1


# --------------------------------------------------------------------------- pure helpers


def test_to_plain_converts_numpy_and_paths() -> None:
    value = {"a": np.float32(0.5), "b": (np.int64(3), Path("/x")), 4: np.arange(2), "c": None}
    assert service.to_plain(value) == {"a": 0.5, "b": [3, "/x"], "4": [0, 1], "c": None}


def test_http_status_for() -> None:
    assert service.http_status_for(BadImageError("x")) == 400
    assert service.http_status_for(DataError("x")) == 400
    assert service.http_status_for(IndexMismatchError("x")) == 500
    assert service.http_status_for(service.UnsupportedImageError("x")) == 415
    assert service.http_status_for(service.RequestError("x", 422)) == 422


def test_open_image_bytes_gives_rgb() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 30), (10, 20, 30, 128)).save(buffer, format="PNG")
    image = service.open_image_bytes(buffer.getvalue())
    assert image.mode == "RGB" and image.size == (40, 30)


def test_serve_binds_loopback_by_default(monkeypatch: pytest.MonkeyPatch, engine: FakeEngine) -> None:
    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(kw, app=app))
    service.serve(engine, max_upload_bytes=123)
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert TestClient(seen["app"]).get("/api/info").json()["limits"]["max_upload_bytes"] == 123
