"""Model bundles: exported from an index, answering like it, safe to open, found by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from stylegen.errors import DataError, IndexMismatchError, IndexNotFoundError, StylegenError
from stylegen.heads.export import export_model
from stylegen.heads.train import train
from stylegen.index.bundle import open_model
from stylegen.index.store import Index
from stylegen.query.engine import Engine
from tests.conftest import embed_tiny, make_image, planted_rows

GENRES = ["jazz", "metal", "pop"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(source folder, trained index, its exported model) of 3 genres x 8 generated covers."""
    root = tmp_path_factory.mktemp("models")
    pd.DataFrame(planted_rows(root, GENRES, 8, lambda g, i: {"artist": f"a{g}{i % 4}"})).to_csv(
        root / "train.csv", index=False)
    embed_tiny(root / "train.csv", root / "idx")
    with threadpool_limits(1):
        train(root / "idx", heads=("linear", "knn", "ensemble"), validate=False)
    model = export_model(root / "idx", root / "models" / "tiny", card={"training_data": {"source": "generated"}})
    return root, root / "idx", model


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylegen", *args], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, **(env or {})}, cwd=cwd)


def test_a_model_answers_exactly_like_the_index_it_came_from(exported, tmp_path):
    _, idx, model = exported
    queries = [make_image(tmp_path / f"q{i}.png", i % 3, seed=70 + i) for i in range(4)]
    for method in ("head", "knn", "ensemble"):
        want, _ = Engine.open(idx).query_many(queries, method=method)
        got, _ = Engine.open(model=model).query_many(queries, method=method)
        np.testing.assert_allclose([r.proba for r in got], [r.proba for r in want], atol=1e-6, err_msg=method)


def test_a_model_holds_plain_arrays_and_no_trace_of_the_collection(exported):
    root, _, model = exported
    files = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert {Path(f).suffix for f in files} <= {".json", ".npz"}
    assert "heads/knn.npz" in files and "compressor.npz" in files
    text = "".join((model / f).read_text(errors="ignore") for f in files if f.endswith(".json"))
    assert str(root) not in text
    assert json.loads((model / "heads" / "heads.json").read_text())["train_rows"] == []
    with np.load(model / "heads" / "knn.npz", allow_pickle=False) as z:  # rounded at fit: stored as float16
        assert z["vectors"].dtype == np.float16
    with np.load(model / "compressor.npz", allow_pickle=False) as z:
        assert z["style.components"].dtype == np.float16


@pytest.mark.parametrize("intruder", ["heads/linear.joblib", "payload.pkl", "run.py"])
def test_a_model_holding_anything_but_arrays_is_refused_in_one_line(exported, tmp_path, intruder):
    _, _, model = exported
    copy = tmp_path / "shared"
    shutil.copytree(model, copy)
    (copy / intruder).write_bytes(b"\x80\x04anything")
    with pytest.raises(DataError, match="not part of a stylegen model"):
        open_model(copy)
    cover = make_image(tmp_path / "q.png", 0)
    out = cli("classify", str(cover), "--model", str(copy))
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and "not part of a stylegen model" in out.stderr


def test_models_are_listed_and_found_by_name(exported, tmp_path, monkeypatch):
    _, _, model = exported
    shutil.copytree(model, tmp_path / "tiny")
    out = cli("model", "list", "--json", env={"STYLEGEN_MODELS": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    listed = {m["name"]: m for m in json.loads(out.stdout)}
    assert listed["tiny"]["path"] == str(tmp_path / "tiny") and listed["tiny"]["default"] is False
    assert listed["tiny"]["size_bytes"] == sum(f.stat().st_size for f in (tmp_path / "tiny").rglob("*") if f.is_file())
    info = cli("model", "info", "tiny", "--json", env={"STYLEGEN_MODELS": str(tmp_path)})
    card = json.loads(info.stdout)
    assert card["classes"] == GENRES and card["training_data"] == {"source": "generated"}
    monkeypatch.setenv("STYLEGEN_MODELS", str(tmp_path))
    assert open_model("tiny").root == tmp_path / "tiny"
    with pytest.raises(StylegenError, match="no stylegen model named 'absent'"):
        open_model("absent")


def test_export_refuses_to_overwrite(exported):
    _, idx, model = exported
    with pytest.raises(StylegenError, match="exists"):
        export_model(idx, model)


def test_an_index_made_with_a_model_gets_its_genres_without_training(exported, tmp_path):
    root, _, model = exported
    mine = tmp_path / "mine"
    mine.mkdir()
    for i in range(6):
        make_image(mine / f"c{i}.png", i % 3, seed=200 + i)
    import stylegen

    stylegen.embed(mine, tmp_path / "idx", workers=0, progress=False, precision="fp32", model=model)
    index = Index.open(tmp_path / "idx")
    assert index.feature_id == open_model(model).feature_id and index.manifest["model"]["name"] == "tiny"
    engine = Engine.open(tmp_path / "idx", model=model)
    result = engine.query(mine / "c1.png", k=3)
    assert result.in_index and result.neighbours[0]["is_query"]
    alone = Engine.open(model=model).query(mine / "c1.png")
    np.testing.assert_allclose(result.proba, alone.proba, atol=1e-5)
    embed_tiny(mine, tmp_path / "other")  # its own compressor: another vector space
    with pytest.raises(IndexMismatchError, match="was not made with model tiny"):
        Engine.open(tmp_path / "other", model=model)


def test_a_model_alone_finds_no_similar_covers_and_says_what_to_run(exported, tmp_path):
    _, _, model = exported
    cover = make_image(tmp_path / "q.png", 0)
    with pytest.raises(IndexNotFoundError, match="stylegen embed"):
        Engine.open(model=model).query(cover, k=3)
    out = cli("similar", str(cover), cwd=tmp_path)
    assert out.returncode != 0 and "stylegen embed" in out.stderr and "Traceback" not in out.stderr


def test_evaluate_never_scores_a_model_on_the_covers_it_was_fitted_on(exported, tmp_path):
    root, _, model = exported
    rows = pd.read_csv(root / "train.csv")
    fitted = rows.head(4).copy()
    fitted["image"] = [str(root / p) for p in fitted["image"]]
    fresh = pd.DataFrame([{"image": str(make_image(tmp_path / f"n{g}.png", g, seed=300 + g)), "genre": GENRES[g]}
                          for g in range(3)])
    pd.concat([fitted[["image", "genre"]], fresh]).to_csv(tmp_path / "test.csv", index=False)
    out = cli("evaluate", "--test", str(tmp_path / "test.csv"), "--model", str(model), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["n_in_training_excluded"] == 4
