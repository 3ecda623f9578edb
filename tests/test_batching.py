"""Micro-batching: ``Engine.query_batch`` answers like ``Engine.query`` one at a time, the
service's batcher gathers requests, isolates a bad one and refuses with 503 when full.

Tolerance of "the same answer": a batch changes only which rows share one featurizer call.
ONNX Runtime computes every row with the same kernels, but the blocking of its matrix
products follows the batch size, so sums may be taken in another order: float32 round-off,
~1e-7 relative. Probabilities (rounded to 6 decimals by the engine) and similarities are
compared to 1e-5, vectors by cosine to 1e-6; rankings must be identical (the generated
covers have no near-ties at that scale)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from stylegen.apps.batching import Batcher, Overloaded
from stylegen.apps.service import create_app
from stylegen.errors import BadImageError, StylegenError
from stylegen.query.engine import Engine, QueryResult
from tests.conftest import embed_tiny
from tests.test_service import GENRES, LOCAL, assert_error, new_cover, upload, write_covers

TOL = 1e-5


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    from threadpoolctl import threadpool_limits

    from stylegen.heads.train import train

    root = tmp_path_factory.mktemp("batching")
    write_covers(root / "covers", n=12).to_csv(root / "covers.csv", index=False)
    embed_tiny(root / "covers.csv", root / "idx")
    with threadpool_limits(1):
        train(root / "idx", heads=("linear", "knn", "ensemble"), validate=False)
    engine = Engine.open(root / "idx", device="cpu")
    engine.featurizer  # noqa: B018
    return engine


def same_result(a: QueryResult, b: QueryResult) -> None:
    assert (a.label, a.row, a.content_hash, a.size, a.method) == (b.label, b.row, b.content_hash, b.size, b.method)
    cos = float(a.vector @ b.vector / (np.linalg.norm(a.vector) * np.linalg.norm(b.vector)))
    assert cos > 1 - 1e-6
    assert [g["genre"] for g in a.genres] == [g["genre"] for g in b.genres]
    assert np.allclose([g["probability"] for g in a.genres], [g["probability"] for g in b.genres], atol=TOL)
    assert [n["id"] for n in a.neighbours] == [n["id"] for n in b.neighbours]
    assert [n["is_query"] for n in a.neighbours] == [n["is_query"] for n in b.neighbours]
    assert np.allclose([n["similarity"] for n in a.neighbours], [n["similarity"] for n in b.neighbours], atol=TOL)


def test_query_batch_answers_like_query_one_at_a_time(engine: Engine) -> None:
    """New uploads, a cover of the index by its bytes and by id, with different options in one
    batch: each answer is the one ``query`` gives alone; a corrupt upload among them fails
    alone, with ``query``'s error."""
    indexed = Path(engine.index.rows([3])["path"].iloc[0]).read_bytes()
    corrupt = new_cover(7, "pop")[:300]  # JPEG magic, truncated body
    requests = [
        (new_cover(1, "metal"), {"top": 3, "label": "a.jpg"}),
        (new_cover(2, "jazz"), {"k": 5, "by": "style", "classify": False, "label": "b.jpg"}),
        (corrupt, {"top": 3, "label": "bad.jpg"}),
        (indexed, {"top": 2, "k": 4, "label": "indexed.jpg"}),
        (5, {"top": 3, "method": "knn"}),
        (new_cover(3, "electronic"), {"top": 3, "label": "c.jpg"}),
        (new_cover(4, "pop"), {"top": 3, "method": "head", "k": 3, "label": "d.jpg"}),
    ]
    batched = engine.query_batch(requests)
    assert len(batched) == len(requests)
    for (item, options), got in zip(requests, batched, strict=True):
        options = dict(options)
        label = options.pop("label", None)
        if item is corrupt:
            assert isinstance(got, BadImageError) and str(got).startswith("bad.jpg: ")
            with pytest.raises(BadImageError):
                engine.query(item, label=label, **options)
            continue
        assert isinstance(got, QueryResult), got
        same_result(got, engine.query(item, label=label, **options))
    assert batched[3].row == 3 and batched[3].neighbours[0]["is_query"]


def test_query_batch_embeds_new_items_in_one_forward_pass(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    featurizer = engine.featurizer

    def counting(pixels):
        calls.append(len(pixels))
        return featurizer(pixels)

    monkeypatch.setattr(engine, "_featurizer", counting)
    requests = [(new_cover(20 + i, GENRES[i % 4]), {"top": 3} if i % 2 else {"k": 3, "classify": False})
                for i in range(6)]
    assert all(isinstance(r, QueryResult) for r in engine.query_batch(requests))
    assert calls == [6]  # both option groups share one featurizer call
    calls.clear()
    assert all(isinstance(r, QueryResult) for r in engine.query_batch(requests, batch_size=4))
    assert calls == [4, 2]  # the service's forward_batch: chunks of the featurizer's best size


def test_query_batch_isolates_a_failing_group(engine: Engine) -> None:
    """A request whose options fail (an untrained head) gets its error; the others their answers."""
    requests = [(new_cover(30, "metal"), {"top": 3}), (new_cover(31, "jazz"), {"top": 3, "method": "bogus"}),
                (new_cover(32, "pop"), {"k": 3, "classify": False})]
    got = engine.query_batch(requests)
    assert isinstance(got[1], StylegenError) and "method" in str(got[1])
    same_result(got[0], engine.query(requests[0][0], top=3))
    same_result(got[2], engine.query(requests[2][0], k=3, classify=False))


def test_query_batch_with_explain_matches_query(engine: Engine) -> None:
    cover = new_cover(40, "electronic")
    got = engine.query_batch([(cover, {"explain": True}), (new_cover(41, "pop"), {"top": 3})])[0]
    alone = engine.query(cover, explain=True)
    assert got.explanation is not None
    assert got.explanation.keys() == alone.explanation.keys()


# --------------------------------------------------------------------------- the batcher


def test_batcher_takes_what_queued_while_busy_up_to_max_batch() -> None:
    """While the worker runs one batch, 6 requests queue; it then takes them max_batch at a time."""
    release = threading.Event()
    sizes: list[int] = []

    def run(requests):
        sizes.append(len(requests))
        if len(sizes) == 1:
            release.wait(10)
        return [item * 10 for item, _ in requests]

    batcher = Batcher(run, max_batch=4, window=0.0, max_pending=16)
    with ThreadPoolExecutor(7) as pool:
        first = pool.submit(batcher.call, 0, {})
        while not sizes:  # the worker is busy with the first request
            threading.Event().wait(0.001)
        rest = [pool.submit(batcher.call, i, {}) for i in range(1, 7)]
        while batcher.queue.qsize() < 6:
            threading.Event().wait(0.001)
        release.set()
        assert first.result() == 0 and [f.result() for f in rest] == [10 * i for i in range(1, 7)]
    assert sizes == [1, 4, 2]


def test_batcher_window_gathers_requests_that_arrive_together() -> None:
    sizes: list[int] = []
    batcher = Batcher(lambda reqs: sizes.append(len(reqs)) or [None] * len(reqs), max_batch=8, window=5.0)
    barrier = threading.Barrier(5)

    def one(i: int) -> None:
        barrier.wait()
        batcher.call(i, {})

    with ThreadPoolExecutor(5) as pool:
        list(pool.map(one, range(5)))
    assert sum(sizes) == 5 and len(sizes) < 5  # a window of 5 s gathers the burst


def test_a_lone_admitted_request_does_not_wait_for_the_window() -> None:
    """Nothing else is admitted, so nothing can join its batch: it runs at once, not after
    the window (a 5 s window would otherwise hold it 5 s); two admitted requests still wait."""
    sizes: list[int] = []
    batcher = Batcher(lambda reqs: sizes.append(len(reqs)) or [None] * len(reqs), max_batch=8, window=5.0)
    t = time.monotonic()
    with batcher.admit():
        batcher.call(0, {})
    assert time.monotonic() - t < 2.0 and sizes == [1]
    batcher.window = 0.5
    barrier = threading.Barrier(2)

    def one(i: int) -> None:
        with batcher.admit():
            barrier.wait()
            batcher.call(i, {})

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(2)))
    assert sizes[1:] == [2]  # the second arrived within the window: one batch


def test_batcher_passes_each_request_its_own_error() -> None:
    batcher = Batcher(lambda reqs: [BadImageError("bad") if i == 1 else i for i, _ in reqs], window=0.0)
    assert batcher.call(0, {}) == 0
    with pytest.raises(BadImageError):
        batcher.call(1, {})


def test_batcher_refuses_when_full() -> None:
    batcher = Batcher(lambda reqs: [None] * len(reqs), max_pending=2)
    with batcher.admit(), batcher.admit():
        with pytest.raises(Overloaded) as info:
            with batcher.admit():
                pass
        assert info.value.http_status == 503 and info.value.retry_after >= 1
    with batcher.admit():  # places are given back
        assert batcher.pending == 1


# --------------------------------------------------------------------------- the service


def answer_key(body: dict) -> tuple:
    return (body["query"]["in_index"], [g["genre"] for g in body.get("genres", [])],
            [n["id"] for n in body.get("neighbours", [])])


def test_service_batched_answers_equal_one_at_a_time(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """12 concurrent uploads (new covers, a cover of the index, a corrupt JPEG and a text file)
    through a batching app: the good ones get the answers of an app that runs one request at
    a time, in fewer engine calls than requests; the bad ones their own 4xx, failing nothing else."""
    sizes: list[int] = []
    query_batch = engine.query_batch

    def spy(requests, **kwargs):
        sizes.append(len(requests))
        return query_batch(requests, **kwargs)

    monkeypatch.setattr(engine, "query_batch", spy)
    indexed = Path(engine.index.rows([2])["path"].iloc[0]).read_bytes()
    uploads = [new_cover(50 + i, GENRES[i % 4]) for i in range(9)] + [indexed]
    bad = {10: (new_cover(60, "pop")[:400], 400), 11: (b"\xff\xd8\xff" + b"not really", 415)}

    def post(client: TestClient, i: int):
        data, _ = bad.get(i, (None, None))
        data = data if data is not None else uploads[i]
        if i % 2:
            return client.post("/classify", files=upload(data, f"u{i}.jpg"), data={"top": "3"})
        return client.post("/similar", files=upload(data, f"u{i}.jpg"), data={"k": "5"})

    with TestClient(create_app(engine, rate_limit=None, batch_size=1, batch_window_ms=0), base_url=LOCAL) as c:
        alone = [post(c, i) for i in range(12)]
    sizes.clear()
    barrier = threading.Barrier(12)
    with TestClient(create_app(engine, rate_limit=None, batch_size=16, batch_window_ms=300),
                    base_url=LOCAL) as c:
        def one(i: int):
            barrier.wait()
            return post(c, i)

        with ThreadPoolExecutor(12) as pool:
            batched = list(pool.map(one, range(12)))
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        if i in bad:
            assert_error(a, bad[i][1])
            assert_error(b, bad[i][1])
            continue
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert answer_key(a.json()) == answer_key(b.json())
        pa = [g["probability"] for g in a.json().get("genres", [])]
        pb = [g["probability"] for g in b.json().get("genres", [])]
        assert np.allclose(pa, pb, atol=TOL)
    assert batched[9].json()["query"]["in_index"] is True
    assert sum(sizes) == 10 and len(sizes) < 10  # the 10 good uploads, gathered into batches


class BlockingEngine:
    """Every query waits for ``release``: requests pile up in the service."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def query(self, item, **options):
        self.started.release()
        self.release.wait(10)
        return SimpleNamespace(method="head", genres=[], levels={}, neighbours=[], row=item, size=None)

    def cover_path(self, cover_id: int) -> Path:
        raise StylegenError("no covers")

    def info(self) -> dict:
        return {"count": 0}


def test_service_answers_503_with_retry_after_when_the_queue_is_full() -> None:
    engine = BlockingEngine()
    app = create_app(engine, rate_limit=None, batch_size=1, batch_window_ms=0, max_queue=2)
    with TestClient(app, base_url=LOCAL) as client, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(client.post, "/classify", data={"id": str(i)}) for i in range(2)]
        assert engine.started.acquire(timeout=10)  # the first is in the engine, the second queued
        batcher = app.state.service.batcher
        for _ in range(500):  # until both hold their places
            if batcher.pending == 2:
                break
            threading.Event().wait(0.01)
        refused = client.post("/classify", data={"id": "7"})
        message = assert_error(refused, 503)
        assert "busy" in message and int(refused.headers["Retry-After"]) >= 1
        assert client.get("/healthz").status_code == 200  # the server still answers
        engine.release.set()
        assert [f.result().status_code for f in held] == [200, 200]
        assert client.post("/classify", data={"id": "3"}).status_code == 200  # room again



def test_serve_command_passes_the_batching_options(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
    from typer.testing import CliRunner

    from stylegen.apps.cli import app

    seen: dict = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(kw, app=app))
    result = CliRunner().invoke(app, ["serve", "--index", str(engine.index.root), "--device", "cpu",
                                      "--batch-size", "3", "--batch-window-ms", "7.5", "--max-queue", "5",
                                      "--forward-batch", "2"])
    assert result.exit_code == 0, result.output
    batcher = seen["app"].state.service.batcher
    assert (batcher.max_batch, batcher.window, batcher.max_pending) == (3, 0.0075, 5)
    assert seen["app"].state.service.forward_batch == 2
    bad = CliRunner().invoke(app, ["serve", "--index", str(engine.index.root), "--batch-size", "0"])
    assert bad.exit_code != 0
