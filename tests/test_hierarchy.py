"""Hierarchical multi-label head: label closure, parent >= child, compiled form, rare styles
borrowing from their genre, and the per-level metrics on hand-worked examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from stylegen.errors import DataError
from stylegen.evaluation.metrics import (
    best_threshold,
    hierarchy_metrics,
    label_matrix,
    level_metrics,
    parent_child_gap,
)
from stylegen.heads.compiled import CompiledHierarchy, load_compiled, save_compiled
from stylegen.heads.hierarchy import HierarchyHead, node_depths
from stylegen.sources.labels import Taxonomy, column_labels, label_closure, label_parent

GENRES = {"a": ["a---x", "a---y"], "b": ["b---z", "b---w"], "c": ["c---v"]}
DIM = 16


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def planted(n: int, seed: int, rare: int = 0) -> tuple[np.ndarray, list[list[str]]]:
    """Vectors = genre mean + style offset + noise; a row carries one style (or, one row in
    five, only its genre); ``rare`` extra rows of genre ``a`` carry style ``a---rare``."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(7).normal(size=(len(GENRES), DIM))
    offsets = {s: np.random.default_rng(11 + i).normal(size=DIM)
               for i, s in enumerate(s for styles in GENRES.values() for s in styles)}
    names = list(GENRES)
    X, y = [], []
    for i in range(n + rare):
        g = 0 if i >= n else int(rng.integers(len(names)))
        style = "a---rare" if i >= n else str(rng.choice(GENRES[names[g]]))
        vec = means[g] + (0.0 if i >= n else 0.8 * offsets[style]) + rng.normal(scale=0.8, size=DIM)
        X.append(vec)
        y.append([names[g]] if (i < n and rng.random() < 0.2) else [style])
    return np.asarray(X, np.float32), y


def columns(head: HierarchyHead, *names: str) -> list[int]:
    classes = [str(c) for c in head.classes_]
    return [classes.index(n) for n in names]


# ---- labels ---------------------------------------------------------------------------
def test_closure_adds_genres_in_taxonomy_spelling():
    tax = Taxonomy.discogs()
    closed = label_closure([["Rock---Hard Rock", "Jazz"], ["Electronic---Disco"], ["Funk / Soul---Disco"],
                            ["Rock---No Such Style"], ["nonsense"]], tax)
    assert closed == [["rock", "rock---hard rock", "jazz"], ["electronic", "electronic---disco"],
                      ["funk / soul", "funk / soul---disco"], ["rock"], []]
    kept = label_closure([["Rock---No Such Style"], ["nonsense"]], tax, keep_unknown=True)
    assert kept == [["rock", "Rock---No Such Style"], ["nonsense"]]
    assert label_parent("Rock---No Such Style", tax) == "rock"
    assert label_parent("rock", tax) is None


def test_packaged_discogs_taxonomy_and_named():
    tax = Taxonomy.named("discogs")
    assert len(tax.roots) == 15 and len(tax.leaves) == 400
    assert all(tax.level_of(s) == 1 and s.startswith(tax.parent(s) + "---") for s in tax.leaves)
    assert tax.parent("electronic---dub") == "electronic" and tax.parent("reggae---dub") == "reggae"
    assert Taxonomy.named(None).roots == Taxonomy.default().roots


def test_named_taxonomy_file(tmp_path):
    (tmp_path / "t.json").write_text('{"Rock": ["Rock---Punk"]}')
    assert Taxonomy.named(tmp_path / "t.json").parent("rock---punk") == "rock"


def test_column_labels_union():
    df = pd.DataFrame({"genres": ["Rock|Pop", None], "styles": ["Rock---Punk|Rock---Punk", "Jazz---Swing"]})
    assert column_labels(df, ["genres", "styles"]) == [["rock", "pop", "rock---punk"], ["jazz---swing"]]
    assert column_labels(df, "styles") == [["rock---punk"], ["jazz---swing"]]
    with pytest.raises(DataError, match="no label column"):
        column_labels(df, ["genre"])


# ---- head -----------------------------------------------------------------------------
def test_head_learns_both_levels_from_styles_alone():
    X, y = planted(600, seed=0)
    head = HierarchyHead(C=1.0, C_child=1.0).fit(X, y)
    assert set(head.levels_) == {"genre", "style"}
    assert head.levels_["genre"] == ["a", "b", "c"]  # genres exist through the closure
    Xt, yt = planted(300, seed=1)
    proba = head.predict_proba(Xt)
    Y = label_matrix(label_closure(yt, Taxonomy.from_tree(GENRES)), head.classes_)
    for name in ("a", "b", "a---x", "b---w"):
        j = columns(head, name)[0]
        assert roc_auc_score(Y[:, j], proba[:, j]) > 0.9, name


def test_parent_never_below_child_on_any_input(rng):
    X, y = planted(300, seed=2, rare=2)
    head = HierarchyHead(C=10.0, C_child=10.0, shrink=0.0).fit(X, y)
    wild = np.concatenate([rng.normal(size=(200, DIM)), 100 * rng.normal(size=(200, DIM)),
                           np.zeros((1, DIM))]).astype(np.float32)
    proba = head.predict_proba(wild)
    assert parent_child_gap(proba, head.classes_, head.parents_) <= 0
    assert ((proba >= 0) & (proba <= 1)).all()
    # the conditional really is below 1 somewhere: children are not just copies of parents
    a, ax = columns(head, "a", "a---x")
    assert (proba[:, ax] < proba[:, a] - 1e-3).any()


def test_compiled_round_trip_is_identical(tmp_path):
    X, y = planted(300, seed=3, rare=1)
    head = HierarchyHead(taxonomy=Taxonomy.from_tree(GENRES)).fit(X, y)
    compiled = head.compile()
    assert isinstance(compiled, CompiledHierarchy) and compiled.multi_label
    save_compiled(compiled, tmp_path / "h.npz")
    loaded = load_compiled(tmp_path / "h.npz")
    assert loaded.kind == "hierarchy" and list(loaded.classes_) == list(head.classes_)
    Xq = planted(50, seed=4)[0]
    assert np.array_equal(loaded.predict_proba(Xq), head.predict_proba(Xq))
    with np.load(tmp_path / "h.npz", allow_pickle=False) as z:  # plain arrays only
        assert all(z[k].dtype != object for k in z.files)


@pytest.mark.parametrize("n_rare", [1, 2])
def test_rare_style_follows_its_genre(rng, n_rare):
    X, y = planted(400, seed=5, rare=n_rare)
    head = HierarchyHead().fit(X, y)
    a, rare, ax = columns(head, "a", "a---rare", "a---x")
    Xq = np.concatenate([planted(100, seed=6)[0], rng.normal(size=(50, DIM))]).astype(np.float32)
    proba = head.predict_proba(Xq)
    n_a = sum("a" in labels for labels in label_closure(y, Taxonomy.from_tree(GENRES)))
    # p(rare) = p(a) * its smoothed share of a's covers, on every input
    np.testing.assert_allclose(proba[:, rare], proba[:, a] * (n_rare + 0.5) / (n_a + 1), rtol=1e-9)
    assert head.weight_[rare] == 0 and head.weight_[ax] > 0
    # a style with its own examples does not merely follow its genre
    assert np.std(proba[:, ax] / proba[:, a]) > 0.01


def test_shrinkage_pulls_a_small_style_toward_its_genre():
    X, y = planted(400, seed=8, rare=6)
    loose, tight = (HierarchyHead(shrink=s, C_child=1.0).fit(X, y) for s in (0.0, 1e6))
    Xq = planted(100, seed=9)[0]
    ratios = [h.predict_proba(Xq)[:, columns(h, "a---rare")[0]] / h.predict_proba(Xq)[:, columns(h, "a")[0]]
              for h in (loose, tight)]
    assert np.std(ratios[1]) < 0.1 * np.std(ratios[0])


def test_knn_vote_moves_only_the_roots_and_leaves_a_fitted_cover_out():
    X, y = planted(300, seed=13)
    with_knn, without = HierarchyHead(knn_weight=0.5).fit(X, y), HierarchyHead(knn_weight=0.0).fit(X, y)
    a, ax = columns(with_knn, "a", "a---x")
    p, q = with_knn.predict_proba(X[:20]), without.predict_proba(X[:20])
    assert np.abs(p[:, a] - q[:, a]).max() > 0.01
    np.testing.assert_allclose(p[:, ax] / p[:, a], q[:, ax] / q[:, a], rtol=1e-9)  # same conditional
    own = with_knn.predict_proba(X[:20], exclude=np.arange(20))
    assert np.abs(own[:, a] - p[:, a]).max() > 1e-3  # its own vote no longer counts
    np.testing.assert_allclose(without.predict_proba(X[:20], exclude=np.arange(20)), q)


def test_head_contract_and_errors():
    X, y = planted(200, seed=10)
    head = HierarchyHead()
    assert clone(head).fit(X, y) is not head
    fitted = head.fit(X, y, tabular=None, groups=np.arange(len(y)))
    assert fitted is head and fitted.n_features_in_ == DIM
    p = head.predict_proba(X[:5], exclude=np.full(5, -1), tabular=None)
    assert p.shape == (5, len(head.classes_))
    assert all(set(labels) <= set(head.classes_) for labels in head.predict(X[:5]))
    with pytest.raises(DataError, match="list of labels"):
        HierarchyHead().fit(X, ["a"] * len(X))
    with pytest.raises(DataError):
        head.predict_proba(X[:, :3])


def test_discogs_taxonomy_head_keeps_unknown_style_under_its_genre():
    X, y = planted(200, seed=12)
    y = [[{"a": "Rock", "b": "Jazz", "c": "Pop"}[lab.partition("---")[0]] + "---made up " + lab[-1]
          if "---" in lab else {"a": "Rock", "b": "Jazz", "c": "Pop"}[lab] for lab in labels] for labels in y]
    head = HierarchyHead("discogs").fit(X, y)
    assert head.parents_["Rock---made up x"] == "rock" and "Rock---made up x" in head.unknown_
    assert head.parents_["rock"] is None


def test_node_depths_and_cycles():
    assert node_depths(np.array([-1, 0, 1, -1])).tolist() == [0, 1, 2, 0]
    with pytest.raises(DataError, match="cycle"):
        node_depths(np.array([1, 0]))


# ---- per-level metrics ------------------------------------------------------------------
HAND_Y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
HAND_P = np.array([[0.9, 0.2, 0.1], [0.8, 0.6, 0.1], [0.3, 0.4, 0.1], [0.1, 0.1, 0.1]])


def test_level_metrics_by_hand():
    m = level_metrics(HAND_Y, HAND_P, ["a", "b", "c"])
    # a: positives 0.9, 0.3 vs negatives 0.8, 0.1 -> 3 of 4 pairs; AP (1 + 2/3) / 2. b: perfect.
    assert m["n_classes"] == 2  # c has no positive
    assert m["macro_auroc"] == pytest.approx((0.75 + 1.0) / 2)
    assert m["macro_ap"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)
    # at 0.5: a predicts rows 0, 1 (F1 2*1/(2+2) = 0.5); b predicts row 1 (F1 1)
    assert m["macro_f1"] == pytest.approx(0.75)
    only_a = level_metrics(HAND_Y, HAND_P, ["a", "b", "c"], min_support=2, threshold=0.25)
    assert only_a["n_classes"] == 1 and only_a["macro_auroc"] == pytest.approx(0.75)
    assert only_a["macro_f1"] == pytest.approx(2 * 2 / (3 + 2))  # rows 0, 1, 2 predicted


def test_hierarchy_metrics_and_threshold_and_gap():
    lists = [["a"], ["b"], ["a"], []]
    levels = {"genre": ["a"], "style": ["b", "c"]}
    out = hierarchy_metrics(lists, HAND_P, ["a", "b", "c"], levels, thresholds={"genre": 0.5, "style": 0.5})
    assert out["genre"]["macro_auroc"] == pytest.approx(0.75)
    assert out["style"]["macro_auroc"] == pytest.approx(1.0) and out["style"]["n_classes"] == 1
    with pytest.raises(DataError, match="lack"):
        hierarchy_metrics(lists, HAND_P, ["a", "b", "c"], {"genre": ["z"]})
    # b alone: any threshold in (0.4, 0.6] separates it perfectly; the grid's first such is 0.42
    assert best_threshold(HAND_Y[:, [1]], HAND_P[:, [1]], ["b"]) == pytest.approx(0.42)
    # per class: a's best F1 (0.8) needs rows 0, 1, 2 (0.1 < t <= 0.3); c has no positive
    per_class = best_threshold(HAND_Y, HAND_P, ["a", "b", "c"], per_class=True)
    np.testing.assert_allclose(per_class, [0.12, 0.42, 0.5])
    assert level_metrics(HAND_Y, HAND_P, ["a", "b", "c"], threshold=per_class)["macro_f1"] == pytest.approx(0.9)
    assert parent_child_gap(HAND_P, ["a", "b", "c"], {"b": "a", "c": "a"}) == pytest.approx(0.1)
    assert parent_child_gap(HAND_P, ["a", "b", "c"], {"c": "b"}) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def styled_index(tmp_path_factory) -> tuple[Path, Any]:
    """A tiny index of planted covers labelled with Discogs styles only, trained with
    `stylegen train --labels multi --label-column styles --taxonomy discogs --head hierarchy
    --head knn`: (index folder, the CLI's result)."""
    from typer.testing import CliRunner

    from stylegen.apps.cli import app
    from tests.conftest import embed_tiny, planted_rows

    tmp_path = tmp_path_factory.mktemp("styled")
    styles = ["Rock---Hard Rock", "Electronic---Techno", "Jazz---Swing"]
    rows = pd.DataFrame(planted_rows(tmp_path, styles, 12, lambda g, i: {"artist_group": f"g{g}{i % 4}"}))
    rows["styles"] = rows["genre"]
    rows.loc[0, "styles"] = "Rock---Hard Rock|Rock---Glam"  # a style on one cover only
    rows[["image", "styles", "artist_group"]].to_csv(tmp_path / "covers.csv", index=False)
    embed_tiny(tmp_path / "covers.csv", tmp_path / "idx")
    out = CliRunner().invoke(app, ["train", "--index", str(tmp_path / "idx"), "--labels", "multi",
                                   "--label-column", "styles", "--taxonomy", "discogs", "--head", "hierarchy",
                                   "--head", "knn"])
    return tmp_path / "idx", out


def test_train_fits_the_hierarchy_from_style_columns_through_the_packaged_discogs_taxonomy(styled_index):
    """`stylegen train --labels multi --label-column styles --taxonomy discogs --head hierarchy`:
    styles alone label their genres (closure), a style on one cover is kept (under its genre)
    though flat heads would drop it, and every genre's probability is at least its styles'."""
    from typer.testing import CliRunner

    from stylegen.apps.cli import app
    from stylegen.heads.io import read_head_set
    from stylegen.query.engine import Engine

    idx, out = styled_index
    assert out.exit_code == 0, out.output
    cfg = read_head_set(idx)
    assert cfg["default_head"] == "hierarchy" and cfg["label_columns"] == ["styles"]
    classes = set(cfg["classes"])
    assert {"rock", "electronic", "jazz", "rock---glam"} <= {c.lower() for c in classes}
    engine = Engine.open(idx)
    proba, names, _ = engine.predict_proba(np.asarray(engine.index.vectors[:6]), "head")
    col = {n.lower(): j for j, n in enumerate(names)}
    for genre, style in (("rock", "rock---hard rock"), ("rock", "rock---glam"), ("jazz", "jazz---swing")):
        assert np.all(proba[:, col[genre]] >= proba[:, col[style]] - 1e-9)
    bad = CliRunner().invoke(app, ["train", "--index", str(idx), "--head", "hierarchy"])
    assert bad.exit_code != 0 and "hierarchy needs --labels multi" in str(bad.exception)


def test_classify_reads_genres_from_the_hierarchy_and_lists_every_class_with_its_path(styled_index):
    """`classify --top N` with N at least the number of classes lists them all, each with its
    root-first path; `levels.top` holds each genre's own probability (not a noisy-OR of its
    styles, which would overstate it) and `levels.style` the best styles."""
    from stylegen.query.engine import Engine

    idx, _ = styled_index
    engine = Engine.open(idx)
    r = engine.query(engine.cover_path(0), top=50)
    names = list(r.classes)
    assert len(r.genres) == len(names) and {g["genre"] for g in r.genres} == set(names)
    by_name = dict(zip(names, r.proba, strict=True))
    for g in r.genres:
        assert g["path"][-1] == g["genre"] and (len(g["path"]) == 1) == ("---" not in g["genre"])
    top = {g["genre"]: g["probability"] for g in r.levels["top"]}
    assert set(top) == {"rock", "electronic", "jazz"}
    for genre, p in top.items():
        assert p == pytest.approx(by_name[genre], abs=1e-6)
    noisy_or = 1 - np.prod([1 - by_name[c] for c in names if c.startswith("rock")])
    assert top["rock"] < noisy_or - 1e-3  # what the roll-up would have said
    styles = [g["genre"] for g in r.levels["style"]]
    assert styles and all("---" in s for s in styles)
    assert [by_name[s] for s in styles] == sorted((by_name[s] for s in styles), reverse=True)


def test_evaluate_scores_a_hierarchy_model_per_level_on_held_out_covers(styled_index, tmp_path):
    """`evaluate --test` on a model of Discogs styles reads the test labels as training did
    (the styles column, closed upward to genres) and reports macro-AUROC, macro-AP and F1 per
    level, F1 at the threshold `train` chose on held-out covers."""
    import json

    from typer.testing import CliRunner

    from stylegen.apps.cli import app
    from stylegen.heads.io import read_head_set
    from tests.conftest import make_image

    idx, _ = styled_index
    styles = ["Rock---Hard Rock", "Electronic---Techno", "Jazz---Swing"]
    rows = [{"image": str(make_image(tmp_path / f"t{g}{i}.png", kind=g, seed=100 * g + 50 + i)), "styles": s}
            for g, s in enumerate(styles) for i in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "test.csv", index=False)
    out = CliRunner().invoke(app, ["evaluate", "--index", str(idx), "--test", str(tmp_path / "test.csv"), "--json"])
    assert out.exit_code == 0, out.output
    levels = json.loads(out.output)["levels"]
    assert set(levels) == {"genre", "style"}
    assert levels["genre"]["n_classes"] == 3 and levels["style"]["n_classes"] == 3
    assert levels["genre"]["macro_auroc"] > 0.9 and levels["style"]["macro_auroc"] > 0.9
    recorded = read_head_set(idx)["calibration"]["hierarchy"]["thresholds"]
    assert levels["genre"]["threshold"] == pytest.approx(recorded["genre"])


def test_evaluate_cv_compares_multi_label_heads_per_level_with_grouped_folds(styled_index):
    """`evaluate --cv` on an index trained with --labels multi takes the recorded label columns
    and taxonomy, keeps each artist group in one fold, and scores each head per level; the
    hierarchy head never puts a style above its genre."""
    import json

    from typer.testing import CliRunner

    from stylegen.apps.cli import app

    idx, _ = styled_index
    out = CliRunner().invoke(app, ["evaluate", "--index", str(idx), "--cv", "3", "--min-support", "3",
                                   "--heads", "knn,hierarchy", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert set(res) == {"knn", "hierarchy"}
    for head in res.values():
        assert set(head["levels"]) == {"genre", "style"}
        assert head["levels"]["genre"]["auroc"] > 0.9
    assert res["hierarchy"]["levels"]["style"]["n_classes"] == 3  # rock---glam (1 cover) is below 3
    assert res["hierarchy"]["child_above_parent"] == 0.0
    bad = CliRunner().invoke(app, ["evaluate", "--index", str(idx), "--cv", "3", "--group-column", "label"])
    assert bad.exit_code != 0 and "no column 'label'" in str(bad.exception)


def test_multi_label_train_defaults_to_the_hierarchy_and_knn(styled_index, tmp_path):
    """`train --labels multi` without --head fits the hierarchy and kNN only: the flat heads fit
    one regression per label (on the Discogs covers all five heads took minutes, these two 12 s)."""
    import shutil

    from typer.testing import CliRunner

    from stylegen.apps.cli import app
    from stylegen.heads.io import read_head_set

    idx = shutil.copytree(styled_index[0], tmp_path / "idx")
    out = CliRunner().invoke(app, ["train", "--index", str(idx), "--labels", "multi", "--label-column", "styles",
                                   "--taxonomy", "discogs"])
    assert out.exit_code == 0, out.output
    assert read_head_set(idx)["heads"] == ["hierarchy", "knn"]
