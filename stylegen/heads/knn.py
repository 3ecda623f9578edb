"""k-nearest-neighbour head: a softmax-weighted vote of the most similar fitted covers."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_array, check_is_fitted

from stylegen.errors import DataError
from stylegen.labels import decode_predictions, encode_targets


def _weights(similarities: np.ndarray, valid: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of ``similarities / temperature`` over the valid neighbours of each row."""
    if temperature <= 0:
        raise DataError(f"temperature must be positive, got {temperature}")
    logits = np.where(valid, np.asarray(similarities, dtype=np.float64) / temperature, -np.inf)
    top = np.max(logits, axis=1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def vote(
    similarities: np.ndarray,
    neighbour_labels: np.ndarray,
    n_classes: int,
    temperature: float = 0.1,
) -> np.ndarray:
    """Class probabilities (n, n_classes) from (n, k) similarities and class indices.

    Neighbour weights are ``softmax(similarity / temperature)`` over the row's neighbours;
    a class gets the summed weight of the neighbours carrying it. Label -1 means "no
    neighbour" and is ignored; a row without neighbours gets the uniform distribution.
    """
    labels = np.asarray(neighbour_labels, dtype=np.int64)
    weights = _weights(similarities, labels >= 0, temperature)
    proba = np.zeros((len(labels), n_classes))
    rows = np.broadcast_to(np.arange(len(labels))[:, None], labels.shape)
    np.add.at(proba, (rows[labels >= 0], labels[labels >= 0]), weights[labels >= 0])
    proba[~(labels >= 0).any(axis=1)] = 1.0 / n_classes
    return proba


def vote_multi(
    similarities: np.ndarray,
    neighbour_labels: np.ndarray,
    temperature: float = 0.1,
    valid: np.ndarray | None = None,
    prior: np.ndarray | None = None,
) -> np.ndarray:
    """Per-label probabilities (n, C) from (n, k) similarities and (n, k, C) 0/1 label sets.

    A label's probability is the summed weight of the neighbours carrying it. ``valid`` (n, k)
    marks real neighbours (default: all); rows without any get ``prior`` (default 1/C each).
    """
    labels = np.asarray(neighbour_labels, dtype=np.float64)
    valid = np.ones(labels.shape[:2], bool) if valid is None else np.asarray(valid, bool)
    proba = np.einsum("nk,nkc->nc", _weights(similarities, valid, temperature), labels)
    proba = np.clip(proba, 0.0, 1.0)  # summed weights may exceed 1 by a rounding error
    empty = ~valid.any(axis=1)
    proba[empty] = np.full(labels.shape[2], 1.0 / labels.shape[2]) if prior is None else prior
    return proba


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """A float32 copy with L2-normalised rows (a no-op on already normalised vectors)."""
    X = np.array(check_array(X, dtype=np.float32), dtype=np.float32, order="C")
    faiss.normalize_L2(X)
    return X


class KNNHead(ClassifierMixin, BaseEstimator):
    """Vote of the ``k`` most cosine-similar fitted vectors (exact faiss inner-product search).

    Vectors are L2-normalised on the way in, so similarities are cosines in [-1, 1] and
    ``temperature`` has the same meaning for any feature extractor.
    """

    def __init__(self, k: int = 10, temperature: float = 0.1, multi_label: bool = False) -> None:
        self.k = k
        self.temperature = temperature
        self.multi_label = multi_label

    def fit(self, X: np.ndarray, y: Any) -> KNNHead:
        X = _unit_rows(X)
        if self.k < 1:
            raise DataError(f"k must be at least 1, got {self.k}")
        self.targets_, self.classes_ = encode_targets(y, self.multi_label, len(X))
        self.index_ = faiss.IndexFlatIP(X.shape[1])
        self.index_.add(X)
        self.n_features_in_ = X.shape[1]
        self.prior_ = self.targets_.mean(0) if self.multi_label else None
        return self

    def kneighbors(
        self, X: np.ndarray, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, row ids) of up to ``k`` neighbours; missing ones have id -1.

        ``exclude[i]`` is a fitted row id that query ``i`` must not count as a neighbour
        (itself, when the query is in the fitted set), or -1 for none.
        """
        check_is_fitted(self)
        X = _unit_rows(X)
        if X.shape[1] != self.n_features_in_:
            raise DataError(f"queries have {X.shape[1]} dims, the head {self.n_features_in_}")
        extra = 0 if exclude is None else 1
        sims, ids = self.index_.search(X, min(self.k + extra, self.index_.ntotal))
        drop = ids < 0
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
            if len(exclude) != len(X):
                raise DataError(f"exclude has {len(exclude)} entries for {len(X)} queries")
            drop |= ids == exclude[:, None]
        order = np.argsort(drop, axis=1, kind="stable")[:, : self.k]  # kept neighbours first
        sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
        dropped = np.take_along_axis(drop, order, 1)
        return np.where(dropped, -np.inf, sims), np.where(dropped, -1, ids)

    def predict_proba(self, X: np.ndarray, exclude: np.ndarray | None = None,
                      tabular: np.ndarray | None = None) -> np.ndarray:
        """Vote of the neighbours, leaving fitted row ``exclude[i]`` out of query ``i``'s vote."""
        sims, ids = self.kneighbors(X, exclude)
        valid = ids >= 0
        if self.multi_label:
            labels = np.where(valid[..., None], self.targets_[np.maximum(ids, 0)], 0.0)
            return vote_multi(sims, labels, self.temperature, valid, self.prior_)
        labels = np.where(valid, self.targets_[np.maximum(ids, 0)], -1)
        return vote(sims, labels, len(self.classes_), self.temperature)

    def predict(self, X: np.ndarray, exclude: np.ndarray | None = None,
                tabular: np.ndarray | None = None) -> Any:
        return decode_predictions(self.predict_proba(X, exclude), self.classes_, self.multi_label)

    # faiss indexes are SWIG objects: pickle (joblib, deepcopy) them as serialised bytes.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        if "index_" in state:
            state["index_"] = faiss.serialize_index(state["index_"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "index_" in state:
            state = {**state, "index_": faiss.deserialize_index(state["index_"])}
        super().__setstate__(state)
