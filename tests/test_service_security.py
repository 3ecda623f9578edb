"""Who may use the service and what reaches a decoder: allowed Host names (DNS rebinding), the
token (required beyond loopback), the per-client rate limit, upload formats by their bytes,
one decode limiter for uploads and thumbnails, error bodies without server paths, no CDN docs.

A tiny real index behind ``create_app`` as in ``test_service.py``; fake engines only where a
test needs an engine that fails or counts its calls."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stylegen.apps import service
from stylegen.apps.service import create_app
from stylegen.errors import BadImageError, IndexNotFoundError, StylegenError
from stylegen.query.engine import Engine
from stylegen.sources import images
from tests.conftest import embed_tiny
from tests.test_service import (
    GENRES,
    LOCAL,
    assert_error,
    draw_cover,
    new_cover,
    upload,
    write_covers,
)

FORMATS = "JPEG, PNG, WebP, GIF or BMP"
TOKEN = "s3cret-Token_42"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ABSOLUTE = re.compile(r"(^|[\s'\"(=])(~|[A-Za-z]:)?[/\\][^\s/\\]+[/\\]")  # a path with a folder in it


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """12 generated covers (4 genres, 3 each: the fewest heads train on) embedded, with linear, kNN and ensemble heads."""
    from threadpoolctl import threadpool_limits

    from stylegen.heads.train import train

    root = tmp_path_factory.mktemp("security")
    write_covers(root / "covers", n=12).to_csv(root / "covers.csv", index=False)
    embed_tiny(root / "covers.csv", root / "idx")
    with threadpool_limits(1):
        train(root / "idx", heads=("linear", "knn", "ensemble"), validate=False)
    return root / "idx"


@pytest.fixture(scope="module")
def engine(index_dir: Path) -> Engine:
    engine = Engine.open(index_dir, device="cpu")
    engine.featurizer  # noqa: B018  (load the model once for the module)
    return engine


def local(app, **kwargs) -> TestClient:
    return TestClient(app, base_url=LOCAL, **kwargs)


def image_bytes(fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    draw_cover(3, "pop", (64, 48)).save(buffer, format=fmt, **params)
    return buffer.getvalue()


class CountingEngine:
    """Answers every query at once (nothing decoded); counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def query(self, item, **options):
        self.calls += 1
        return SimpleNamespace(method="head", genres=[], levels={}, neighbours=[], row=None, size=(1, 1))

    def cover_path(self, cover_id: int) -> Path:
        raise FileNotFoundError(cover_id)

    def info(self) -> dict:
        return {"count": 0}


# --------------------------------------------------------------------------- Host names


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example:80", "testserver", "", "[::2]:8000"])
def test_foreign_host_is_refused(engine: Engine, host: str) -> None:
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends its own
    Host; it gets a 400 from every route, the page and the health check included."""
    with local(create_app(engine)) as client:
        for method, path in (("GET", "/api/info"), ("GET", "/"), ("GET", "/covers/0"), ("GET", "/healthz"),
                             ("POST", "/classify")):
            response = client.request(method, path, headers={"Host": host}, data={"id": "0"} if method == "POST" else None)
            assert "host not allowed" in assert_error(response, 400)


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:65535",
                                  "[::1]", "[::1]:8765"])
def test_loopback_names_with_any_port_are_accepted(engine: Engine, host: str) -> None:
    with local(create_app(engine)) as client:
        response = client.get("/api/info", headers={"Host": host})
        assert response.status_code == 200 and response.json()["count"] == 12


def test_allow_host_adds_names(engine: Engine) -> None:
    with local(create_app(engine, allowed_hosts=["covers.lan", "[fd00::5]", "192.168.1.20"])) as client:
        for host in ("covers.lan", "covers.lan:8000", "COVERS.LAN", "[fd00::5]:80", "192.168.1.20:8000", "localhost"):
            assert client.get("/api/info", headers={"Host": host}).status_code == 200, host
        assert_error(client.get("/api/info", headers={"Host": "evil.example"}), 400)
    with pytest.raises(StylegenError, match="not a host name"):
        create_app(engine, allowed_hosts=["bad host/x"])


# --------------------------------------------------------------------------- the token


@pytest.fixture(scope="module")
def secured(engine: Engine):
    """The app as `stylegen serve --host 0.0.0.0 --token TOKEN` makes it (any Host)."""
    with TestClient(create_app(engine, token=TOKEN, allowed_hosts=["*"], rate_limit=None)) as client:
        yield client


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/map"), ("GET", "/static/app.js"), ("GET", "/api/info"), ("GET", "/covers/0"),
    ("GET", "/api/map"), ("GET", "/openapi.json"), ("GET", "/nope"), ("POST", "/classify"), ("POST", "/similar"),
])
def test_every_route_but_healthz_needs_the_token(secured: TestClient, method: str, path: str) -> None:
    data = {"id": "0"} if method == "POST" else None
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Cookie": "stylegen_token=wrong"}):
        response = secured.request(method, path, headers=headers, data=data)
        assert "token" in assert_error(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    ok = secured.request(method, path, headers=BEARER, data=data)
    assert ok.status_code == (404 if path == "/nope" else 200), ok.text
    assert secured.request(method, path, headers={"Authorization": f"bearer {TOKEN}"}, data=data).status_code == ok.status_code


def test_healthz_needs_no_token(secured: TestClient) -> None:
    response = secured.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_page_takes_the_token_once_then_keeps_it_in_a_strict_cookie(engine: Engine) -> None:
    """Like Jupyter: /?token= once; an HttpOnly SameSite=Strict cookie carries it from then on
    (the page's fetches and its thumbnails); a wrong one sets nothing."""
    with local(create_app(engine, token=TOKEN)) as client:
        assert_error(client.get("/?token=wrong"), 401)
        assert "set-cookie" not in client.get("/healthz?token=wrong").headers  # never hands out the token
        assert not client.cookies
        page = client.get(f"/?token={TOKEN}")
        assert page.status_code == 200 and 'id="file-input"' in page.text
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"stylegen_token={TOKEN};")
        assert {"httponly", "samesite=strict", "path=/"} <= {p.strip().lower() for p in cookie.split(";")}
        assert page.headers["referrer-policy"] == "no-referrer"
        assert client.get("/api/info").status_code == 200  # the cookie, no header
        assert client.get("/covers/3").headers["content-type"] == "image/jpeg"
        assert client.post("/similar", data={"id": "2", "k": "3"}).json()["neighbours"][0]["id"] == 2
        client.cookies.clear()
        assert_error(client.get("/api/info"), 401)


def test_token_in_the_url_is_dropped_before_routes_and_the_access_log() -> None:
    """uvicorn logs the scope's query string after the app ran: the token is gone from it."""
    seen: list[dict] = []

    async def app(scope, receive, send) -> None:
        seen.append(dict(scope))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[dict] = []

    async def send(message) -> None:
        sent.append(message)

    middleware = service.GuardMiddleware(app, hosts=frozenset({"localhost"}), token=TOKEN, limiter=None)
    scope = {"type": "http", "method": "GET", "path": "/api/map", "scheme": "http", "client": ("1.2.3.4", 1),
             "query_string": f"by=style&token={TOKEN}".encode(), "headers": [(b"host", b"localhost:8000")]}
    asyncio.run(middleware(scope, None, send))
    assert scope["query_string"] == seen[0]["query_string"] == b"by=style"
    assert (b"set-cookie", f"stylegen_token={TOKEN}; HttpOnly; SameSite=Strict; Path=/".encode()) in sent[0]["headers"]


def test_token_is_compared_in_constant_time(secured: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    calls = []
    compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or compare(a, b))
    assert secured.get("/api/info", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert secured.get("/api/info", headers=BEARER).status_code == 200
    assert (b"nope", TOKEN.encode()) in calls and (TOKEN.encode(), TOKEN.encode()) in calls


@pytest.mark.parametrize("token", ["", "two words", "semi;colon", "ünicode"])
def test_a_token_that_cannot_travel_in_a_header_is_refused(engine: Engine, token: str) -> None:
    with pytest.raises(StylegenError, match="token must be non-empty"):
        create_app(engine, token=token)


# --------------------------------------------------------------------------- binding beyond loopback


def test_hosts_for_bind() -> None:
    for bind in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert service.hosts_for_bind(bind, None) == ()
        assert service.hosts_for_bind(bind, None, ["box.lan"]) == ("box.lan",)
    for bind in ("0.0.0.0", "::", "192.168.1.20", "box.lan"):
        with pytest.raises(StylegenError, match="without a token"):
            service.hosts_for_bind(bind, None)
    assert service.hosts_for_bind("0.0.0.0", TOKEN) == ("*",)  # the token guards it: any name
    assert service.hosts_for_bind("::", TOKEN, ["box.lan"]) == ("box.lan",)  # asked for names: only those
    assert service.hosts_for_bind("192.168.1.20", TOKEN) == ("192.168.1.20",)


def serve_cli(monkeypatch: pytest.MonkeyPatch, capsys, engine: Engine, *args: str, env: str | None = None):
    """``stylegen serve ARGS`` through the real entry point: (exit code, stderr, uvicorn's kwargs)."""
    from stylegen.apps import cli

    opened: list = []
    seen: dict = {}
    monkeypatch.setattr(Engine, "open", lambda index=None, device="auto", **kw: opened.append(index) or engine)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(kw, app=app))
    if env is None:
        monkeypatch.delenv("STYLEGEN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("STYLEGEN_TOKEN", env)
    monkeypatch.setattr(sys, "argv", ["stylegen", "serve", "--index", "idx", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    seen["opened"] = opened
    return code, capsys.readouterr().err, seen


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_serve_beyond_loopback_without_a_token_refuses_in_one_line(monkeypatch, capsys, engine: Engine,
                                                                   host: str) -> None:
    code, err, seen = serve_cli(monkeypatch, capsys, engine, "--host", host)
    assert code != 0 and "app" not in seen and seen["opened"] == []  # refused before the model loads
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert host in err and "--token" in err and "STYLEGEN_TOKEN" in err


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0", "--token", "a b"], "token must be non-empty and use only letters, digits"),
    (["--rate-limit", "fast"], "rate limit"),
    (["--allow-host", "not a/host"], "not a host name"),
])
def test_serve_bad_access_options_are_one_line_errors(monkeypatch, capsys, engine: Engine, args, message) -> None:
    code, err, seen = serve_cli(monkeypatch, capsys, engine, *args)
    assert code != 0 and "app" not in seen and seen["opened"] == []
    assert len(err.strip().splitlines()) == 1 and message in err


def test_serve_with_a_token_from_the_environment(monkeypatch, capsys, engine: Engine) -> None:
    """Bound to one address with a token: that address and loopback names are accepted as Host,
    others are not; every route but /healthz asks for the token."""
    code, err, seen = serve_cli(monkeypatch, capsys, engine, "--host", "10.1.2.3", "--port", "8001", env=TOKEN)
    assert code == 0 and seen["host"] == "10.1.2.3", err
    with TestClient(seen["app"], base_url="http://10.1.2.3:8001") as client:
        assert_error(client.get("/api/info"), 401)
        assert client.get("/api/info", headers=BEARER).status_code == 200
        assert client.get("/api/info", headers={**BEARER, "Host": "localhost:8001"}).status_code == 200
        assert_error(client.get("/api/info", headers={**BEARER, "Host": "evil.example"}), 400)
        assert client.get("/healthz").status_code == 200


def test_serve_loopback_needs_no_token(monkeypatch, capsys, engine: Engine) -> None:
    code, err, seen = serve_cli(monkeypatch, capsys, engine, "--allow-host", "box.lan")
    assert code == 0 and seen["host"] == "127.0.0.1", err
    with TestClient(seen["app"], base_url="http://box.lan:8000") as client:
        assert client.get("/api/info").status_code == 200
        assert_error(client.get("/api/info", headers={"Host": "evil.example"}), 400)


def test_serve_library_function_refuses_too(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("served without a token"))
    with pytest.raises(StylegenError, match="without a token"):
        service.serve(engine, host="0.0.0.0")


# --------------------------------------------------------------------------- rate limit


def test_rate_limit_per_client_with_retry_after(engine: Engine) -> None:
    app = create_app(engine, rate_limit="3/min")
    with local(app) as one, local(app, client=("10.0.0.9", 4000)) as other:
        statuses = [one.post("/similar", data={"id": "1", "k": "2"}).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        limited = one.post("/classify", data={"id": "1"})
        assert "too many requests" in assert_error(limited, 429)
        assert 1 <= int(limited.headers["retry-after"]) <= 20  # a token every 20 s
        assert one.get("/api/info").status_code == 200  # only the query routes count
        assert one.get("/covers/1").status_code == 200
        assert other.post("/classify", data={"id": "1"}).status_code == 200  # its own bucket


def test_failed_logins_are_rate_limited(engine: Engine) -> None:
    with local(create_app(engine, token=TOKEN, rate_limit="3/min")) as client:
        wrong = {"Authorization": "Bearer guess"}
        assert [client.get("/api/info", headers=wrong).status_code for _ in range(3)] == [401] * 3
        assert_error(client.get("/api/info", headers=wrong), 429)
        assert client.get("/api/info", headers=BEARER).status_code == 200


def test_default_rate_limit_is_120_a_minute() -> None:
    """120 at once, then one every half second (the bucket refills while the test runs)."""
    engine = CountingEngine()
    with local(create_app(engine)) as client:
        start = time.monotonic()
        statuses = [client.post("/classify", data={"id": "0"}).status_code for _ in range(120)]
        while statuses[-1] == 200 and len(statuses) < 1000:
            statuses.append(client.post("/similar", data={"id": "0"}).status_code)
        elapsed = time.monotonic() - start
    assert statuses[:120] == [200] * 120 and statuses[-1] == 429
    assert len(statuses) - 1 <= 120 + 2 * elapsed + 1 and engine.calls == len(statuses) - 1


def test_token_bucket_refills() -> None:
    now = [0.0]
    limiter = service.RateLimiter(2, 60.0, clock=lambda: now[0])
    assert limiter.take("a") == limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(30.0)
    assert limiter.take("b") == 0.0
    now[0] = 29.0
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] = 30.0
    assert limiter.take("a") == 0.0


def test_limiter_forgets_refilled_clients() -> None:
    now = [0.0]
    limiter = service.RateLimiter(5, 60.0, clock=lambda: now[0], max_clients=3)
    for client in "abc":
        limiter.take(client)
    now[0] = 60.0  # a, b and c have refilled
    limiter.take("d")
    assert set(limiter.buckets) == {"d"}


@pytest.mark.parametrize("text, capacity, per_second", [("120/min", 120, 2.0), ("5/s", 5, 5.0), ("7 / hour", 7, 7 / 3600)])
def test_parse_rate_limit(text: str, capacity: int, per_second: float) -> None:
    limiter = service.RateLimiter.parse(text)
    assert limiter.capacity == capacity and limiter.rate == pytest.approx(per_second)
    assert service.RateLimiter.parse("0") is service.RateLimiter.parse("off") is service.RateLimiter.parse(None) is None


@pytest.mark.parametrize("text", ["fast", "10/day", "-1/min", "0/min", "1.5/min"])
def test_bad_rate_limit(text) -> None:
    with pytest.raises(StylegenError, match="rate limit"):
        service.RateLimiter.parse(text)


# --------------------------------------------------------------------------- upload formats


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    prepare = images.prepare
    monkeypatch.setattr(images, "prepare", lambda *a, **k: calls.append(1) or prepare(*a, **k))
    return calls


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "PCX", "TGA", "ICO", "SGI", "EPS", "PDF"])
def test_other_formats_are_refused_before_decoding(engine: Engine, decodes: list[int], fmt: str) -> None:
    """Pillow would open TIFF, PPM, ... and hand EPS to Ghostscript: 415 from the first bytes,
    whatever the file name and Content-Type say."""
    data = image_bytes(fmt) if fmt != "EPS" else b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with local(create_app(engine)) as client:
        for endpoint in ("/classify", "/similar"):
            response = client.post(endpoint, files=upload(data, "cover.jpg", "image/jpeg"))
            assert FORMATS in assert_error(response, 415)
    assert decodes == []


@pytest.mark.parametrize("fmt, params", [("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {}),
                                         ("WEBP", {"lossless": True}), ("PNG", {"optimize": True})])
def test_the_five_formats_are_accepted(engine: Engine, fmt: str, params: dict) -> None:
    with local(create_app(engine)) as client:
        response = client.post("/classify", files=upload(image_bytes(fmt, **params), "x.bin", "application/octet-stream"))
        assert response.status_code == 200, response.text
        assert response.json()["query"]["width"] == 64


def test_image_format_by_magic_bytes() -> None:
    assert [service.image_format(image_bytes(f)) for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP")] == [
        "JPEG", "PNG", "WEBP", "GIF", "BMP"]
    for data in (b"", b"RIFF\x00\x00\x00\x00WAVE", b"II*\x00", b"P6\n1 1\n255\n", b"%!PS", b"GIF88a"):
        assert service.image_format(data) is None


# --------------------------------------------------------------------------- one decode limiter


def test_uploads_and_thumbnails_are_decoded_one_at_a_time(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uploads (decoded inside Engine.query) and thumbnails (decoded by the service) share
    the app's one limiter: never two images in memory at once."""
    active, peak, calls = [0], [0], []
    guard = threading.Lock()
    open_image = images.open_image

    def counting(*args, **kwargs):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            calls.append(1)
        try:
            time.sleep(0.05)  # widen the window in which a second decode could overlap
            return open_image(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(images, "open_image", counting)
    monkeypatch.setattr(service, "open_image", counting)
    uploads = [new_cover(20 + i, GENRES[i % 4]) for i in range(4)]
    start = threading.Barrier(8)

    def one(i: int) -> int:
        start.wait()
        if i % 2:
            return client.get(f"/covers/{i}").status_code
        return client.post("/classify", files=upload(uploads[i // 2])).status_code

    with local(create_app(engine)) as client, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(8)))
    assert statuses == [200] * 8
    assert len(calls) == 8 and peak[0] == 1


# --------------------------------------------------------------------------- error bodies


def test_server_error_names_no_index_path(index_dir: Path, tmp_path: Path) -> None:
    """A head missing from the index: 500 says which and that it is not trained, not where."""
    copy = tmp_path / "srv" / "indexes" / "covers"
    shutil.copytree(index_dir, copy)
    for head in copy.rglob("ensemble.*"):  # whatever form the head set stores it in
        head.unlink()
    with local(create_app(Engine.open(copy, device="cpu"))) as client:
        message = assert_error(client.post("/classify", data={"id": "0", "method": "ensemble"}), 500)
    assert "ensemble" in message and "not trained" in message and "the index" in message
    assert str(tmp_path) not in message and "srv" not in message and not ABSOLUTE.search(message)


class PathLeakingEngine:
    """Errors whose messages carry server paths, as lower layers write them."""

    def query(self, item, **options):
        if isinstance(item, int):
            raise IndexNotFoundError("no stylegen index at /srv/data/indexes/default "
                                     "(run `stylegen embed SOURCE --index /srv/data/indexes/default`)")
        raise BadImageError("/home/me/Music/Artist/cover.jpg: corrupt or truncated image: broken data stream")

    def cover_path(self, cover_id: int) -> Path:
        raise FileNotFoundError(f"[Errno 2] No such file: '/srv/data/covers/{cover_id}.jpg'")

    def info(self) -> dict:
        return {"count": 0}


def test_error_bodies_carry_no_server_paths() -> None:
    with local(create_app(PathLeakingEngine()), raise_server_exceptions=False) as client:
        message = assert_error(client.post("/classify", data={"id": "0"}), 500)
        assert message == "no stylegen index at default (run `stylegen embed SOURCE --index default`)"
        message = assert_error(client.post("/similar", files=upload(b"\xff\xd8\xff" + b"x" * 50)), 400)
        assert message == "cover.jpg: corrupt or truncated image: broken data stream"
        message = assert_error(client.get("/covers/4"), 500)  # not a StylegenError: a bug, said plainly
        assert "internal server error" in message and "srv" not in message


@pytest.mark.parametrize("message, expected", [
    ("/srv/idx/covers/a.jpg: truncated", "a.jpg: truncated"),
    ("file '/srv/a b/c.png' unreadable", "file 'c.png' unreadable"),
    ('cannot read "C:\\My Covers\\a.jpg"', 'cannot read "a.jpg"'),
    ("/srv/My Music/b.jpg: bad", "My Music/b.jpg: bad"),  # unquoted with a space: no absolute path left
    (r"C:\Users\me\covers\x.jpg: bad", "x.jpg: bad"),
    ("~/Music/a.flac: no cover", "a.flac: no cover"),
    ("head 'mlp' is not trained in /data/idx (trained: knn)", "head 'mlp' is not trained in the index (trained: knn)"),
    ("send image/jpeg or see https://example.org/a/b", "send image/jpeg or see https://example.org/a/b"),
    ("upload is larger than the limit of 10,000 bytes", "upload is larger than the limit of 10,000 bytes"),
])
def test_redact_paths(message: str, expected: str) -> None:
    assert service.redact_paths(message, ["/data/idx", "idx"]) == expected


# --------------------------------------------------------------------------- docs and schema


def test_docs_are_off_the_schema_stays(engine: Engine) -> None:
    """Swagger UI and ReDoc load their scripts from a CDN; the page works offline, so they are off."""
    with local(create_app(engine)) as client:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert_error(client.get(path), 404)
        schema = client.get("/openapi.json")
        assert schema.status_code == 200 and "/classify" in schema.json()["paths"]
        assert "cdn" not in schema.text.lower()


def test_schema_declares_the_token_and_the_rate_limit(secured: TestClient, engine: Engine) -> None:
    schema = secured.get("/openapi.json", headers=BEARER).json()
    assert schema["components"]["securitySchemes"]["token"] == {
        "type": "http", "scheme": "bearer", "description": "the token `stylegen serve` was given"}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            secured_op = "security" in operation
            assert secured_op == (path != "/healthz") and ("401" in operation["responses"]) == secured_op
    with local(create_app(engine)) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert "429" in paths["/classify"]["post"]["responses"] and "429" not in paths["/api/info"]["get"]["responses"]
    assert all("security" not in op for ops in paths.values() for op in ops.values())


def test_image_of_other_format_is_still_pillow_readable() -> None:
    """Guards the refusal tests: those bytes are images Pillow opens (TIFF, PPM, ...), so only
    the format check can have refused them."""
    for fmt in ("TIFF", "PPM", "PCX", "TGA", "SGI"):
        assert Image.open(io.BytesIO(image_bytes(fmt))).size == (64, 48)
