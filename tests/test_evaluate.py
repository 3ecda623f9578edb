"""Tests for stylegen.evaluation.metrics: metrics against hand numbers and scikit-learn, CV, reports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from stylegen.errors import DataError
from stylegen.evaluation.metrics import (
    compare_table,
    cross_val_predict_proba,
    grouped_metrics,
    multi_label_metrics,
    plot_confusion,
    single_label_metrics,
    to_markdown,
    write_confusion_csv,
    write_report,
)

CLASSES = ["jazz", "metal", "pop"]
# 6 samples; the arg-max predictions are jazz, jazz, metal, pop, pop, metal.
Y6 = ["jazz", "jazz", "metal", "metal", "pop", "pop"]
P6 = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.5, 0.4, 0.1],
        [0.1, 0.8, 0.1],
        [0.3, 0.1, 0.6],
        [0.2, 0.1, 0.7],
        [0.2, 0.5, 0.3],
    ]
)


def test_single_label_hand_example():
    m = single_label_metrics(Y6, P6, CLASSES)
    assert m["n"] == 6 and m["classes"] == CLASSES
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls: jazz 2/2, metal 1/2, pop 1/2
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # precisions: jazz 2/2, metal 1/2, pop 1/2 -> F1 1, 1/2, 1/2
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(Y6, ["jazz", "jazz", "metal", "pop", "pop",
                                                       "metal"], average="macro"))
    assert m["confusion"] == [[2, 0, 0], [0, 1, 1], [0, 1, 1]]
    per = {d["genre"]: d for d in m["per_class"]}
    assert per["metal"]["precision"] == pytest.approx(0.5)
    assert per["jazz"]["recall"] == pytest.approx(1.0)
    assert [d["support"] for d in m["per_class"]] == [2, 2, 2]
    # 3 classes: top-3 is trivially perfect
    assert m["top3_accuracy"] == pytest.approx(1.0)


def test_top3_hand_example():
    classes = ["a", "b", "c", "d"]
    proba = np.array(
        [
            [0.4, 0.3, 0.2, 0.1],  # true d: rank 4 -> miss
            [0.1, 0.2, 0.3, 0.4],  # true b: rank 3 -> hit
            [0.1, 0.2, 0.3, 0.4],  # true a: rank 4 -> miss
            [0.25, 0.35, 0.3, 0.1],  # true c: rank 2 -> hit
        ]
    )
    m = single_label_metrics(["d", "b", "a", "c"], proba, classes)
    assert m["top3_accuracy"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(0.0)
    rev = single_label_metrics(["d", "b", "a", "c"], proba[:, ::-1], classes[::-1])
    assert rev["top3_accuracy"] == pytest.approx(0.5)  # class order need not be sorted


def test_two_classes_top3_and_unknown_label():
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = single_label_metrics(["x", "y", "zzz", "x"], proba, ["x", "y"])
    assert m["n"] == 4 and m["n_unknown"] == 1
    assert m["accuracy"] == pytest.approx(2 / 4)  # unknown row counts as an error
    assert m["top3_accuracy"] == pytest.approx(3 / 4)  # only the unknown row misses
    assert np.sum(m["confusion"]) == 3  # the unknown row has no confusion row


def test_unknown_label_with_top_k():
    proba = np.tile([0.5, 0.3, 0.15, 0.05], (2, 1))
    m = single_label_metrics(["a", "nope"], proba, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["top3_accuracy"] == pytest.approx(0.5)


def test_shape_mismatch_is_data_error():
    with pytest.raises(DataError, match="shape"):
        single_label_metrics(Y6, P6[:, :2], CLASSES)


def test_multi_label_matches_sklearn():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    Y = (rng.random((40, 4)) < 0.4).astype(int)
    Y[:, 3] = 0  # a class with no positives is skipped
    proba = np.clip(Y * 0.5 + rng.random((40, 4)) * 0.6, 0, 1)
    lists = [[c for c, v in zip(classes, row) if v] for row in Y]
    m = multi_label_metrics(lists, proba, classes)
    ok = slice(0, 3)
    assert m["macro_auroc"] == pytest.approx(roc_auc_score(Y[:, ok], proba[:, ok]))
    assert m["micro_auroc"] == pytest.approx(
        roc_auc_score(Y[:, ok], proba[:, ok], average="micro"))
    assert m["macro_auprc"] == pytest.approx(average_precision_score(Y[:, ok], proba[:, ok]))
    assert m["per_class"][0]["auroc"] == pytest.approx(roc_auc_score(Y[:, 0], proba[:, 0]))
    assert m["per_class"][3]["auroc"] is None and m["n_scored_classes"] == 3
    # macro-F1 at threshold 0.5 over the classes that occur in the truth or the predictions
    # (class d has no positives; it counts only where some probability reaches 0.5)
    used = (Y.sum(0) > 0) | ((proba >= 0.5).sum(0) > 0)
    assert m["macro_f1"] == pytest.approx(f1_score(Y[:, used], (proba[:, used] >= 0.5).astype(int),
                                                   average="macro", zero_division=0))


def test_grouped_metrics_splits_by_source():
    g = ["a", "a", "b", "b", "b", None]
    out = grouped_metrics(Y6, P6, CLASSES, g)
    assert sorted(out) == ["(missing)", "a", "b"]
    assert out["a"]["accuracy"] == pytest.approx(1.0)
    assert out["b"]["n"] == 3 and out["b"]["accuracy"] == pytest.approx(2 / 3)


def _planted(n=120, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.array([f"g{i % k}" for i in range(n)])
    centers = rng.normal(0, 3, (k, 8))
    X = centers[[int(s[1]) for s in y]] + rng.normal(0, 1, (n, 8))
    artists = np.array([f"artist{i // 4}" for i in range(n)], dtype=object)
    return X, y, artists


class Spy:
    """Records the rows it is trained and queried on (through an `ids` extra array)."""

    log: list

    def __init__(self, log):
        self.log = log

    def fit(self, X, y, ids=None):
        self.classes_ = np.unique(y)
        self.train_ids_ = set(ids.tolist())
        return self

    def predict_proba(self, X, ids=None):
        self.log.append((self.train_ids_, set(ids.tolist())))
        return np.full((len(X), len(self.classes_)), 1.0 / len(self.classes_))


def test_cv_group_disjoint_and_complete():
    X, y, artists = _planted()
    artists[::7] = None  # missing artist -> own group
    log: list = []
    oof, classes = cross_val_predict_proba(lambda: Spy(log), X, y, groups=artists, n_splits=4,
                                           extra={"ids": np.arange(len(y))})
    assert classes == ["g0", "g1", "g2"]
    assert len(log) == 4
    tested = set()
    for train, test in log:
        assert not train & test
        assert not {artists[i] for i in train} & {artists[i] for i in test} - {None}
        tested |= test
    assert tested == set(range(len(y)))
    assert np.allclose(oof.sum(axis=1), 1.0)


def test_cv_planted_above_chance_and_kwargs_fns():
    X, y, artists = _planted(seed=1)
    seen = []
    oof, classes = cross_val_predict_proba(
        lambda: LogisticRegression(max_iter=500), X, y, groups=artists, n_splits=3,
        fit_kwargs_fn=lambda idx: {"sample_weight": np.ones(len(idx))},
        predict_kwargs_fn=lambda idx: seen.append(len(idx)) or {},
    )
    assert sum(seen) == len(y)
    m = single_label_metrics(y, oof, classes)
    assert m["accuracy"] > 0.8  # chance is 1/3


def test_cv_unseen_class_gets_zero():
    class Drop:
        def fit(self, X, y):
            self.classes_ = np.array(sorted(set(y) - {"g2"}))
            return self

        def predict_proba(self, X):
            return np.full((len(X), len(self.classes_)), 0.5)

    X, y, _ = _planted(n=30)
    oof, classes = cross_val_predict_proba(Drop, X, y, n_splits=3)
    assert np.all(oof[:, classes.index("g2")] == 0) and np.allclose(oof[:, 0], 0.5)


def test_cv_too_few_groups():
    X, y, _ = _planted(n=30)
    with pytest.raises(DataError, match="groups"):
        cross_val_predict_proba(LogisticRegression, X, y, groups=["a"] * 30, n_splits=3)


def test_compare_table_and_markdown():
    m = single_label_metrics(Y6, P6, CLASSES)
    m["by_source"] = grouped_metrics(Y6, P6, CLASSES, ["a", "a", "b", "b", "b", "b"])
    df = compare_table({"gram": m, "pooled": {**m, "accuracy": 0.5}})
    assert list(df.index) == ["gram", "pooled"]
    assert df.loc["pooled", "accuracy"] == 0.5
    assert df.loc["gram", "accuracy[a]"] == pytest.approx(1.0)
    for key in ("macro_f1", "top3_accuracy"):  # every source gets its F1 and top-3 too
        assert df.loc["gram", f"{key}[b]"] == pytest.approx(m["by_source"]["b"][key])
    md = to_markdown(df)
    assert md.splitlines()[0].startswith("| method | n | accuracy")
    assert "| pooled | 6 | 0.500 |" in md


def test_write_report(tmp_path):
    m = single_label_metrics(Y6, P6, CLASSES)
    m["by_source"] = grouped_metrics(Y6, P6, CLASSES, ["a", "a", "b", "b", "b", "b"])
    m["multi_label"] = multi_label_metrics([[y] for y in Y6], P6, CLASSES)
    path = write_report(m, tmp_path / "out", "Gram head", {"Ablation": pd.DataFrame({"x": [1]})})
    text = path.read_text()
    assert path.name == "report.md" and text.startswith("# Gram head")
    for part in ("## Per genre", "## Per source", "confusion.png", "## Multi-label", "## Ablation"):
        assert part in text
    with Image.open(tmp_path / "out" / "confusion.png") as im:
        im.verify()
        assert im.format == "PNG"
    csv = pd.read_csv(tmp_path / "out" / "confusion.csv", index_col=0)
    assert csv.to_numpy().tolist() == m["confusion"] and list(csv.columns) == CLASSES
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_plot_confusion_counts_and_bad_shape(tmp_path):
    p = plot_confusion([[3, 1], [0, 2]], ["a", "b"], tmp_path / "c.png", normalize=False)
    with Image.open(p) as im:
        assert im.size[0] > 100
    with pytest.raises(DataError):
        plot_confusion([[1, 2]], ["a", "b"], tmp_path / "d.png")
    assert write_confusion_csv([[1]], ["a"], tmp_path / "c.csv").read_text().count("\n") == 2
