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
from stylegen.heads import KNNHead
from stylegen.heads.compiled import temperature_scale
from stylegen.heads.io import read_head_set
from stylegen.heads.train import default_method, train
from stylegen.query.engine import Engine
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
    return subprocess.run([sys.executable, "-m", "stylegen", *args], capture_output=True, text=True, timeout=300, check=False)


def test_heads_recorded_with_feature_id(trained):
    _, idx = trained
    cfg = read_head_set(idx)
    assert cfg["classes"] == GENRES and cfg["heads"] == ["linear", "knn", "ensemble"]
    assert sorted(p.name for p in Path(cfg["dir"]).iterdir()) == ["ensemble.json", "ensemble.npz", "heads.json", "knn.json", "knn.npz",
                                                     "linear.json", "linear.npz"]
    assert cfg["feature_id"] == stylegen.Index.open(idx).feature_id
    assert len(cfg["train_rows"]) == 24


def test_engine_classifies_unseen_cover_of_planted_genre(trained):
    root, idx = trained
    engine = Engine.open(idx)
    result = engine.query(root / "img" / "metal9.png", top=3)
    assert result.genres[0]["genre"] == "metal" and not result.in_index
    probs = [g["probability"] for g in result.genres]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)
    assert result.levels["top"][0]["genre"] == "metal"


def test_similar_marks_the_query_and_ranks_by_similarity(trained):
    _, idx = trained
    engine = Engine.open(idx)
    hits = engine.query(0, k=5, by="style", classify=False).neighbours
    assert len(hits) == 5 and hits[0]["id"] == 0 and hits[0]["is_query"] and not any(h["is_query"] for h in hits[1:])
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)


def test_classify_json_schema(trained):
    root, idx = trained
    r = cli("classify", str(root / "img" / "jazz9.png"), str(root / "img" / "pop0.png"),
            "--index", str(idx), "--json", "--top", "2")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["results"]) == 2 and data["skipped"] == []
    first, second = data["results"]
    assert first["in_index"] is False and second["in_index"] is True and second["id"] == 16
    engine = Engine.open(idx)
    for res, path in zip(data["results"], ("jazz9.png", "pop0.png")):
        assert set(res) >= {"image", "in_index", "id", "method", "genres", "levels"}
        assert res["method"] == "ensemble" and len(res["genres"]) == 2
        lib = engine.query(root / "img" / path)  # the library's answer for the same file
        best = np.argsort(-lib.proba)[:2]
        assert [g["genre"] for g in res["genres"]] == [lib.classes[i] for i in best]
        for g, i in zip(res["genres"], best):
            assert g["probability"] == pytest.approx(lib.proba[i], abs=1e-6) and g["path"][-1] == g["genre"]


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
    # the same numbers as classifying each test cover through the library
    test = pd.read_csv(root / "test.csv")
    engine = Engine.open(idx)
    top1 = [engine.query(root / p).genres[0]["genre"] for p in test["image"]]
    assert data["accuracy"] == pytest.approx(np.mean(np.array(top1) == test["genre"].to_numpy()))
    assert set(data["by_source"]) == {"gen", "other"}


def test_evaluate_cv_compares_chosen_heads_and_parts(trained):
    _, idx = trained
    r = cli("evaluate", "--index", str(idx), "--cv", "3", "--heads", "knn,linear", "--parts", "style", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"knn / style", "linear / style"}
    assert all(v["n"] == 24 for v in data.values())
    assert data["knn / style"]["accuracy"] >= 0.9  # planted genres: a label mix-up would score ~1/3
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


def test_heads_survive_an_add_and_are_refused_after_a_refit(trained, tmp_path):
    root, idx = trained
    import shutil

    from stylegen.index.ingest import build

    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    make_image(root / "img" / "extra.png", kind=0, seed=999)
    extra = root / "extra.csv"
    pd.DataFrame({"image": ["img/extra.png"], "genre": ["jazz"]}).to_csv(extra, index=False)
    stylegen.embed(extra, copy, workers=0, progress=False, precision="fp32")
    # appended with the frozen compressor: the heads still load and give an old cover the very
    # answer they gave before the add, and the new cover (a jazz look) its planted genre
    grown, before = Engine.open(copy), Engine.open(idx).query(0)
    after = grown.query(0)
    assert after.genres[0]["genre"] == "jazz"
    np.testing.assert_allclose(after.proba, before.proba, atol=1e-6)
    new = grown.query(root / "img" / "extra.png")
    assert new.in_index and new.row == 24 and new.genres[0]["genre"] == "jazz"
    build(copy, refit=True)
    with pytest.raises(stylegen.errors.IndexMismatchError, match="train"):
        Engine.open(copy).query(0)


def test_knn_vote_of_an_indexed_cover_leaves_it_out(trained):
    _, idx = trained
    engine = Engine.open(idx)
    head = engine.head("knn")  # calibrated: the kNN vote, then its temperature
    knn = head.knn_
    result = engine.query(0, method="knn")
    # the vote of the 23 other fitted covers, computed from the head's own neighbour list
    _, ids = knn.kneighbors(result.vector[None], exclude=np.array([-1]))
    keep = ids[0] != 0
    others = KNNHead(k=knn.k, temperature=knn.temperature).fit(
        np.asarray(engine.index.vectors)[1:24], np.asarray(knn.classes_)[knn.targets_[1:]])
    want = temperature_scale(others.predict_proba(result.vector[None]), head.temperature, False)[0]
    np.testing.assert_allclose(result.proba, want, atol=1e-6)
    assert keep.sum() == 23 and not np.allclose(others.predict_proba(result.vector[None]), knn.predict_proba(result.vector[None]))


def test_hierarchical_paths_and_levels_roll_up_through_a_taxonomy(trained, tmp_path):
    root, idx = trained
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    tax = tmp_path / "tax.yaml"
    tax.write_text("instrumental:\n  - jazz\nloud:\n  - metal\n  - pop\n")
    with threadpool_limits(1):
        train(copy, heads=("linear",), taxonomy=tax, validate=False)
    out = Engine.open(copy).query(root / "img" / "metal9.png", top=3).to_dict()
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
    # the same AUROC as scoring the library's probabilities of each test cover
    from sklearn.metrics import roc_auc_score

    test = pd.read_csv(root / "test.csv")
    engine = Engine.open(copy)
    results = [engine.query(root / p) for p in test["image"]]
    truth = np.array([[c == g for c in results[0].classes] for g in test["genre"]], dtype=int)
    assert data["macro_auroc"] == pytest.approx(roc_auc_score(truth, np.stack([r.proba for r in results])))


def test_multi_label_probabilities_roll_up_to_a_parent_by_noisy_or(trained, tmp_path):
    """README: for multi-label (sigmoid) heads a parent gets ``1 - prod(1 - p_child)`` of its
    descendants, which stays in [0, 1] and is never below its most probable child."""
    root, idx = trained
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    tax = tmp_path / "tax.json"  # metal and pop reach the top level "loud" through "rock"
    tax.write_text(json.dumps({"loud": ["rock"], "rock": ["metal", "pop"], "instrumental": ["jazz"]}))
    with threadpool_limits(1):
        train(copy, heads=("linear",), labels="multi", taxonomy=tax, validate=False)
    engine = Engine.open(copy)
    results = [engine.query(root / "img" / name, top=3) for name in ("metal9.png", "pop9.png", "jazz9.png")]
    gaps = []
    for r in results:
        p = dict(zip(r.classes, r.proba, strict=True))
        top = {g["genre"]: g["probability"] for g in r.levels["top"]}
        assert set(top) == {"loud", "instrumental"}
        noisy_or = 1 - (1 - p["metal"]) * (1 - p["pop"])
        assert top["loud"] == pytest.approx(noisy_or, abs=2e-6)
        assert top["loud"] >= max(p["metal"], p["pop"]) - 1e-6 and top["loud"] <= 1.0
        assert top["instrumental"] == pytest.approx(p["jazz"], abs=2e-6)  # a lone child: itself
        assert {g["genre"]: g["path"] for g in r.genres}["metal"] == ["loud", "rock", "metal"]
        gaps.append(p["metal"] + p["pop"] - noisy_or)
    assert max(gaps) > 1e-3  # somewhere the sum of the children differs from their noisy-OR


@pytest.mark.parametrize("heads, scores, default_head, expected", [
    # the head's score is the default head's own, not the best trainable one's
    (["linear", "mlp", "knn", "ensemble"], {"linear": 0.38, "mlp": 0.41, "knn": 0.33, "ensemble": 0.40}, "mlp", "head"),
    (["linear", "mlp", "knn", "ensemble"], {"linear": 0.38, "mlp": 0.41, "knn": 0.33, "ensemble": 0.40}, "linear",
     "ensemble"),
    (["linear", "knn", "ensemble"], {"linear": 0.4, "knn": 0.4, "ensemble": 0.4}, "linear", "ensemble"),  # tie
    (["linear", "knn"], {"linear": 0.3, "knn": 0.3}, "linear", "head"),  # tie without the ensemble
    (["linear", "knn"], {"linear": 0.2, "knn": 0.3}, "linear", "knn"),
    (["linear", "knn", "ensemble"], {"linear": 0.9, "knn": None, "ensemble": None}, "linear", "head"),  # unscored
    (["linear", "knn", "ensemble"], {"linear": None, "knn": None, "ensemble": None}, "linear", "ensemble"),
    (["linear", "knn"], {}, "linear", "head"),
    (["knn"], {}, "knn", "knn"),  # a kNN-only set has no trainable "head"
])
def test_default_method_is_the_best_validated(heads, scores, default_head, expected):
    assert default_method(heads, scores, default_head) == expected


@pytest.mark.parametrize("planted, head, method", [
    ({"LinearHead": 0.5, "KNNHead": 0.9, "EnsembleHead": 0.6}, "linear", "knn"),
    ({"LinearHead": 0.95, "KNNHead": 0.9, "EnsembleHead": 0.6}, "linear", "head"),
])
def test_train_records_and_queries_use_the_best_validated_method(trained, tmp_path, monkeypatch,
                                                                 planted, head, method):
    """With planted validation scores the default is known: heads.json records the scores and
    the method, and a query without ``method`` is answered by it."""
    import shutil

    from stylegen.heads import train as train_module

    copy = tmp_path / "idx"
    shutil.copytree(trained[1], copy)
    # with calibration (the default) the held-out split's predictions give the score
    monkeypatch.setattr(train_module, "_held_out_score", lambda cal, y: planted[type(cal.head).__name__])
    with threadpool_limits(1):
        train(copy, heads=("linear", "knn", "ensemble"))
    cfg = read_head_set(copy)
    assert cfg["validation_macro_f1"] == {"linear": planted["LinearHead"], "knn": planted["KNNHead"],
                                          "ensemble": planted["EnsembleHead"]}
    assert (cfg["default_head"], cfg["default_method"]) == (head, method)
    assert Engine.open(copy).query(3).method == method
