"""Blend of a parametric head and a kNN head: ``p = w * p_head + (1 - w) * p_knn``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_array, check_is_fitted

from stylegen.errors import DataError
from stylegen.heads.compiled import CompiledEnsemble, align_columns
from stylegen.sources.labels import decode_predictions, encode_targets, grouped_split


def log_loss(proba: np.ndarray, targets: np.ndarray, multi_label: bool) -> float:
    """Mean negative log-likelihood: of the true class, or per label (binary) if multi-label."""
    p = np.clip(proba, 1e-7, 1 - 1e-7)
    if multi_label:
        return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(p)), targets])))


class EnsembleHead(ClassifierMixin, BaseEstimator):
    """Weighted average of ``head`` and ``knn`` probabilities.

    ``fit`` holds out a stratified ``val_fraction`` of the rows (group-disjoint when ``groups``,
    e.g. artists, are given), fits clones of both heads on the rest and picks the weight in
    ``weights`` with the lowest validation **log-loss** (ties:
    the smallest weight); both heads are then refitted on all rows. ``weight_`` is the head's
    share, ``val_losses_`` the loss of every candidate weight.
    """

    def __init__(self, head: Any, knn: Any, weights: Sequence[float] = np.linspace(0, 1, 11),
                 val_fraction: float = 0.2, random_state: int = 0) -> None:
        self.head = head
        self.knn = knn
        self.weights = weights
        self.val_fraction = val_fraction
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any, groups: Any = None) -> EnsembleHead:
        X = check_array(X, dtype=np.float32)
        self.multi_label_ = bool(getattr(self.head, "multi_label", False))
        if bool(getattr(self.knn, "multi_label", False)) != self.multi_label_:
            raise DataError("head and knn must agree on multi_label")
        weights = np.asarray(self.weights, dtype=np.float64)
        if weights.ndim != 1 or not len(weights) or ((weights < 0) | (weights > 1)).any():
            raise DataError("weights must be a non-empty list of numbers in [0, 1]")
        targets, self.classes_ = encode_targets(y, self.multi_label_, len(X))
        train, val = grouped_split(targets, self.val_fraction, self.random_state, groups)
        if not len(val):
            raise DataError(f"val_fraction={self.val_fraction} leaves no validation rows")
        y_list = list(y)
        fitted = [clone(est).fit(X[train], _take(y_list, train)) for est in (self.head, self.knn)]
        p_head, p_knn = (align_columns(est.predict_proba(X[val]), est.classes_, self.classes_)
                         for est in fitted)
        self.val_losses_ = np.array([log_loss(w * p_head + (1 - w) * p_knn, targets[val],
                                              self.multi_label_) for w in weights])
        self.weight_ = float(weights[int(np.argmin(self.val_losses_))])
        self.head_ = clone(self.head).fit(X, y)
        self.knn_ = clone(self.knn).fit(X, y)
        self.n_features_in_ = X.shape[1]
        return self

    def compile(self) -> CompiledEnsemble:
        """Both parts compiled (a part without ``compile`` is kept as it is)."""
        check_is_fitted(self)
        parts = [getattr(est, "compile", lambda e=est: e)() for est in (self.head_, self.knn_)]
        return CompiledEnsemble(self.classes_, self.multi_label_, *parts, self.weight_)

    def predict_proba(self, X: np.ndarray, exclude: np.ndarray | None = None,
                      tabular: np.ndarray | None = None) -> np.ndarray:
        """Blended probabilities; both parts get the same arguments (the head contract)."""
        return self.compile().predict_proba(X, exclude=exclude, tabular=tabular)

    def predict(self, X: np.ndarray, exclude: np.ndarray | None = None,
                tabular: np.ndarray | None = None) -> Any:
        return decode_predictions(self.predict_proba(X, exclude, tabular), self.classes_, self.multi_label_)


def _take(y: list[Any], rows: np.ndarray) -> Any:
    """Rows of a label list, as an array for single labels and a list of lists otherwise."""
    picked = [y[i] for i in rows]
    if picked and isinstance(picked[0], (list, tuple, set, np.ndarray)):
        return picked
    return np.asarray(picked, dtype=object)
