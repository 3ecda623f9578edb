"""--explain: a planted index where one tap layer alone separates the genres (planted at the
raw-feature level, written with the store's own writer; no model needed) must give that tap
the largest share; the voters are the kNN head's neighbours with their weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from stylegen.index.store import Index
from stylegen.query.engine import Engine
from stylegen.query.explain import leave_out_vectors, tap_blocks
from stylegen.sources import images
from tests.conftest import make_image, write_index

TAPS = ["stage4", "stage5", "stage6"]
CHANNELS = [4, 5, 6]  # blocks of 10, 15 and 21 values
GENRES = ["jazz", "metal"]
SIGNAL_TAP = 1  # only stage5 differs between the genres


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Engine, Path]:
    from threadpoolctl import threadpool_limits

    from stylegen.heads.train import train

    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(0)
    n = 80
    y = np.repeat([0, 1], n // 2)
    blocks = []
    for t, (a, b) in enumerate(tap_blocks(CHANNELS, 128)):
        x = rng.normal(size=(n, b - a)) + 5.0  # Gram entries are mostly positive
        if t == SIGNAL_TAP:
            direction = rng.normal(size=b - a)
            x += np.where(y[:, None] == 0, 1.5, -1.5) * direction
        blocks.append(unit(x) / np.sqrt(len(CHANNELS)))
    raw = {"style": np.concatenate(blocks, axis=1).astype(np.float32),
           "content": unit(rng.normal(size=(n, 12))).astype(np.float32)}
    probe = make_image(root / "probe.png", kind=0)  # a file that is cover 0 of the index (by hash)
    hashes = [images.hash_bytes(images.read_bytes(probe))] + [f"h{i}" for i in range(1, n)]
    meta = pd.DataFrame({"image": [f"c{i}.png" for i in range(n)], "path": [str(probe)] * n,
                         "genre": [GENRES[g] for g in y], "artist": [f"a{i}" for i in range(n)],
                         "content_hash": hashes})
    backbone = {"name": "planted", "weights_id": "planted", "taps": TAPS, "tap_channels": CHANNELS,
                "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    write_index(root / "idx", raw, meta, dims=8, backbone=backbone)
    with threadpool_limits(1):
        train(root / "idx", heads=("linear", "knn", "ensemble"), validate=False)
    return Engine(Index.open(root / "idx")), probe


@pytest.mark.parametrize("method", ["head", "knn", "ensemble"])
def test_the_separating_tap_gets_the_largest_share(planted, method):
    engine, _ = planted
    for cover in (3, 60):
        r = engine.query(cover, method=method, explain=True)
        e = r.explanation
        assert e["genre"] == GENRES[cover >= 40] == r.genres[0]["genre"]
        shares = {t["tap"]: t["share"] for t in e["taps"]}
        assert list(shares) == TAPS
        assert max(shares, key=shares.get) == TAPS[SIGNAL_TAP], e["taps"]
        assert shares[TAPS[SIGNAL_TAP]] > 0.6
        deltas = {t["tap"]: t["delta"] for t in e["taps"]}
        assert deltas[TAPS[SIGNAL_TAP]] > 0.1  # leaving it out costs the prediction


def test_voters_are_the_knn_neighbours_with_their_weights(planted):
    engine, _ = planted
    r = engine.query(3, method="knn", explain=True)
    voters = r.explanation["voters"]
    assert 0 < len(voters) <= 10 and all(v["id"] != 3 for v in voters)  # never itself
    weights = [v["weight"] for v in voters]
    assert weights == sorted(weights, reverse=True)
    # the knn probability of the predicted genre is the summed weight of its voters (all 50)
    assert sum(w for v, w in zip(voters, weights, strict=True) if v["genre"] == "jazz") <= r.proba[0] + 1e-3
    assert [v["genre"] for v in voters].count("jazz") >= 8


def test_leaving_out_a_tap_touches_only_that_block(planted):
    engine, _ = planted
    raw = engine.raw_features(5)
    vecs = leave_out_vectors(engine, raw, tap_blocks(CHANNELS, 128))
    full = np.asarray(engine.index.vectors[5])
    assert vecs.shape == (3, len(full))
    a, b = engine.index.slices["content"]
    # the content part is unchanged up to the final renormalisation
    for v in vecs:
        cos = v[a:b] @ full[a:b] / np.linalg.norm(v[a:b]) / np.linalg.norm(full[a:b])
        assert cos > 0.9999
    assert all(np.abs(v - full).max() > 1e-4 for v in vecs)


def test_cli_and_api_explain(planted):
    from fastapi.testclient import TestClient

    from stylegen.apps.cli import app
    from stylegen.apps.service import create_app

    engine, probe = planted
    out = CliRunner().invoke(app, ["classify", str(probe), "--index", str(engine.index.root), "--explain",
                                   "--method", "knn"])
    assert out.exit_code == 0, out.output
    assert "tap stage5" in out.output and "voter #" in out.output
    client = TestClient(create_app(engine), base_url="http://127.0.0.1")
    body = client.post("/classify", data={"id": 60, "explain": "true", "method": "knn"}).json()
    taps = body["explanation"]["taps"]
    assert max(taps, key=lambda t: t["share"])["tap"] == "stage5"
    assert "explanation" not in client.post("/classify", data={"id": 60}).json()


EXPLAIN_PROBE = """
import json, sys, time
from stylegen.query.engine import Engine
engine = Engine.open(sys.argv[1], device="cpu")
engine.query(0, method="knn", explain=True)  # warm: heads and raw-feature locations loaded
t0 = time.perf_counter()
r = engine.query(4, method="knn", explain=True)
ms = (time.perf_counter() - t0) * 1000
print(json.dumps({"ms": ms, "torch": "torch" in sys.modules, "taps": r.explanation["taps"],
                  "note": r.explanation.get("note"), "voters": len(r.explanation["voters"])}))
"""


def test_explain_on_an_embedded_index_reads_stored_data_without_torch(tmp_path):
    """An index made by ``stylegen embed``: the manifest records the taps' widths and the
    covers' raw vectors are read from the shards, so explain runs no network and imports no
    torch (the README's promise; docs/benchmarks.md has the warm latency)."""
    import json
    import subprocess
    import sys

    for g, genre in enumerate(["jazz", "metal"]):
        for i in range(6):
            make_image(tmp_path / "covers" / genre / f"{genre}{i}.png", kind=g, seed=10 * g + i)
    idx = tmp_path / "idx"

    def cli(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "stylegen", *args], capture_output=True, text=True,
                             check=False, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout

    cli("embed", str(tmp_path / "covers"), "--index", str(idx), "--dim", "4", "--no-progress", "--device", "cpu")
    manifest = Index.open(idx).manifest
    assert manifest["backbone"]["tap_channels"] == [80, 112, 192]  # EfficientNet-Lite0 stages 4-6
    cli("train", "--index", str(idx), "--head", "knn", "--head", "linear")
    probe = subprocess.run([sys.executable, "-c", EXPLAIN_PROBE, str(idx)], capture_output=True, text=True,
                           check=False, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    out = json.loads(probe.stdout.strip().splitlines()[-1])
    assert out["torch"] is False and out["note"] is None
    assert [t["tap"] for t in out["taps"]] == manifest["backbone"]["taps"]
    assert out["voters"] > 0
    assert out["ms"] < 500, out["ms"]  # a loose bound for a loaded CI machine; ~ms warm here
