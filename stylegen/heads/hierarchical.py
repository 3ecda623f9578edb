"""Predictions at every level of a genre taxonomy from one head fitted on fine genres."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

from stylegen.errors import DataError
from stylegen.sources.labels import Taxonomy


def level_name(level: int) -> str:
    """0 -> "top", 1 -> "level1", ...; the base head's own classes are "fine"."""
    return "top" if level == 0 else f"level{level}"


class HierarchicalHead(ClassifierMixin, BaseEstimator):
    """Fits ``base`` (single-label) on fine genres; coarser levels are sums of their children.

    A coarser class's probability is the sum of its descendants' (``Taxonomy.roll_up``), so
    every level is a distribution and the levels agree with each other by construction.
    Extra keyword arguments of ``fit`` / ``predict_*`` (e.g. ``tabular``) go to ``base``.
    """

    def __init__(self, base: Any, taxonomy: Taxonomy) -> None:
        self.base = base
        self.taxonomy = taxonomy

    def fit(self, X: Any, y: Any, **fit_params: Any) -> HierarchicalHead:
        if getattr(self.base, "multi_label", False):
            raise DataError("HierarchicalHead needs a single-label base head")
        labels = np.asarray(y, dtype=object)
        unknown = sorted({str(g) for g in labels if g not in self.taxonomy})
        if unknown:
            raise DataError(f"labels not in the taxonomy (map them first): {unknown[:10]}")
        self.base_ = clone(self.base).fit(X, labels, **fit_params)
        self.classes_ = self.base_.classes_
        depths = [self.taxonomy.level_of(c) for c in self.classes_]
        self.levels_ = [level_name(level) for level in range(max(depths))] + ["fine"]
        return self

    def compile(self) -> Any:
        """The base head's compiled form (levels are rolled up from its fine genres)."""
        check_is_fitted(self)
        return self.base_.compile()

    def predict_proba(self, X: Any, **kwargs: Any) -> np.ndarray:
        check_is_fitted(self)
        return self.base_.predict_proba(X, **kwargs)

    def predict(self, X: Any, **kwargs: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X, **kwargs), axis=1)]

    def predict_levels(self, X: Any, **kwargs: Any) -> dict[str, tuple[np.ndarray, list[str]]]:
        """``{"top": (proba, classes), "level1": ..., "fine": ...}``, coarse to fine."""
        proba = self.predict_proba(X, **kwargs)
        classes = [str(c) for c in self.classes_]
        out = {name: self.taxonomy.roll_up(proba, classes, level)
               for level, name in enumerate(self.levels_[:-1])}
        out["fine"] = (proba, classes)
        return out

    def predict_paths(
        self, X: Any, top: int = 3, **kwargs: Any
    ) -> list[list[tuple[list[str], float]]]:
        """Per row, the ``top`` most probable fine genres as (root-first path, probability)."""
        proba = self.predict_proba(X, **kwargs)
        best = np.argsort(-proba, axis=1, kind="stable")[:, :top]
        return [[(self.taxonomy.path(self.classes_[j]), float(row[j])) for j in picks]
                for row, picks in zip(proba, best)]
