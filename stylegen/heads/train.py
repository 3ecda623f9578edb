"""Fit genre heads on an index's vectors and store them in ``DIR/heads``.

Heads: ``linear`` (logistic regression, C by CV), ``mlp`` (torch, early stopping; a hybrid
image + table model when tabular columns are given), ``knn`` (similarity-weighted votes)
and ``ensemble`` (head + kNN, weight chosen on validation data). ``heads.json`` records
the labels, classes, taxonomy, training rows and a validation score for each head, and
the index's ``feature_id``: heads are refused once the index's vectors change.

Each head is calibrated (:mod:`stylegen.heads.calibration`: a temperature fitted on
artist-disjoint out-of-fold predictions) and stored as its calibrated form; ``heads.json``
records per head ``calibration`` (temperature, ECE before / after, folds) and, for the
default method's head, the cross-validated ``precision_coverage`` table and
``min_confidence``: the smallest threshold in 0.5..0.9 with precision >= 0.80.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.model_selection import GroupShuffleSplit

from stylegen import heads as head_classes
from stylegen.errors import DataError, StylegenError
from stylegen.heads.calibration import CalibratedHead, best_threshold, fit_predict
from stylegen.heads.hierarchy import level_label
from stylegen.heads.io import head_sets, write_head_set
from stylegen.index.store import Index, exclusive
from stylegen.sources.labels import (
    Taxonomy,
    column_labels,
    filter_genres,
    label_closure,
    label_parent,
    multi_labels,
    single_labels,
)
from stylegen.util.persist import clean_temporary

HEAD_NAMES = ("linear", "mlp", "knn", "ensemble")  # flat heads: single- or multi-label
MULTI_HEAD_NAMES = (*HEAD_NAMES, "hierarchy")  # hierarchy: genre -> style, multi-label only
FLAT_MIN_COVERS = 10  # multi-label with the hierarchy head: flat heads leave rarer labels to it


def make_heads(multi: bool, seed: int = 0, mlp_mode: str = "image",
               taxonomy: str | Path | None = None) -> dict[str, Any]:
    """Unfitted heads with the project's defaults (also used by cross-validation); with
    ``multi`` also the ``hierarchy`` head over ``taxonomy`` (a name or file)."""
    # multi-label: one C for every label (per-dimension standardised, C = 0.001: the best flat
    # regression on the Discogs covers, docs/results_discogs.md); a per-label search of C costs
    # 19 fits per label (6 Cs x 3 folds + 1): `train` on those covers ran for over 20 minutes
    linear = head_classes.LinearHead(multi_label=multi, random_state=seed, **({"Cs": (0.001,)} if multi else {}))
    # with a table: a wider table branch, more patience and 5 averaged nets (5-fold CV on GTZAN,
    # docs/results_gtzan.md: hybrid macro-F1 0.754 -> 0.78)
    table_kw = {} if mlp_mode == "image" else {"tabular_hidden": (128,), "patience": 40, "n_models": 5}
    return {
        "linear": linear,
        "mlp": head_classes.MLPHead(multi_label=multi, random_state=seed, mode=mlp_mode, hidden=(256,), dropout=0.5,
                       **table_kw),
        # k=50, temperature 0.1: best kNN vote and best ensemble partner on the covers
        # (docs/results_covers_research.md, rows 41-50)
        "knn": head_classes.KNNHead(k=50, temperature=0.1, multi_label=multi),
        "ensemble": head_classes.EnsembleHead(clone(linear), head_classes.KNNHead(k=50, temperature=0.1, multi_label=multi),
                                 random_state=seed),
        **({"hierarchy": head_classes.HierarchyHead(None if taxonomy is None else str(taxonomy))} if multi else {}),
    }


def labelled_rows(meta: pd.DataFrame, labels: str,
                  label_columns: Sequence[str] | None = None) -> tuple[np.ndarray, Any]:
    """Index rows that carry labels and the labels (strings, or lists when multi: from
    ``label_columns``, ``|``-separated, else ``genres``/``genre``)."""
    if labels == "single":
        y = single_labels(meta)
        rows = np.flatnonzero(y.notna().to_numpy())
        return rows, y.to_numpy()[rows].astype(str)
    if labels == "multi":
        lists = column_labels(meta, label_columns) if label_columns else multi_labels(meta)
        rows = np.array([i for i, g in enumerate(lists) if g], dtype=int)
        return rows, [lists[i] for i in rows]
    raise StylegenError(f"--labels must be single or multi, got {labels!r}")


TRAINABLE = ("linear", "mlp", "hierarchy")  # heads the method "head" can answer with


def default_method(heads: Sequence[str], scores: dict[str, float | None], default_head: str) -> str:
    """The method ``classify`` uses unless told: the best validated of head / knn / ensemble
    (ties go to the ensemble, then the head); without scores, the ensemble when trained."""
    candidates = {"ensemble": "ensemble", "head": default_head, "knn": "knn"}
    trained = {m: h for m, h in candidates.items() if h in heads and (m != "head" or h in TRAINABLE)}
    scored = {m: scores[h] for m, h in trained.items() if scores.get(h) is not None}
    if scored:
        return max(scored, key=lambda m: scored[m])  # max keeps the first of equal scores
    return next(iter(trained), "knn")


GROUP_COLUMNS = ("artist", "artist_group")  # what keeps an artist's covers on one side of a split


def artist_groups(meta: pd.DataFrame, column: str | None = None) -> np.ndarray:
    """Group id per row: ``column``'s value (default: ``artist``, else ``artist_group`` as in
    the Discogs covers) where known, else the row itself (one cover, one group)."""
    if column is not None and column not in meta:
        raise DataError(f"no column {column!r} to group covers by (columns: {', '.join(map(str, meta.columns))})")
    found = [c for c in ([column] if column else GROUP_COLUMNS) if c in meta and meta[c].notna().any()]
    artist = meta[found[0]].fillna("").astype(str).to_numpy() if found else np.full(len(meta), "")
    return np.array([a.strip().lower() or f"#row{i}" for i, a in enumerate(artist)])


def drop_rare(rows: np.ndarray, y: Any, min_count: int) -> tuple[np.ndarray, Any, list[str]]:
    """Leave out labels seen fewer than ``min_count`` times (too few to learn or validate)."""
    lists = [[v] for v in y] if isinstance(y, np.ndarray) else y
    counts = pd.Series([g for gs in lists for g in gs]).value_counts()
    rare = sorted(counts[counts < min_count].index)
    if not rare:
        return rows, y, []
    kept = [[g for g in gs if g not in rare] for gs in lists]
    keep = np.array([bool(k) for k in kept])
    if isinstance(y, np.ndarray):
        return rows[keep], y[keep], rare
    return rows[keep], [k for k, m in zip(kept, keep, strict=True) if m], rare


def taxonomy_tree(taxonomy: Taxonomy, classes: Sequence[str]) -> dict[str, list[str]]:
    """The taxonomy as ``{parent: children}``, its genres spelled as the classes spell them
    (the taxonomy matches names by key: GTZAN's ``hiphop`` is its ``hip-hop``), with unknown
    classes added as roots."""
    spelling = {name: c for c in classes if (name := taxonomy.find(c)) is not None}
    tree = {spelling.get(g, g): [spelling.get(k, k) for k in taxonomy.children.get(g, ())] for g in taxonomy.parents}
    for c in classes:
        tree.setdefault(c, [])
    return tree


def class_levels(classes: Sequence[str], taxonomy: Taxonomy) -> dict[str, list[str]]:
    """The classes by level of the tree they form among themselves: a class whose taxonomy
    parent (:func:`~stylegen.sources.labels.label_parent`) is not a class is a top-level one
    ("genre"); below come "style", "level2", ... Flat classes are one level, "genre"."""
    present = {str(c) for c in classes}
    up = {c: p if (p := label_parent(c, taxonomy)) in present else None for c in present}
    out: dict[str, list[str]] = {}
    for c in map(str, classes):
        depth, node = 0, c
        while (node := up[node]) is not None and depth < len(present):
            depth += 1
        out.setdefault(level_label(depth), []).append(c)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "genre", kv[0] != "style", kv[0])))


def level_thresholds(cal: CalibratedHead, levels: dict[str, list[str]]) -> dict[str, float] | None:
    """Per level, the one threshold with the best macro-F1 of a multi-label head's calibrated
    held-out predictions (None when calibration was skipped); ``evaluate`` scores F1 at it."""
    if cal.oof_proba_ is None:
        return None
    column = {str(c): j for j, c in enumerate(cal.target_classes_)}
    out = {}
    for level, names in levels.items():
        kept = [n for n in names if n in column]
        cols = [column[n] for n in kept]
        Y = np.asarray(cal.oof_targets_)[:, cols]
        if cols and Y.any():
            out[level] = best_threshold(Y, cal.oof_proba_[:, cols], kept)
    return out


def _validation_score(head: Any, X: np.ndarray, y: Any, groups: np.ndarray, seed: int,
                      fit_kw: dict[str, Any], extra: dict[str, np.ndarray]) -> float:
    """Macro-F1 (single) / accuracy of the top label (multi) on a group-disjoint 20% split."""
    from sklearn.metrics import f1_score

    tr, va = next(GroupShuffleSplit(1, test_size=0.2, random_state=seed).split(X, groups=groups))
    proba, est = fit_predict(head, X, y, tr, va, fit_kw, extra)
    pred = np.asarray(est.classes_)[np.argmax(proba, axis=1)]
    if isinstance(y, np.ndarray):
        return float(f1_score(y[va], pred, average="macro"))
    return float(np.mean([p in y[i] for i, p in zip(va, pred, strict=True)]))


def _held_out_score(cal: CalibratedHead, y: Any) -> float:
    """The validation score of a calibrated head's held-out predictions (before scaling: the
    top class is the same): macro-F1, or for multi-label the share whose top class is a label."""
    from sklearn.metrics import f1_score

    rows = cal.held_rows_
    pred = cal.target_classes_[np.argmax(cal.held_raw_, axis=1)]
    if isinstance(y, np.ndarray):
        return float(f1_score(y[rows], pred, average="macro"))
    return float(np.mean([p in y[i] for i, p in zip(rows, pred, strict=True)]))


def train(
    index_dir: str | Path,
    heads: Sequence[str] = HEAD_NAMES,
    labels: str = "single",
    taxonomy: str | Path | None = None,
    tabular: np.ndarray | None = None,
    tabular_columns: Sequence[str] | None = None,
    seed: int = 0,
    validate: bool = True,
    calibrate: bool | None = None,
    calibration_folds: int = 1,
    label_columns: Sequence[str] | None = None,
    group_column: str | None = None,
) -> dict[str, Any]:
    """Fit ``heads`` on the labelled covers of the index; returns what heads.json records.

    ``labels="multi"``: label sets from ``label_columns`` (default ``genres``); with the
    ``hierarchy`` head and a ``taxonomy`` (``"discogs"``, a file) every label's ancestors are
    added (a Discogs ``Genre---Style`` also labels its genre). Flat heads leave out labels on fewer than 3
    covers (10 when the ``hierarchy`` head is trained too, which keeps them under their genre,
    unless fewer than 2 labels have 10).

    ``validate``: score each head on a held-out split; ``calibrate`` (default: as
    ``validate``): calibrate each head on held-out predictions, from the same artist-disjoint
    80/20 split (``calibration_folds=1``: no fit beyond the validation one) or from K-fold
    out-of-fold predictions (K extra fits per head). ``validate=False`` alone is a quick
    train with neither. ``group_column``: the metadata column whose covers stay on one side of
    every split (default ``artist``, else ``artist_group``: :func:`artist_groups`).

    Holds the index's lock (:func:`~stylegen.index.store.exclusive`) from reading the vectors
    to naming the new head set, as ``embed`` does: two runs never write one index at once.
    """
    names = MULTI_HEAD_NAMES if labels == "multi" else HEAD_NAMES
    unknown = set(heads) - set(names)
    if unknown or not heads:
        raise StylegenError(f"heads must be among {', '.join(names)} (hierarchy needs --labels multi), "
                            f"got {', '.join(heads)}")
    if label_columns and labels != "multi":
        raise StylegenError("--label-column needs --labels multi")
    tax = Taxonomy.named(taxonomy)  # a bad file: its one-line error before any lock or fit
    root = Path(index_dir)
    Index.open(root, use_gpu=False)  # no index: its one-line error, before a lock file is made
    with exclusive(root):
        clean_temporary(head_sets(root).base)  # what a killed train was writing
        return _train(Index.open(root, use_gpu=False), heads, labels, taxonomy, tabular, tabular_columns,
                      seed, validate, validate if calibrate is None else calibrate, calibration_folds,
                      label_columns, tax, group_column)


def _train(index: Index, heads: Sequence[str], labels: str, taxonomy: str | Path | None,
           tabular: np.ndarray | None, tabular_columns: Sequence[str] | None, seed: int,
           validate: bool, calibrate: bool = False, calibration_folds: int = 1,
           label_columns: Sequence[str] | None = None, tax: Taxonomy | None = None,
           group_column: str | None = None) -> dict[str, Any]:
    tax = tax or Taxonomy.named(taxonomy)
    rows, y = labelled_rows(index.metadata, labels, label_columns)
    closure = labels == "multi" and taxonomy is not None and "hierarchy" in heads
    if labels == "multi":
        if closure:  # a Genre---Style also labels its Genre
            y = label_closure(y, tax, keep_unknown=True)
        counts = pd.Series([g for gs in y for g in gs]).value_counts()
        floor = FLAT_MIN_COVERS if "hierarchy" in heads else 3  # the hierarchy keeps what flat heads drop
        if (counts >= floor).sum() < 2:  # a small collection: flat heads keep what they can learn from
            floor = 3
        dropped = sorted(counts[counts < floor].index)
        flat_y = filter_genres(y, set(counts.index) - set(dropped))  # rows stay: the hierarchy keeps all
    else:
        floor = 3
        rows, y, dropped = drop_rare(rows, y, min_count=floor)
        flat_y = y
    if len(rows) < 4:
        raise DataError(f"the index has {len(rows)} labelled covers; at least 4 are needed to train")
    X = np.ascontiguousarray(index.vectors[rows], dtype=np.float32)
    groups = artist_groups(index.metadata, group_column)[rows]
    extra = {}
    if tabular is not None:
        if len(tabular) != len(index):
            raise DataError(f"tabular features have {len(tabular)} rows, the index {len(index)}")
        extra = {"tabular": np.asarray(tabular, np.float32)[rows]}
    factory = make_heads(labels == "multi", seed, "hybrid" if extra else "image", taxonomy)
    scores: dict[str, float] = {}
    calibration: dict[str, dict[str, Any]] = {}
    fitted_heads = {}
    for name in heads:
        head = factory[name]
        yy = y if name == "hierarchy" else flat_y  # the hierarchy keeps rare labels under their genre
        kw = extra if name == "mlp" else {}
        # the ensemble picks its weight on an artist-disjoint split (kNN votes from an artist's
        # other covers would look too good); the MLP's early stopping did worse with one
        fit_groups = {"groups": groups} if isinstance(head, head_classes.EnsembleHead) else {}
        if calibrate:  # its held-out predictions also give the validation score: no extra fit
            fitted = CalibratedHead(head, calibration_folds, seed).fit(X, yy, cv_groups=groups, **kw, **fit_groups)
            calibration[name] = fitted.calibration_
            fitted_heads[name] = fitted.head_ if fitted.skipped else fitted  # T = 1: the head as it is
            if validate:
                scores[name] = None if fitted.skipped else round(_held_out_score(fitted, yy), 4)
        else:
            if validate:
                try:
                    scores[name] = round(_validation_score(head, X, yy, groups, seed, fit_groups, kw), 4)
                except (StylegenError, ValueError):  # too few covers for a held-out split
                    scores[name] = None
            fitted = clone(head).fit(X, yy, **kw, **fit_groups)
            fitted_heads[name] = fitted
    trainable = [h for h in TRAINABLE if h in heads]
    default_head = max(trainable, key=lambda h: scores.get(h) or 0) if trainable else heads[0]
    classes = [str(c) for c in fitted_heads[default_head].classes_]
    levels = class_levels(classes, tax) if labels == "multi" else None
    for name, fitted in fitted_heads.items():  # multi-label: F1 thresholds per level, held out
        if levels is not None and isinstance(fitted, CalibratedHead) and name in calibration:
            calibration[name]["thresholds"] = level_thresholds(fitted, levels)
    method = default_method(heads, scores, default_head)
    used = {"head": default_head}.get(method, method)  # the head the default method answers with
    table = used_head.precision_coverage() if isinstance(used_head := fitted_heads.get(used), CalibratedHead) else None
    config = {
        "feature_id": index.feature_id,
        "labels": labels,
        "heads": list(heads),
        "default_head": default_head,
        "default_method": method,
        "classes": classes,
        "dropped_classes": dropped,
        "validation_macro_f1" if labels == "single" else "validation_top1_in_labels": scores,
        "calibration": calibration if calibrate else None,
        # the default method's head: cross-fitted calibrated out-of-fold precision per threshold
        "precision_coverage": table,
        "min_confidence": calibration.get(used, {}).get("min_confidence"),
        "taxonomy": taxonomy_tree(tax, classes),
        "train_rows": [int(r) for r in rows],
        "tabular_columns": list(tabular_columns) if tabular_columns is not None else None,
        "label_columns": list(label_columns) if label_columns else None,
        "flat_min_covers": floor if labels == "multi" else 3,
        "label_closure": closure,  # labels were closed upward through the taxonomy
        "taxonomy_name": None if taxonomy is None else str(taxonomy),  # as given: "discogs", a file
        "levels": levels,
        "group_column": group_column,
        "seed": seed,
    }
    write_head_set(index.root, fitted_heads, config, index.feature_id)
    return config
