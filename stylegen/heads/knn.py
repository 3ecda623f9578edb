"""k-nearest-neighbour head: a softmax-weighted vote of the most similar fitted covers."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_array, check_is_fitted

from stylegen.errors import DataError
from stylegen.heads.compiled import CompiledKNN, vote, vote_multi
from stylegen.sources.labels import decode_predictions, encode_targets
from stylegen.util.numeric import half_exact

__all__ = ["KNNHead", "vote", "vote_multi"]


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
        # reference rows rounded to float16 values: they store in half the bytes (head sets,
        # model bundles) and every vote is computed from exactly what is stored
        self.index_.add(np.ascontiguousarray(half_exact(X)))
        self.n_features_in_ = X.shape[1]
        self.prior_ = self.targets_.mean(0) if self.multi_label else None
        return self

    def compile(self) -> CompiledKNN:
        """The fitted state prediction needs (shares this head's faiss index)."""
        check_is_fitted(self)
        return CompiledKNN(self.classes_, self.multi_label, self.index_, self.targets_, self.k,
                           self.temperature, self.prior_)

    def kneighbors(
        self, X: np.ndarray, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, row ids) of up to ``k`` neighbours; missing ones have id -1.

        ``exclude[i]`` is a fitted row id that query ``i`` must not count as a neighbour
        (itself, when the query is in the fitted set), or -1 for none.
        """
        return self.compile().kneighbors(X, exclude)

    def predict_proba(self, X: np.ndarray, exclude: np.ndarray | None = None,
                      tabular: np.ndarray | None = None) -> np.ndarray:
        """Vote of the neighbours, leaving fitted row ``exclude[i]`` out of query ``i``'s vote."""
        return self.compile().predict_proba(X, exclude)

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
