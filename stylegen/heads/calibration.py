"""Confidence that means something: temperature scaling fitted on out-of-fold predictions.

A head is calibrated when, of the covers it gives 0.8, about 80% are right. ``stylegen train``
wraps each head in :class:`CalibratedHead`, whose ``fit``:

1. predicts every row out of fold: grouped K-fold CV (artist-disjoint; StratifiedGroupKFold
   for single-label heads, as ``evaluate --cv`` does, GroupKFold for multi-label), the head
   refitted on the other K-1 folds each time;
2. fits one temperature ``T`` to those predictions by minimising their negative
   log-likelihood (bounded scalar search over log T, T in [0.05, 20]);
3. fits the head on all rows; it compiles to ``CompiledCalibrated(head, T)``
   (:func:`~stylegen.heads.compiled.temperature_scale`: single-label ``p_T ∝ exp(log(p)/T)``,
   multi-label ``sigmoid(logit(p)/T)``), so every query gets calibrated probabilities.

Its report: top-label expected calibration error (15 bins) of the out-of-fold predictions
before and after scaling. "After" is **cross-fitted**: each fold's predictions are scaled by a
temperature fitted on the other folds' out-of-fold predictions, so no prediction is scored at a
temperature that saw its own label. The same cross-fitted probabilities give the
precision / coverage table and the smallest threshold with precision >= 0.80
(``library tag``'s default ``--min-confidence``).

The metric functions here are pure numpy; :mod:`stylegen.evaluation.metrics` re-exports them
(heads may not import evaluation).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

from stylegen.errors import DataError, StylegenError
from stylegen.heads.compiled import PROBA_CLIP, CompiledCalibrated, align_columns, temperature_scale
from stylegen.sources.labels import decode_predictions, encode_targets

T_BOUNDS = (0.05, 20.0)
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))  # 0.5, 0.55, ..., 0.9
TARGET_PRECISION = 0.80


# ---- metrics (pure) ------------------------------------------------------------------
def _top_label(proba: Any, y_index: Any) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of each row's most probable class. ``y_index``: the true class
    index per row, or a 0/1 label matrix (multi-label: correct when the top class is one of
    the labels)."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y_index)
    if proba.ndim != 2 or len(proba) != len(y):
        raise DataError(f"expected (n, classes) probabilities for {len(y)} rows, got shape {proba.shape}")
    rows, top = np.arange(len(proba)), np.argmax(proba, axis=1)
    correct = y[rows, top] > 0 if y.ndim == 2 else y.astype(np.int64) == top
    return proba[rows, top], correct


def expected_calibration_error(proba: Any, y_index: Any, n_bins: int = 15) -> float:
    """Top-label ECE: rows binned by their top probability into ``n_bins`` equal-width bins
    (``(lo, hi]``; 0 joins the first), ``sum_b n_b / n * |accuracy_b - mean confidence_b|``.
    ``y_index`` as in :func:`precision_coverage`."""
    conf, correct = _top_label(proba, y_index)
    if not len(conf):
        raise DataError("no predictions to measure calibration on")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    gap = np.bincount(bins, correct - conf, minlength=n_bins)  # n_b * (accuracy_b - confidence_b)
    return float(np.abs(gap).sum() / len(conf))


def precision_coverage(proba: Any, y_index: Any,
                       thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)) -> list[dict[str, Any]]:
    """Per threshold ``t``: ``coverage`` = share of rows whose top probability is >= t,
    ``precision`` = accuracy of the top class among them (None when none), ``n`` = their count.
    ``y_index``: the true class index per row, or a 0/1 label matrix for multi-label heads
    (right when the top class is one of the labels)."""
    conf, correct = _top_label(proba, y_index)
    table = []
    for t in thresholds:
        kept = conf >= t
        n = int(kept.sum())
        table.append({"threshold": float(t), "coverage": n / len(conf) if len(conf) else 0.0,
                      "precision": float(correct[kept].mean()) if n else None, "n": n})
    return table


def min_confidence(table: Sequence[Mapping[str, Any]], target: float = TARGET_PRECISION) -> float | None:
    """The smallest threshold of a :func:`precision_coverage` table whose precision is at least
    ``target`` (None: none is)."""
    for row in sorted(table, key=lambda r: r["threshold"]):
        if row["precision"] is not None and row["precision"] >= target:
            return float(row["threshold"])
    return None


# ---- thresholds for multi-label heads ------------------------------------------------
def label_matrix(Y_true: Any, classes: Sequence[str]) -> np.ndarray:
    """0/1 matrix (n, C) from label lists (labels not in ``classes`` ignored), or a 0/1
    matrix passed through."""
    if isinstance(Y_true, np.ndarray) and Y_true.ndim == 2:
        if Y_true.shape[1] != len(classes):
            raise DataError(f"label matrix has {Y_true.shape[1]} columns for {len(classes)} classes")
        return (Y_true > 0).astype(int)
    col = {str(c): j for j, c in enumerate(classes)}
    Y = np.zeros((len(Y_true), len(classes)), dtype=int)
    for i, labels in enumerate(Y_true):
        Y[i, [col[str(lab)] for lab in labels if str(lab) in col]] = 1
    return Y


def best_threshold(Y_true: Any, proba: np.ndarray, classes: Sequence[str],
                   grid: Sequence[float] | None = None, per_class: bool = False) -> float | np.ndarray:
    """The one threshold (from ``grid``, default 0.02..0.98) with the best macro-F1 over the
    classes that have a positive, or with ``per_class`` each class's best F1 threshold (0.5
    for a class without positives); choose on training rows, then apply to test rows."""
    Y = label_matrix(Y_true, classes).astype(bool)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != Y.shape:
        raise DataError(f"probabilities have shape {proba.shape}, labels {Y.shape}")
    used = Y.sum(axis=0) > 0
    if not used.any() and not per_class:
        raise DataError("no class has a positive row: no threshold to choose")
    grid = np.arange(0.02, 0.99, 0.02) if grid is None else np.asarray(grid, dtype=np.float64)
    f1 = np.empty((len(grid), Y.shape[1]))
    for i, t in enumerate(grid):
        pred = proba >= t
        f1[i] = 2 * (pred & Y).sum(axis=0) / np.maximum(pred.sum(axis=0) + Y.sum(axis=0), 1)
    if per_class:  # argmax keeps the first (lowest) of equal thresholds
        return np.where(used, grid[np.argmax(f1, axis=0)], 0.5)
    return float(grid[np.argmax(f1[:, used].mean(axis=1))])


# ---- temperature ---------------------------------------------------------------------
def fit_temperature(proba: Any, y_index: Any, multi_label: bool) -> float:
    """The temperature in [0.05, 20] that minimises the negative log-likelihood of the scaled
    probabilities (bounded scalar search over log T). ``y_index``: class indices, or a 0/1
    label matrix when ``multi_label``."""
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    p = np.clip(np.asarray(proba, dtype=np.float64), PROBA_CLIP, 1 - PROBA_CLIP)
    y = np.asarray(y_index)
    if multi_label:
        z = np.log(p) - np.log1p(-p)
        y = y.astype(np.float64)

        def nll(log_t: float) -> float:
            logits = z / np.exp(log_t)
            return float(np.mean(y * np.logaddexp(0.0, -logits) + (1 - y) * np.logaddexp(0.0, logits)))
    else:
        z, rows, y = np.log(p), np.arange(len(p)), y.astype(np.int64)

        def nll(log_t: float) -> float:
            logits = z / np.exp(log_t)
            return float(np.mean(logsumexp(logits, axis=1) - logits[rows, y]))

    found = minimize_scalar(nll, bounds=tuple(np.log(T_BOUNDS)), method="bounded", options={"xatol": 1e-4})
    return float(np.clip(np.exp(found.x), *T_BOUNDS))


def cross_fitted(proba: np.ndarray, y_index: np.ndarray, fold: np.ndarray, multi_label: bool) -> np.ndarray:
    """Each fold's probabilities scaled at the temperature fitted on the other folds' rows."""
    out = np.empty_like(proba, dtype=np.float64)
    for k in np.unique(fold):
        rest = fold != k
        out[~rest] = temperature_scale(proba[~rest], fit_temperature(proba[rest], y_index[rest], multi_label),
                                       multi_label)
    return out


# ---- folds ---------------------------------------------------------------------------
def _take(y: Any, rows: np.ndarray) -> Any:
    return y[rows] if isinstance(y, np.ndarray) else [y[i] for i in rows]


def fit_predict(head: Any, X: np.ndarray, y: Any, train: np.ndarray, test: np.ndarray,
                fit_kw: Mapping[str, np.ndarray] | None = None,
                extra: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, Any]:
    """A clone of ``head`` fitted on rows ``train``: its probabilities for rows ``test`` and
    itself. Per-row arrays in ``extra`` go to ``fit`` and ``predict_proba``, ``fit_kw`` to
    ``fit`` only, each sliced to the rows."""
    extra, fit_kw = dict(extra or {}), dict(fit_kw or {})
    est = clone(head).fit(X[train], _take(y, train), **{k: v[train] for k, v in {**extra, **fit_kw}.items()})
    return est.predict_proba(X[test], **{k: v[test] for k, v in extra.items()}), est


def grouped_folds(targets: np.ndarray, groups: Any, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Artist-disjoint (train, test) rows: StratifiedGroupKFold for class indices,
    GroupKFold for a label matrix; ``n_folds=1``: one artist-disjoint 80/20 split (the split
    ``train``'s validation score uses, so calibrating costs no extra fit). Raises DataError
    when there are fewer groups than folds."""
    from sklearn.model_selection import GroupKFold, GroupShuffleSplit, StratifiedGroupKFold

    groups = np.asarray([str(g) for g in groups], dtype=object)
    n_groups = len(set(groups))
    if n_folds < 1:
        raise DataError(f"calibration needs at least 1 fold, got {n_folds}")
    if n_folds == 1:
        if n_groups < 2:
            raise DataError(f"too few covers for a held-out split: {len(groups)} covers in {n_groups} artist groups")
        return list(GroupShuffleSplit(1, test_size=0.2, random_state=seed).split(np.arange(len(targets)), groups=groups))
    if n_groups < n_folds:
        raise DataError(f"too few covers for {n_folds} folds: {len(groups)} covers in {n_groups} artist groups")
    rows = np.arange(len(targets))
    if targets.ndim == 2:
        return list(GroupKFold(n_folds, shuffle=True, random_state=seed).split(rows, groups=groups))
    with warnings.catch_warnings():  # a class with fewer covers than folds: some folds lack it
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return list(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(rows, targets, groups))


def out_of_fold(head: Any, X: np.ndarray, y: Any, classes: np.ndarray,
                folds: Sequence[tuple[np.ndarray, np.ndarray]], fit_kw: Mapping[str, np.ndarray] | None = None,
                extra: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities in ``classes`` order, fold number) for every row, each predicted by a
    clone fitted on the other folds; a class a fold's clone never saw gets 0."""
    proba, fold = np.zeros((len(X), len(classes))), np.full(len(X), -1)
    for k, (train, test) in enumerate(folds):
        p, est = fit_predict(head, X, y, train, test, fit_kw, extra)
        proba[test] = align_columns(np.asarray(p, np.float64), list(est.classes_), list(classes))
        fold[test] = k
    return proba, fold


# ---- the estimator -------------------------------------------------------------------
class CalibratedHead(ClassifierMixin, BaseEstimator):
    """``head`` with a temperature fitted on its out-of-fold predictions (module docstring).

    After ``fit``: ``head_`` (fitted on all rows), ``temperature_``, ``calibration_`` (the
    report ``heads.json`` records: ``temperature``, ``ece_before``, ``ece_after``, ``folds``,
    ``min_confidence``, or ``skipped`` with the reason and T = 1), ``oof_proba_`` (the
    cross-fitted calibrated out-of-fold probabilities; None when skipped) and
    ``oof_targets_`` (class indices, or the label matrix).
    """

    def __init__(self, head: Any, folds: int = 5, random_state: int = 0) -> None:
        self.head = head
        self.folds = folds
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any, cv_groups: Any = None, **fit_params: Any) -> CalibratedHead:
        """``cv_groups`` (artists; default: one per row) make the folds. ``fit_params`` are
        per-row arrays for the head's ``fit``, sliced per fold; a ``tabular`` table also goes
        to its ``predict_proba`` (the heads' contract)."""
        X = np.asarray(X)
        extra = {k: v for k, v in fit_params.items() if k == "tabular" and v is not None}
        fit_kw = {k: v for k, v in fit_params.items() if k not in extra and v is not None}
        self.head_ = clone(self.head).fit(X, y, **fit_kw, **extra)
        multi = bool(self.head_.compile().multi_label)  # (an ensemble says so through its parts)
        targets, classes = encode_targets(y, multi, len(X))
        groups = np.arange(len(X)) if cv_groups is None else np.asarray(cv_groups)
        self.oof_proba_, self.oof_targets_ = None, targets
        self.held_rows_, self.held_raw_ = np.arange(0), None
        try:
            folds = grouped_folds(targets, groups, self.folds, self.random_state)
            raw, fold = out_of_fold(self.head, X, y, classes, folds, fit_kw, extra)
            held = np.flatnonzero(fold >= 0)  # every row, or the held-out 20% of one split
            raw, fold, targets = raw[held], fold[held], targets[held]
            if len(folds) == 1:  # cross-fit between two artist-disjoint halves of the held-out rows
                fold = np.unique(groups[held].astype(str), return_inverse=True)[1] % 2
                if len(np.unique(fold)) < 2:
                    raise DataError("too few artists in the held-out split to cross-fit a temperature")
        except (StylegenError, ValueError) as exc:  # too few covers for the folds, or a fold's fit
            self.temperature_ = 1.0
            self.calibration_ = {"temperature": 1.0, "ece_before": None, "ece_after": None, "folds": 0,
                                 "min_confidence": None, "skipped": str(exc)}
        else:
            self.held_rows_, self.held_raw_, self.oof_targets_ = held, raw, targets
            self.target_classes_ = np.asarray(classes)
            self.temperature_ = fit_temperature(raw, targets, multi)
            self.oof_proba_ = cross_fitted(raw, targets, fold, multi)
            self.calibration_ = {
                "temperature": round(self.temperature_, 4),
                "ece_before": round(expected_calibration_error(raw, targets), 4),
                "ece_after": round(expected_calibration_error(self.oof_proba_, targets), 4),
                "folds": len(folds),
                "held_out_covers": int(len(held)),
                "min_confidence": min_confidence(precision_coverage(self.oof_proba_, targets, THRESHOLDS)),
            }
        self.classes_ = self.head_.classes_
        self.multi_label_ = multi
        self.n_features_in_ = X.shape[1]
        return self

    @property
    def skipped(self) -> bool:
        check_is_fitted(self)
        return "skipped" in self.calibration_

    def precision_coverage(self, thresholds: Sequence[float] = THRESHOLDS) -> list[dict[str, Any]] | None:
        """The precision / coverage table of the cross-fitted out-of-fold probabilities."""
        check_is_fitted(self)
        return None if self.oof_proba_ is None else precision_coverage(self.oof_proba_, self.oof_targets_, thresholds)

    def compile(self) -> CompiledCalibrated:
        check_is_fitted(self)
        return CompiledCalibrated(self.head_.compile(), self.temperature_)

    def predict_proba(self, X: np.ndarray, exclude: np.ndarray | None = None,
                      tabular: np.ndarray | None = None) -> np.ndarray:
        return self.compile().predict_proba(X, exclude=exclude, tabular=tabular)

    def predict(self, X: np.ndarray, exclude: np.ndarray | None = None, tabular: np.ndarray | None = None) -> Any:
        return decode_predictions(self.predict_proba(X, exclude, tabular), self.classes_, self.multi_label_)
