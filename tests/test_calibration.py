"""Calibrated confidence: ECE and precision/coverage by hand, a planted temperature recovered,
calibrated heads saved as plain arrays, and `train` recording calibration on a tiny index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from stylegen.evaluation import metrics
from stylegen.heads import EnsembleHead, KNNHead, LinearHead, load_predictor, save_head
from stylegen.heads.calibration import (
    THRESHOLDS,
    CalibratedHead,
    expected_calibration_error,
    fit_temperature,
    grouped_folds,
    min_confidence,
    precision_coverage,
)
from stylegen.heads.compiled import (
    CompiledCalibrated,
    load_compiled,
    save_compiled,
    sigmoid,
    softmax,
    temperature_scale,
)
from stylegen.heads.io import read_head_set
from tests.audiofiles import tag, write_audio
from tests.conftest import embed_tiny, planted_rows

GENRES = ["jazz", "metal", "pop"]


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def blobs(n: int, seed: int, noise: float = 0.9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlapping 16-d classes (so probabilities are not all ~1), labels and 20 groups."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(7).normal(size=(3, 16))
    y = rng.integers(0, 3, n)
    X = means[y] + rng.normal(scale=noise, size=(n, 16))
    return X.astype(np.float32), np.array(GENRES, dtype=object)[y], rng.integers(0, 20, n)


# ---- metrics by hand ---------------------------------------------------------------------
def test_ece_of_a_hand_computed_example():
    proba = np.array([[0.9, 0.1], [0.1, 0.9], [0.7, 0.3], [0.45, 0.55]])
    y = np.array([0, 0, 0, 1])
    # bins of width 1/15: both 0.9 rows (accuracy 1/2), 0.7 (right), 0.55 (right):
    # (2 * |0.5 - 0.9| + |1 - 0.7| + |1 - 0.55|) / 4
    assert expected_calibration_error(proba, y) == pytest.approx(0.3875)
    # one bin: |accuracy - mean confidence| = |3/4 - 3.05/4|
    assert expected_calibration_error(proba, y, n_bins=1) == pytest.approx(0.0125)
    # multi-label: right when the top class is one of the labels (0.85 wrong, 0.95 right)
    multi = np.array([[0.85, 0.6], [0.3, 0.95]])
    assert expected_calibration_error(multi, np.array([[0, 1], [0, 1]])) == pytest.approx((0.85 + 0.05) / 2)
    assert metrics.expected_calibration_error is expected_calibration_error  # re-exported for evaluation


def test_precision_coverage_and_min_confidence_by_hand():
    proba = np.array([[0.95, 0.05], [0.85, 0.15], [0.2, 0.8], [0.65, 0.35], [0.45, 0.55]])
    y = np.array([0, 1, 1, 0, 0])  # right, wrong, right (top exactly 0.8), right, wrong
    table = precision_coverage(proba, y, thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 0.99))
    assert [r["n"] for r in table] == [5, 4, 3, 3, 1, 0]  # >= t: the 0.8 row counts at 0.8
    assert [r["coverage"] for r in table] == pytest.approx([1.0, 0.8, 0.6, 0.6, 0.2, 0.0])
    assert [r["precision"] for r in table[:5]] == pytest.approx([0.6, 0.75, 2 / 3, 2 / 3, 1.0])
    assert table[5]["precision"] is None
    grid = precision_coverage(proba, y, THRESHOLDS)
    assert [r["threshold"] for r in grid] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
    assert min_confidence(grid) == 0.9  # 0.85 keeps 0.95 and 0.85: precision 0.5
    assert [r["n"] for r in grid[:3]] == [5, 5, 4]  # the 0.55 row counts at 0.55
    assert min_confidence(grid, target=0.7) == 0.6 and min_confidence(grid, target=0.6) == 0.5
    assert min_confidence(precision_coverage(proba, 1 - y, THRESHOLDS)) is None
    # multi-label: the top class is one of the labels
    multi = precision_coverage(np.array([[0.9, 0.7], [0.6, 0.2]]), np.array([[1, 0], [0, 1]]), (0.5,))
    assert multi[0]["precision"] == 0.5


# ---- temperature scaling -----------------------------------------------------------------
@pytest.mark.parametrize("multi", [False, True])
def test_temperature_scaling_recovers_a_planted_temperature(multi):
    """Labels drawn from calibrated q; the head reports p ∝ q^3 (over-confident): T = 3."""
    rng = np.random.default_rng(0)
    n = 20000
    if multi:
        q = sigmoid(rng.normal(scale=1.5, size=(n, 4)))
        y = (rng.random((n, 4)) < q).astype(int)
        p = sigmoid(3 * np.log(q / (1 - q)))
    else:
        q = softmax(rng.normal(scale=1.5, size=(n, 5)))
        y = (rng.random(n)[:, None] > np.cumsum(q, axis=1)).sum(1)
        p = q**3 / (q**3).sum(1, keepdims=True)
    T = fit_temperature(p, y, multi)
    assert T == pytest.approx(3.0, abs=0.15)
    fine = (p > 1e-6).all(1) & (p < 1 - 1e-6).all(1)  # (p is clipped to [1e-7, 1 - 1e-7])
    np.testing.assert_allclose(temperature_scale(p[fine], 3.0, multi), q[fine], atol=1e-6)  # undoes the cube
    before, after = expected_calibration_error(p, y), expected_calibration_error(temperature_scale(p, T, multi), y)
    assert before > 0.1 and after < 0.02
    # an under-confident head gets sharpened: T < 1
    soft = temperature_scale(q, 2.0, multi)
    assert fit_temperature(soft, y, multi) == pytest.approx(0.5, abs=0.05)


def test_calibrated_head_folds_are_artist_disjoint_and_scale_the_head():
    X, y, groups = blobs(300, seed=0)
    head = CalibratedHead(LinearHead(), folds=5).fit(X, y, cv_groups=groups)
    cal = head.calibration_
    assert set(cal) >= {"temperature", "ece_before", "ece_after", "folds"} and cal["folds"] == 5
    assert 0.05 <= head.temperature_ <= 20 and head.temperature_ != pytest.approx(1.0, abs=1e-3)
    X_test = blobs(50, seed=1)[0]
    np.testing.assert_allclose(head.predict_proba(X_test),
                               temperature_scale(head.head_.predict_proba(X_test), head.temperature_, False))
    for train, test in grouped_folds(np.unique(y, return_inverse=True)[1], groups, 5, 0):
        assert not set(groups[train]) & set(groups[test])
    assert head.oof_proba_.shape == (300, 3) and len(head.precision_coverage()) == len(THRESHOLDS)
    few = CalibratedHead(KNNHead(k=5), folds=5).fit(X, y, cv_groups=groups % 3)
    assert few.skipped and few.temperature_ == 1.0 and "too few covers" in few.calibration_["skipped"]
    assert few.calibration_["ece_before"] is None and few.precision_coverage() is None


def test_multi_label_heads_calibrate_per_label():
    """An ensemble says it is multi-label only through its parts: still sigmoid scaling."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 16))
    sets = [rng.choice(3, size=rng.integers(1, 3), replace=False) for _ in range(200)]
    X = (np.stack([means[s].sum(0) for s in sets]) + rng.normal(size=(200, 16))).astype(np.float32)
    y = [sorted(np.array(GENRES)[s]) for s in sets]
    groups = rng.integers(0, 20, 200)
    head = CalibratedHead(EnsembleHead(LinearHead(multi_label=True), KNNHead(multi_label=True)), folds=4)
    head.fit(X, y, cv_groups=groups, groups=groups)
    assert not head.skipped and head.calibration_["folds"] == 4 and head.oof_targets_.shape == (200, 3)
    proba = head.predict_proba(X[:20])
    np.testing.assert_allclose(proba, temperature_scale(head.head_.predict_proba(X[:20]), head.temperature_, True))
    assert not np.allclose(proba.sum(1), 1.0)  # per-label sigmoids, not a renormalised row


# ---- saving ------------------------------------------------------------------------------
def test_calibrated_compiled_heads_round_trip_through_plain_npz(tmp_path):
    X, y, _ = blobs(200, seed=0)
    X_test = blobs(40, seed=1)[0]
    for name, est in {"linear": LinearHead(), "knn": KNNHead(k=7),
                      "ensemble": EnsembleHead(LinearHead(), KNNHead(k=7))}.items():
        inner = est.fit(X, y).compile()
        head = CompiledCalibrated(inner, 2.5)
        save_compiled(head, tmp_path / f"{name}.npz")
        with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as z:  # plain arrays only
            assert json.loads(str(z["meta"]))["kind"] == "calibrated"
        back = load_compiled(tmp_path / f"{name}.npz")
        assert isinstance(back, CompiledCalibrated) and back.temperature == 2.5 and back.inner.kind == inner.kind
        assert list(back.classes_) == GENRES and back.mode == "image" and back.n_features_in_ == 16
        want = head.predict_proba(X_test)
        np.testing.assert_allclose(back.predict_proba(X_test), want, rtol=0, atol=1e-12, err_msg=name)
        assert not np.allclose(want, inner.predict_proba(X_test), atol=1e-3), name  # T is applied
        if name != "linear":  # explanations find the kNN part to list its voters
            assert back.knn_ is (back.inner if name == "knn" else back.inner.knn_)
            assert back.knn_.temperature == 0.1  # the vote's temperature, not the calibration's
    with pytest.raises(AttributeError):  # a head without a kNN part
        _ = CompiledCalibrated(LinearHead().fit(X, y).compile(), 2.0).knn_
    # the path `train` takes: the fitted wrapper through save_head / load_predictor
    groups = np.arange(len(X)) % 10
    fitted = CalibratedHead(LinearHead(), folds=3).fit(X, y, cv_groups=groups)
    save_head(fitted, tmp_path / "wrapped.npz", feature_id="f")
    loaded = load_predictor(tmp_path / "wrapped.npz", expect_feature_id="f")
    assert loaded.temperature == pytest.approx(fitted.temperature_)
    np.testing.assert_allclose(loaded.predict_proba(X_test), fitted.predict_proba(X_test), atol=1e-12)


# ---- train on a tiny index ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """3 genres x 10 generated covers by 5 artists each, heads trained (and calibrated)."""
    from stylegen.heads.train import train

    root = tmp_path_factory.mktemp("calibrated")
    pd.DataFrame(planted_rows(root, GENRES, 10, lambda g, i: {"artist": f"{GENRES[g]}-artist{i % 5}"})
                 ).to_csv(root / "train.csv", index=False)
    embed_tiny(root / "train.csv", root / "idx")
    train(root / "idx", heads=("linear", "knn", "ensemble"))
    return root, root / "idx"


def cli(*args: str):
    from typer.testing import CliRunner

    from stylegen.apps.cli import app

    r = CliRunner().invoke(app, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def test_train_records_calibration_and_queries_are_calibrated(trained):
    from stylegen.query.engine import Engine

    _, idx = trained
    cfg = read_head_set(idx)
    assert set(cfg["calibration"]) == {"linear", "knn", "ensemble"}
    for name, cal in cfg["calibration"].items():
        assert "skipped" not in cal and cal["folds"] == 1 and 0 < cal["held_out_covers"] < 30, name
        assert 0.05 <= cal["temperature"] <= 20 and 0 <= cal["ece_after"] <= 1 and 0 <= cal["ece_before"] <= 1
    table = cfg["precision_coverage"]
    assert [r["threshold"] for r in table] == list(THRESHOLDS)
    assert cfg["min_confidence"] == min_confidence(table)
    used = {"head": cfg["default_head"]}.get(cfg["default_method"], cfg["default_method"])
    assert cfg["min_confidence"] == cfg["calibration"][used]["min_confidence"]
    engine = Engine.open(idx)
    head = engine.head("linear")
    assert isinstance(head, CompiledCalibrated)
    assert head.temperature == pytest.approx(cfg["calibration"]["linear"]["temperature"], abs=1e-4)
    vectors = np.asarray(engine.index.vectors[:3])
    proba, _, _ = engine.predict_proba(vectors, "head")
    np.testing.assert_allclose(proba, temperature_scale(head.inner.predict_proba(vectors), head.temperature, False))
    voters = engine.query(0, explain=True).explanation["voters"]  # the calibrated kNN head still explains
    assert voters and all(v["id"] != 0 for v in voters)


def test_calibration_is_skipped_with_too_few_artists_and_can_be_turned_off(trained, tmp_path):
    from stylegen.heads.train import train

    _, idx = trained
    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    cfg = train(copy, heads=("linear",), validate=False, calibrate=True, calibration_folds=20)  # 15 artists
    cal = cfg["calibration"]["linear"]
    assert cal["temperature"] == 1.0 and "15 artist groups" in cal["skipped"]
    assert cfg["min_confidence"] is None and cfg["precision_coverage"] is None
    assert load_compiled(Path(read_head_set(copy)["dir"]) / "linear.npz").kind == "linear"  # T = 1: unwrapped
    r = cli("train", "--index", str(copy), "--head", "linear", "--no-calibrate")
    assert r.exit_code == 0, r.output
    assert read_head_set(copy)["calibration"] is None and "calibration" not in r.output
    r = cli("train", "--index", str(copy), "--head", "knn", "--calibration-folds", "3")
    assert r.exit_code == 0, r.output
    cal = read_head_set(copy)["calibration"]["knn"]
    assert cal["folds"] == 3
    assert f"expected calibration error {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}" in r.output


def test_library_tag_defaults_to_the_recorded_threshold(trained, tmp_path):
    root, idx = trained
    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    cfg_path = Path(read_head_set(copy)["dir"]) / "heads.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["default_method"] == "ensemble"
    # planted thresholds, one per method's head: no probability reaches 1.5
    cfg["calibration"]["ensemble"]["min_confidence"], cfg["calibration"]["knn"]["min_confidence"] = 0.0, 1.5
    cfg_path.write_text(json.dumps(cfg))
    album = tmp_path / "music" / "album"
    track = write_audio(album / "01 track.flac")
    tag(track, artist="A", album="B", albumartist="A", title="t", track=1)
    shutil.copy(root / "img" / "metal3.png", album / "cover.png")
    music = str(album.parent)
    r = cli("library", "tag", music, "--index", str(copy), "--no-progress")
    assert r.exit_code == 0, r.output
    assert "min confidence 0.00 (recorded by `stylegen train` for ensemble" in r.output
    assert "1 files would be tagged" in r.output
    r = cli("library", "tag", music, "--index", str(copy), "--no-progress", "--method", "knn")
    assert "min confidence 1.50 (recorded by `stylegen train` for knn" in r.output
    assert "below 1.50" in r.output and "0 files would be tagged" in r.output
    r = cli("library", "tag", music, "--index", str(copy), "--no-progress", "--method", "knn", "--min-confidence", "0.2")
    assert "min confidence 0.20 (--min-confidence)" in r.output and "1 files would be tagged" in r.output
    cfg["calibration"] = None  # a head set trained without calibration: 0
    cfg_path.write_text(json.dumps(cfg))
    r = cli("library", "tag", music, "--index", str(copy), "--no-progress", "--method", "knn")
    assert "min confidence 0.00 (none recorded by `stylegen train`)" in r.output
