"""One query path: every entry point embeds and scores a cover exactly like the collection.

The CLI (classify, similar), the HTTP service, ``evaluate --test`` and the library all call
``Engine.query``; these tests hold them to the same answers for the same file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from stylegen.apps.cli import app
from stylegen.apps.service import create_app
from stylegen.evaluation import runs as scoring
from stylegen.heads.io import read_head_set
from stylegen.heads.train import train
from stylegen.query.engine import Engine
from stylegen.sources.labels import Taxonomy
from stylegen.util.persist import TMP_PREFIX
from tests.conftest import COVERS_CSV, embed_tiny, needs_real_data, planted_rows

GENRES = ["jazz", "metal", "pop"]
runner = CliRunner()


def with_comment(data: bytes, text: bytes = b"stylegen test copy") -> bytes:
    """The same JPEG with a comment segment after SOI: other bytes (another content hash),
    identical pixels."""
    assert data[:2] == b"\xff\xd8"
    return data[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + data[2:]


def invoke(*args: str) -> dict:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- planted index


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("planted")
    df = pd.DataFrame(planted_rows(root, GENRES, 8, lambda g, i: {"artist": f"a{g}{i % 4}"}))
    df.to_csv(root / "all.csv", index=False)
    embed_tiny(root / "all.csv", root / "idx")
    with threadpool_limits(1):
        train(root / "idx", heads=("linear", "knn", "ensemble"), validate=False)
    return root, root / "idx"


def test_indexed_cover_gets_one_answer_by_path_upload_and_id(planted):
    root, idx = planted
    path = root / "img" / "metal3.png"  # row 11 of the index
    cli = invoke("classify", str(path), "--index", str(idx), "--method", "knn", "--json", "--top", "3")["results"][0]
    engine = Engine.open(idx)
    with TestClient(create_app(engine), base_url="http://127.0.0.1") as client:
        api = client.post("/classify", files={"image": ("x.png", path.read_bytes(), "image/png")},
                          data={"method": "knn"}).json()
        by_id = client.post("/classify", data={"id": "11", "method": "knn"}).json()
    assert cli["in_index"] and cli["id"] == 11 and api["query"]["in_index"] and api["query"]["id"] == 11
    assert cli["genres"] == api["genres"] == by_id["genres"]
    # its own vote is left out: the answer differs from the same vector scored as a stranger
    lib = engine.query(path, method="knn")
    stranger, _, _ = engine.predict_proba(lib.vector[None], "knn", rows=[None])
    assert not np.allclose(lib.proba, stranger[0], rtol=0.01, atol=0)  # votes are near-unanimous here: compare relatively
    assert [g["probability"] for g in cli["genres"]] == pytest.approx(sorted(lib.proba, reverse=True)[:3], abs=1e-6)


def test_a_query_reads_metadata_rows_not_the_whole_table(planted):
    root, idx = planted
    engine = Engine.open(idx)
    found = engine.query(root / "img" / "metal3.png", method="ensemble", k=5)
    stranger = engine.query(Image.open(root / "img" / "pop1.png").convert("RGB"), method="knn", k=5)
    assert found.row == 11 and stranger.row is None and len(stranger.neighbours) == 5
    assert not engine.index.table.loaded


def test_the_query_path_loads_neither_scikit_learn_nor_torch(planted):
    """Cold start: heads are read in their compiled form, metadata row by row."""
    root, idx = planted
    code = f"""
import sys
from stylegen.query.engine import Engine
engine = Engine.open({str(idx)!r})
for method in ("head", "knn", "ensemble"):
    r = engine.query({str(root / "img" / "metal3.png")!r}, method=method, k=3)
print(r.label, r.row, sorted(m for m in ("sklearn", "torch", "scipy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1:] == ["11", "[]"]


def test_is_query_is_decided_by_content_hash_not_similarity(planted, tmp_path):
    root, idx = planted
    original = root / "img" / "jazz2.png"
    copy = tmp_path / "copy.png"
    img = Image.open(original)
    img.save(copy, pnginfo=_png_text("note", "another file, same pixels"))
    assert copy.read_bytes() != original.read_bytes()
    engine = Engine.open(idx)
    mine = engine.query(original, k=3, classify=False)
    other = engine.query(copy, k=3, classify=False)
    assert mine.in_index and mine.neighbours[0]["is_query"] and mine.neighbours[0]["id"] == mine.row
    assert not other.in_index and other.neighbours[0]["id"] == mine.row
    assert other.neighbours[0]["similarity"] > 0.9999 and not any(n["is_query"] for n in other.neighbours)


def _png_text(key: str, value: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return info


def test_a_failed_train_leaves_the_previous_heads_whole(planted, tmp_path, monkeypatch):
    root, idx = planted
    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    before = Engine.open(copy).query(root / "img" / "pop1.png").genres
    import stylegen.heads.io as head_io

    calls = []
    real_save = head_io.save_head

    def save_then_die(head, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("killed while writing heads")
        return real_save(head, path, **kw)

    monkeypatch.setattr(head_io, "save_head", save_then_die)
    with pytest.raises(RuntimeError), threadpool_limits(1):
        train(copy, heads=("linear", "knn"), labels="multi", validate=False)
    cfg = read_head_set(copy)
    assert cfg["labels"] == "single" and cfg["heads"] == ["linear", "knn", "ensemble"]
    assert Engine.open(copy).query(root / "img" / "pop1.png").genres == before
    assert len(calls) == 2 and not list((copy / "heads").glob(f"{TMP_PREFIX}*"))


def test_tabular_columns_are_matched_by_name(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(planted_rows(tmp_path, GENRES, 6))
    genre = df.index // 6
    df[df.index % 6 < 4].to_csv(tmp_path / "train.csv", index=False)
    df[df.index % 6 >= 4].to_csv(tmp_path / "test.csv", index=False)
    table = pd.DataFrame({"image": df["image"], "tempo": rng.normal(100, 20, len(df)),
                          "energy": genre * 2.0 + rng.normal(0, 0.1, len(df)),
                          "loudness": rng.normal(-10, 3, len(df))})
    table.to_csv(tmp_path / "table.csv", index=False)
    table[["energy", "image", "loudness", "tempo"]].to_csv(tmp_path / "shuffled.csv", index=False)
    embed_tiny(tmp_path / "train.csv", tmp_path / "idx")
    from stylegen.sources.tabular import load_tabular

    meta = Engine.open(tmp_path / "idx").index.metadata
    values, columns = load_tabular(meta, table=tmp_path / "table.csv")
    with threadpool_limits(1):
        train(tmp_path / "idx", heads=("mlp",), tabular=values, tabular_columns=columns, validate=False)
    spec = scoring.TableSpec
    a = scoring.run_test(tmp_path / "idx", tmp_path / "test.csv", table=spec(tmp_path / "table.csv", None))
    b = scoring.run_test(tmp_path / "idx", tmp_path / "test.csv", table=spec(tmp_path / "shuffled.csv", None))
    assert len(a.metrics["predictions"]) == 6 and a.metrics["predictions"] == b.metrics["predictions"]
    wrong = spec(tmp_path / "table.csv", ["tempo", "energy"])
    with pytest.raises(Exception, match="trained on columns"):
        scoring.run_test(tmp_path / "idx", tmp_path / "test.csv", table=wrong)


def test_multi_label_roll_up_stays_a_probability():
    tax = Taxonomy.from_tree({"rock": ["hard rock", "soft rock"], "jazz": []})
    proba = np.array([[0.9, 0.8, 0.1]])
    single, _ = tax.roll_up(np.array([[0.5, 0.3, 0.2]]), ["hard rock", "soft rock", "jazz"])
    multi, names = tax.roll_up(proba, ["hard rock", "soft rock", "jazz"], multi_label=True)
    assert names == ["jazz", "rock"]
    assert single[0].tolist() == pytest.approx([0.2, 0.8])  # exclusive: the sum
    assert multi[0].tolist() == pytest.approx([0.1, 1 - 0.1 * 0.2])  # noisy-OR: 0.98, not 1.7


def test_pixel_limit_is_the_same_for_the_collection_and_queries(planted, tmp_path):
    from stylegen.sources.images import DEFAULT_MAX_PIXELS

    _, idx = planted
    huge = tmp_path / "huge.png"
    Image.new("1", (7000, 6500)).save(huge)  # 45.5M pixels: over 40M, under the service's old 50M
    assert 7000 * 6500 > DEFAULT_MAX_PIXELS
    result = runner.invoke(app, ["classify", str(huge), "--index", str(idx)])
    assert result.exit_code != 0 and "too large" in str(result.exception or result.output)


def test_scikit_learn_floor_has_the_arguments_the_linear_head_passes():
    import inspect

    from packaging.requirements import Requirement
    from packaging.version import Version
    from sklearn.linear_model import LogisticRegressionCV

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    req = Requirement(re.search(r'"(scikit-learn[^"]*)"', pyproject).group(1))
    floor = min(Version(s.version) for s in req.specifier if s.operator == ">=")
    params = inspect.signature(LogisticRegressionCV).parameters
    assert {"l1_ratios", "use_legacy_attributes"} <= set(params)
    assert floor >= Version("1.8")  # both arguments first appear in scikit-learn 1.8


# --------------------------------------------------------------------------- real covers


@pytest.mark.realdata
@needs_real_data()
def test_every_entry_point_embeds_a_large_cover_like_the_collection(tmp_path):
    """30 real covers re-encoded as 1000 px JPEGs: their vectors from `stylegen embed` equal
    the vectors the CLI, the API, `evaluate --test` and the library compute for a byte-different
    copy of the same file (same pixels), and all four give the same genres."""
    covers = pd.read_csv(COVERS_CSV)
    covers = covers[covers["genre"].notna() & (covers["genre"] != "")].sample(90, random_state=3)
    base = COVERS_CSV.parent
    rows = []
    for i, row in enumerate(covers.itertuples()):
        img = Image.open(base / row.image).convert("RGB")
        if i < 30:  # re-encoded large, as people's covers usually are
            img = img.resize((1000, round(1000 * img.height / img.width)), Image.BICUBIC)
        name = f"img/c{i:02d}.jpg"
        (tmp_path / "img").mkdir(exist_ok=True)
        img.save(tmp_path / name, quality=90)
        rows.append({"image": name, "genre": row.genre, "artist": row.artist})
    pd.DataFrame(rows).to_csv(tmp_path / "collection.csv", index=False)
    embed_tiny(tmp_path / "collection.csv", tmp_path / "idx")
    with threadpool_limits(1):
        train(tmp_path / "idx", heads=("linear", "knn", "ensemble"), validate=False)
    queries = []
    for i in range(30):
        q = tmp_path / "q" / f"c{i:02d}.jpg"
        q.parent.mkdir(exist_ok=True)
        q.write_bytes(with_comment((tmp_path / rows[i]["image"]).read_bytes()))
        queries.append(q)
    pd.DataFrame({"image": [f"q/{q.name}" for q in queries], "genre": [r["genre"] for r in rows[:30]]}
                 ).to_csv(tmp_path / "queries.csv", index=False)

    engine = Engine.open(tmp_path / "idx")
    stored = np.asarray(engine.index.vectors[:30])
    lib = [engine.query(q, k=1) for q in queries]
    assert not any(r.in_index for r in lib)
    cos = np.array([float(r.vector @ s) for r, s in zip(lib, stored)])
    assert cos.min() >= 0.9999, cos.min()
    cli = invoke("classify", *map(str, queries), "--index", str(tmp_path / "idx"), "--json")["results"]
    with TestClient(create_app(engine), base_url="http://127.0.0.1") as client:
        api = [client.post("/classify", files={"image": (q.name, q.read_bytes(), "image/jpeg")}).json() for q in queries]
        api_similar = [client.post("/similar", files={"image": (q.name, q.read_bytes(), "image/jpeg")},
                                   data={"k": "1"}).json()["neighbours"][0] for q in queries]
    cli_similar = [invoke("similar", str(q), "--index", str(tmp_path / "idx"), "-k", "1", "--json")["neighbours"][0]
                   for q in queries[:3]]
    evaluated = scoring.run_test(tmp_path / "idx", tmp_path / "queries.csv").metrics["predictions"]
    for i in range(30):
        expected = lib[i].genres
        for other in (cli[i]["genres"], api[i]["genres"], evaluated[i]["genres"]):
            assert [g["genre"] for g in other] == [g["genre"] for g in expected]
            # probabilities are printed to 6 decimals; batches of 1 and of 30 may differ in the last
            assert [g["probability"] for g in other] == pytest.approx([g["probability"] for g in expected], abs=1.5e-6)
        assert api_similar[i]["id"] == i and api_similar[i]["similarity"] >= 0.9999
    for i, hit in enumerate(cli_similar):
        assert hit["id"] == i and hit["similarity"] >= 0.9999
