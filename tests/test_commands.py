"""train / classify / similar / evaluate end to end on a tiny generated collection."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

import stylegen
from stylegen.engine import Engine
from stylegen.train import default_method, train
from tests.conftest import embed_tiny, make_image, planted_rows

GENRES = ["jazz", "metal", "pop"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """An index of 3 genres x 8 generated covers with trained heads, plus a test CSV."""
    root = tmp_path_factory.mktemp("collection")
    df = pd.DataFrame(planted_rows(root, GENRES, 10, lambda g, i: {
        "artist": f"{GENRES[g]}-artist{i % 5}", "source": "gen" if i % 2 else "other"}))
    df[df.index % 10 < 8].to_csv(root / "train.csv", index=False)
    df[df.index % 10 >= 8].to_csv(root / "test.csv", index=False)
    embed_tiny(root / "train.csv", root / "idx")
    with threadpool_limits(1):
        train(root / "idx", heads=("linear", "knn", "ensemble"))
    return root, root / "idx"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylegen.cli", *args], capture_output=True, text=True, timeout=300, check=False)


def test_heads_recorded_with_feature_id(trained):
    _, idx = trained
    cfg = json.loads((idx / "heads" / "heads.json").read_text())
    assert cfg["classes"] == GENRES
    assert cfg["default_method"] == default_method(cfg["heads"], cfg["validation_macro_f1"], cfg["default_head"])
    assert cfg["feature_id"] == stylegen.Index.open(idx).feature_id
    assert len(cfg["train_rows"]) == 24


def test_engine_classifies_unseen_cover_of_planted_genre(trained):
    root, idx = trained
    engine = Engine.open(idx)
    from PIL import Image

    result = engine.classify(Image.open(root / "img" / "metal9.png"), top=3)
    assert result["genres"][0]["genre"] == "metal"
    probs = [g["probability"] for g in result["genres"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)
    assert result["levels"]["top"][0]["genre"] == "metal"


def test_similar_marks_the_query_and_ranks_by_similarity(trained):
    _, idx = trained
    engine = Engine.open(idx)
    hits = engine.similar_id(0, k=5, by="style")
    assert hits[0]["id"] == 0 and hits[0]["is_query"] and not any(h["is_query"] for h in hits[1:])
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)


def test_classify_json_schema(trained):
    root, idx = trained
    r = cli("classify", str(root / "img" / "jazz9.png"), str(root / "img" / "pop0.png"),
            "--index", str(idx), "--json", "--top", "2")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["method"] == "ensemble" and len(data["results"]) == 2
    first, second = data["results"]
    assert first["in_index"] is False and second["in_index"] is True
    for res in data["results"]:
        assert set(res) >= {"image", "in_index", "genres", "levels"}
        assert len(res["genres"]) == 2
        for g in res["genres"]:
            assert set(g) == {"genre", "probability", "path"} and 0 <= g["probability"] <= 1
            assert g["path"][-1] == g["genre"]


def test_classify_bad_image_path_is_one_line_error(trained, tmp_path):
    _, idx = trained
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    for path in (tmp_path / "missing.jpg", tmp_path / "bad.jpg"):
        r = cli("classify", str(path), "--index", str(idx))
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and str(path.name) in r.stderr


def test_evaluate_json_on_held_out_manifest(trained):
    root, idx = trained
    r = cli("evaluate", "--index", str(idx), "--test", str(root / "test.csv"), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["n"] == 6 and data["n_in_training_excluded"] == 0
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy"):
        assert 0.0 <= data[key] <= 1.0
    assert data["accuracy"] > 0.5  # planted structure, chance is 1/3
    assert set(data["by_source"]) == {"gen", "other"}


def test_evaluate_cv_compares_chosen_heads_and_parts(trained):
    _, idx = trained
    r = cli("evaluate", "--index", str(idx), "--cv", "3", "--heads", "knn,linear", "--parts", "style", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"knn / style", "linear / style"}
    assert all(v["n"] == 24 and 0 <= v["accuracy"] <= 1 for v in data.values())
    bad = cli("evaluate", "--index", str(idx), "--cv", "3", "--heads", "svm")
    assert bad.returncode != 0 and "--heads" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_evaluate_leaves_out_training_covers(trained):
    root, idx = trained
    r = cli("evaluate", "--index", str(idx), "--test", str(root / "train.csv"), "--json")
    assert r.returncode != 0 and "used to train" in r.stderr


def test_similar_html_is_self_contained(trained, tmp_path):
    root, idx = trained
    out = tmp_path / "sheet.html"
    r = cli("similar", str(root / "img" / "pop9.png"), "--index", str(idx), "-k", "4", "--html", str(out))
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert page.count("data:image/jpeg;base64,") == 5 and "http" not in page
    assert len(r.stdout.strip().splitlines()) == 5  # 4 neighbours + the contact sheet line


def test_stale_heads_are_refused_after_the_index_changes(trained, tmp_path):
    root, idx = trained
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    make_image(root / "img" / "extra.png", kind=0, seed=999)
    extra = root / "extra.csv"
    pd.DataFrame({"image": ["img/extra.png"], "genre": ["jazz"]}).to_csv(extra, index=False)
    stylegen.embed(extra, copy, workers=0, progress=False, precision="fp32")
    with pytest.raises(stylegen.errors.IndexMismatchError, match="train"):
        Engine.open(copy).classify_id(0)


def test_knn_vote_excludes_the_query_row(trained):
    _, idx = trained
    engine = Engine.open(idx)
    v = np.asarray(engine.index.vectors[:1])
    knn = engine.head("knn")
    sims, ids = knn.kneighbors(v, exclude=engine._exclude(None, 1))
    assert ids[0, 0] == 0 and sims[0, 0] == pytest.approx(1.0, abs=1e-4)  # itself, when not excluded
    sims, ids = knn.kneighbors(v, exclude=engine._exclude([0], 1))
    assert 0 not in ids[0] and sims[0, 0] < 0.9999


def test_hierarchical_paths_and_levels_roll_up_through_a_taxonomy(trained, tmp_path):
    root, idx = trained
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    tax = tmp_path / "tax.yaml"
    tax.write_text("instrumental:\n  - jazz\nloud:\n  - metal\n  - pop\n")
    with threadpool_limits(1):
        train(copy, heads=("linear",), taxonomy=tax, validate=False)
    from PIL import Image

    out = Engine.open(copy).classify(Image.open(root / "img" / "metal9.png"), top=3)
    paths = {g["genre"]: g["path"] for g in out["genres"]}
    assert paths == {"jazz": ["instrumental", "jazz"], "metal": ["loud", "metal"], "pop": ["loud", "pop"]}
    probs = {g["genre"]: g["probability"] for g in out["genres"]}
    levels = {g["genre"]: g["probability"] for g in out["levels"]["top"]}
    assert levels["loud"] == pytest.approx(probs["metal"] + probs["pop"], abs=2e-4)
    assert levels["instrumental"] == pytest.approx(probs["jazz"], abs=2e-4)


def test_multi_label_heads_report_auroc(trained, tmp_path):
    root, idx = trained
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    with threadpool_limits(1):
        cfg = train(copy, heads=("linear", "knn"), labels="multi", validate=False)
    assert cfg["labels"] == "multi" and cfg["default_method"] == "head"
    r = cli("evaluate", "--index", str(copy), "--test", str(root / "test.csv"), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert 0.5 < data["macro_auroc"] <= 1.0 and "macro_auprc" in data


@pytest.mark.parametrize("heads, scores, expected", [
    (["linear", "mlp", "knn", "ensemble"], {"linear": 0.38, "mlp": 0.41, "knn": 0.33, "ensemble": 0.40}, "head"),
    (["linear", "knn", "ensemble"], {"linear": 0.38, "knn": 0.33, "ensemble": 0.40}, "ensemble"),
    (["linear", "knn", "ensemble"], {"linear": 0.4, "knn": 0.4, "ensemble": 0.4}, "ensemble"),  # tie
    (["linear", "knn"], {"linear": 0.2, "knn": 0.3}, "knn"),
    (["linear", "knn", "ensemble"], {"linear": None, "knn": None, "ensemble": None}, "ensemble"),
    (["knn"], {}, "knn"),
])
def test_default_method_is_the_best_validated(heads, scores, expected):
    trainable = [h for h in ("linear", "mlp") if h in heads]
    best_head = max(trainable, key=lambda h: scores.get(h) or 0) if trainable else heads[0]
    assert default_method(heads, scores, best_head) == expected
