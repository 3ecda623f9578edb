"""A multi-label head over a label hierarchy (Discogs genres and ``Genre---Style`` styles).

Where :class:`~stylegen.heads.hierarchical.HierarchicalHead` fits fine genres and only rolls
their probabilities up afterwards, :class:`HierarchyHead` trains every node of the tree:

* labels are closed upwards (``rock---hard rock`` implies ``rock``), so a genre is trained on
  the covers of all its styles, and a genre label alone is a genre-level label;
* a root (genre) gets a class-balanced logistic regression on all covers; a child (style)
  gets one on its parent's covers only, giving ``p(style | genre)``;
* a node with few examples is shrunk toward its base rate within its parent: its logit is
  ``w * z + logit(prior)`` with ``w = n / (n + shrink)`` (``z``: the balanced regression's
  decision value, ``prior``: the node's smoothed share of its parent's covers). With fewer
  than ``min_fit`` examples ``w = 0``: ``p(style) = prior * p(genre)`` follows its genre;
* optionally (``knn_weight``, default 0.2) a root's probability is blended with a kNN vote of
  the fitted covers' roots (cosine, ``k`` neighbours, softmax ``temperature``);
* ``p(node) = p(parent) * p(node | parent)``, so a parent is never below any of its children.

Features are centred and divided by one number (their RMS standard deviation), not per
dimension: the PCA dimensions' own scales act as a prior (on the Discogs covers per-dimension
standardisation cost styles 0.04-0.05 macro-AUROC; docs/results_discogs.md). The fitted head
compiles to plain arrays (:class:`~stylegen.heads.compiled.CompiledHierarchy`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from stylegen.errors import DataError
from stylegen.heads.compiled import CompiledHierarchy, CompiledLinear, as_rows, node_depths
from stylegen.heads.knn import KNNHead
from stylegen.sources.labels import (
    STYLE_SEP,
    Taxonomy,
    decode_predictions,
    label_closure,
    label_parent,
)

LEVEL_NAMES = ("genre", "style")


def level_label(depth: int) -> str:
    """0 -> "genre", 1 -> "style", deeper -> "level2", ..."""
    return LEVEL_NAMES[depth] if depth < len(LEVEL_NAMES) else f"level{depth}"


def _logit(p: np.ndarray | float) -> np.ndarray:
    return np.log(p) - np.log1p(-np.asarray(p))


class HierarchyHead(ClassifierMixin, BaseEstimator):
    """One sigmoid per taxonomy node; a child's is conditional on its parent (module doc).

    ``taxonomy``: a :class:`~stylegen.sources.labels.Taxonomy`, ``"discogs"`` (the packaged
    Discogs list), or None: ``Genre---Style`` labels then sit under ``Genre`` and every other
    label is a root. ``C`` / ``C_child``: inverse L2 strengths of the root / child regressions
    on the scaled features. ``shrink``: examples at which a node's own evidence gets half the
    weight; ``min_fit``: fewer positive (or negative) examples than this and a node is its
    prior times its parent. ``knn_weight``: share of a kNN vote (``k``, ``temperature``) in
    the roots' probabilities (0: none); ``exclude`` in ``predict_proba`` reaches that vote.
    """

    multi_label = True

    def __init__(self, taxonomy: Taxonomy | str | None = None, C: float = 0.002,
                 C_child: float = 0.0006, shrink: float = 10.0, min_fit: int = 3,
                 knn_weight: float = 0.2, k: int = 50, temperature: float = 0.1,
                 max_iter: int = 300) -> None:
        self.taxonomy = taxonomy
        self.C = C
        self.C_child = C_child
        self.shrink = shrink
        self.min_fit = min_fit
        self.knn_weight = knn_weight
        self.k = k
        self.temperature = temperature
        self.max_iter = max_iter

    def _taxonomy(self) -> Taxonomy | None:
        if self.taxonomy is None or isinstance(self.taxonomy, Taxonomy):
            return self.taxonomy
        return Taxonomy.named(self.taxonomy)

    def _structure(self, label_lists: Sequence[Sequence[str]]) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
        """(closed label lists, sorted classes, parent index per class; -1 for a root)."""
        tax = self._taxonomy()
        if tax is None:  # the labels' own "genre---style" spelling gives the tree
            tree: dict[str, list[str]] = {}
            for label in {str(c) for labels in label_lists for c in labels}:
                genre, sep, _ = label.partition(STYLE_SEP)
                tree.setdefault(genre if sep else label, [])
                if sep:
                    tree[genre].append(label)
            tax = Taxonomy.from_tree(tree)
        closed = label_closure(label_lists, tax, keep_unknown=True)
        classes = sorted({c for labels in closed for c in labels})
        position = {c: i for i, c in enumerate(classes)}
        parent = np.array([position.get(label_parent(c, tax) or "", -1) for c in classes], dtype=np.int64)
        self.unknown_ = [c for c in classes if c not in tax]
        return closed, np.asarray(classes, dtype=object), parent

    def fit(self, X: Any, y: Any, tabular: Any = None, groups: Any = None) -> HierarchyHead:
        """``y``: a label list per row. ``tabular`` and ``groups`` are accepted and unused."""
        X = as_rows(X).astype(np.float64)
        rows = list(y)
        if any(isinstance(r, str) or not hasattr(r, "__iter__") for r in rows):
            raise DataError("HierarchyHead needs a list of labels per row: [['rock---punk'], ...]")
        if len(rows) != len(X):
            raise DataError(f"got {len(rows)} label lists for {len(X)} feature rows")
        if self.shrink < 0 or self.min_fit < 1 or not 0 <= self.knn_weight <= 1:
            raise DataError("shrink must be >= 0, min_fit >= 1 and knn_weight in [0, 1]")
        closed, self.classes_, self.parent_ = self._structure(rows)
        if len(self.classes_) < 2:
            raise DataError(f"need at least 2 classes to fit, got {list(self.classes_)}")
        column = {c: j for j, c in enumerate(self.classes_)}
        Y = np.zeros((len(X), len(self.classes_)), dtype=bool)
        for i, labels in enumerate(closed):
            Y[i, [column[c] for c in labels]] = True
        self.mean_ = X.mean(axis=0)
        self.scale_ = float(np.sqrt(np.mean(X.var(axis=0)))) or 1.0
        Z = (X - self.mean_) / self.scale_
        k, d = Y.shape[1], X.shape[1]
        coef, intercept = np.zeros((k, d)), np.zeros(k)
        self.support_ = Y.sum(axis=0)
        self.weight_ = np.zeros(k)
        # hundreds of small fits: one BLAS thread (more only spin-wait on a busy 2-core box:
        # 66 s instead of 3.5 s for the Discogs covers)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            for j in range(k):
                rows_j = Y[:, self.parent_[j]] if self.parent_[j] >= 0 else np.ones(len(Y), bool)
                target = Y[rows_j, j]
                n_pos, n_neg = int(target.sum()), int((~target).sum())
                prior = (n_pos + 0.5) / (len(target) + 1.0)
                intercept[j] = _logit(prior)
                if min(n_pos, n_neg) < self.min_fit:
                    continue
                w = n_pos / (n_pos + self.shrink) if self.shrink > 0 else 1.0
                model = LogisticRegression(C=self.C if self.parent_[j] < 0 else self.C_child,
                                           class_weight="balanced", max_iter=self.max_iter)
                model.fit(Z[rows_j], target)
                coef[j] = w * model.coef_[0]
                intercept[j] += w * float(model.intercept_[0])
                self.weight_[j] = w
        self.coef_, self.intercept_ = coef, intercept
        self.n_features_in_ = d
        self.knn_ = None
        if self.knn_weight > 0:
            roots = self.classes_[self.parent_ < 0]
            root_lists = [[str(c) for c in roots[Y[i][self.parent_ < 0]]] for i in range(len(Y))]
            if len({c for labels in root_lists for c in labels}) >= 2:
                self.knn_ = KNNHead(self.k, self.temperature, multi_label=True).fit(X, root_lists)
        depth = node_depths(self.parent_)
        self.levels_ = {level_label(int(v)): [str(c) for c in self.classes_[depth == v]]
                        for v in np.unique(depth)}
        return self

    def compile(self) -> CompiledHierarchy:
        """Node logits as one linear layer (coefficients scaled back to the raw features);
        children multiplied into their parents by :class:`CompiledHierarchy`."""
        check_is_fitted(self)
        d = self.n_features_in_
        inner = CompiledLinear(self.classes_, True, self.mean_.copy(), np.full(d, self.scale_),
                               self.coef_.copy(), self.intercept_.copy())
        knn = None if self.knn_ is None else self.knn_.compile()
        return CompiledHierarchy(inner, self.parent_.astype(np.int64), knn,
                                 float(self.knn_weight) if knn is not None else 0.0)

    @property
    def parents_(self) -> dict[str, str | None]:
        """``{class: parent class or None}``."""
        check_is_fitted(self)
        return {str(c): (str(self.classes_[p]) if p >= 0 else None)
                for c, p in zip(self.classes_, self.parent_)}

    def predict_proba(self, X: Any, exclude: Any = None, tabular: Any = None) -> np.ndarray:
        """Per-node probabilities (columns in ``classes_`` order), each parent >= its children.
        ``exclude[i]``: the fitted row that query ``i`` is (-1: none), left out of its kNN
        vote; ``tabular`` (shared head contract) is unused."""
        return self.compile().predict_proba(X, exclude=exclude)

    def predict(self, X: Any, exclude: Any = None, tabular: Any = None,
                threshold: float = 0.5) -> list[list[str]]:
        return decode_predictions(self.predict_proba(X), self.classes_, True, threshold)
