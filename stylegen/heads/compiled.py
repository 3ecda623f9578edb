"""Fitted heads reduced to what prediction needs: numpy arrays, and a faiss index for kNN.

Every head predicts through these classes (``head.compile().predict_proba(...)``), so there is
one implementation of the inference arithmetic. :func:`stylegen.heads.save_head` writes the
compiled form beside the pickle (``<head>.predict.npz``: plain arrays, no pickle) and the query
path loads that, without importing scikit-learn or torch (cold start: docs/benchmarks.md).

A compiled head has ``classes_``, ``multi_label``, ``n_features_in_`` and the heads' shared
calling contract ``predict_proba(X, exclude=None, tabular=None)`` (see :mod:`stylegen.heads`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from stylegen.errors import DataError
from stylegen.util.numeric import compact, matmul

Layers = list[tuple[np.ndarray, np.ndarray]]
FORMAT = 1


# ---- shared arithmetic ---------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -logits))


PROBA_CLIP = 1e-7  # probabilities are clipped to [PROBA_CLIP, 1 - PROBA_CLIP] before a log


def node_depths(parent: np.ndarray) -> np.ndarray:
    """Depth of every node from parent indices (-1 for a root); DataError on a cycle."""
    parent = np.asarray(parent, dtype=np.int64)
    depth = np.zeros(len(parent), dtype=np.int64)
    for start in range(len(parent)):
        node = start
        while parent[node] >= 0:
            node, depth[start] = int(parent[node]), depth[start] + 1
            if depth[start] > len(parent):
                raise DataError("label hierarchy has a cycle")
    return depth


def temperature_scale(proba: Any, temperature: float, multi_label: bool) -> np.ndarray:
    """Probabilities softened (``temperature`` > 1) or sharpened (< 1): single-label rows
    ``p_T ∝ exp(log(p) / T)``, renormalised; multi-label ``sigmoid(logit(p) / T)`` per label.
    ``p`` is clipped to [1e-7, 1 - 1e-7] first, so a 0 stays finite."""
    if not temperature > 0:
        raise DataError(f"temperature must be positive, got {temperature}")
    p = np.clip(np.asarray(proba, dtype=np.float64), PROBA_CLIP, 1 - PROBA_CLIP)
    if multi_label:
        return sigmoid((np.log(p) - np.log1p(-p)) / temperature)
    return softmax(np.log(p) / temperature)


def as_rows(X: Any, n_features: int | None = None) -> np.ndarray:
    """``X`` as a finite float32 2-D array (with ``n_features`` columns when given)."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise DataError(f"expected a 2-D array of vectors, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise DataError("vectors contain NaN or infinity")
    if n_features is not None and X.shape[1] != n_features:
        raise DataError(f"X has {X.shape[1]} dims, the head was fitted on {n_features}")
    return X


def weights_of(similarities: np.ndarray, valid: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of ``similarities / temperature`` over the valid neighbours of each row."""
    if temperature <= 0:
        raise DataError(f"temperature must be positive, got {temperature}")
    logits = np.where(valid, np.asarray(similarities, dtype=np.float64) / temperature, -np.inf)
    top = np.max(logits, axis=1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def vote(similarities: np.ndarray, neighbour_labels: np.ndarray, n_classes: int,
         temperature: float = 0.1) -> np.ndarray:
    """Class probabilities (n, n_classes) from (n, k) similarities and class indices.

    Neighbour weights are ``softmax(similarity / temperature)`` over the row's neighbours;
    a class gets the summed weight of the neighbours carrying it. Label -1 means "no
    neighbour" and is ignored; a row without neighbours gets the uniform distribution.
    """
    labels = np.asarray(neighbour_labels, dtype=np.int64)
    weights = weights_of(similarities, labels >= 0, temperature)
    proba = np.zeros((len(labels), n_classes))
    rows = np.broadcast_to(np.arange(len(labels))[:, None], labels.shape)
    np.add.at(proba, (rows[labels >= 0], labels[labels >= 0]), weights[labels >= 0])
    proba[~(labels >= 0).any(axis=1)] = 1.0 / n_classes
    return proba


def vote_multi(similarities: np.ndarray, neighbour_labels: np.ndarray, temperature: float = 0.1,
               valid: np.ndarray | None = None, prior: np.ndarray | None = None) -> np.ndarray:
    """Per-label probabilities (n, C) from (n, k) similarities and (n, k, C) 0/1 label sets.

    A label's probability is the summed weight of the neighbours carrying it. ``valid`` (n, k)
    marks real neighbours (default: all); rows without any get ``prior`` (default 1/C each).
    """
    labels = np.asarray(neighbour_labels, dtype=np.float64)
    valid = np.ones(labels.shape[:2], bool) if valid is None else np.asarray(valid, bool)
    proba = np.einsum("nk,nkc->nc", weights_of(similarities, valid, temperature), labels)
    proba = np.clip(proba, 0.0, 1.0)  # summed weights may exceed 1 by a rounding error
    empty = ~valid.any(axis=1)
    proba[empty] = np.full(labels.shape[2], 1.0 / labels.shape[2]) if prior is None else prior
    return proba


def align_columns(proba: np.ndarray, have: Sequence[Any], want: Sequence[Any]) -> np.ndarray:
    """Reorder ``proba``'s columns from classes ``have`` to ``want``; absent classes get 0."""
    position = {c: i for i, c in enumerate(have)}
    out = np.zeros((len(proba), len(want)))
    for j, c in enumerate(want):
        if c in position:
            out[:, j] = proba[:, position[c]]
    return out


def standardise_table(tabular: Any, columns: Sequence[str] | None, mean: np.ndarray,
                      scale: np.ndarray) -> np.ndarray:
    """A per-item numeric table, columns matched by name when it is a DataFrame, standardised
    with the training rows' ``mean`` and ``scale``."""
    if hasattr(tabular, "columns") and hasattr(tabular, "dtypes"):  # a pandas DataFrame
        import pandas as pd

        if columns is not None:
            missing = [c for c in columns if c not in tabular.columns]
            if missing:
                raise DataError(f"tabular lacks columns the head was fitted with: {missing}")
            tabular = tabular[list(columns)]
        bad = [str(c) for c, t in tabular.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
        if bad:
            raise DataError(f"tabular columns must be numeric; not numeric: {bad}")
    table = np.asarray(tabular, dtype=np.float64)
    if table.ndim != 2 or not np.isfinite(table).all():
        raise DataError("tabular must be a 2-D table of finite numbers (fill missing values)")
    if table.shape[1] != len(mean):
        raise DataError(f"tabular has {table.shape[1]} columns, head was fitted on {len(mean)}")
    return ((table - mean) / scale).astype(np.float32)


# ---- compiled heads ------------------------------------------------------------------
@dataclass
class CompiledLinear:
    """Standardise, then a logistic regression: softmax over classes (one row of ``coef`` for
    two classes: sigmoid), or one sigmoid per label when multi-label."""

    classes_: np.ndarray
    multi_label: bool
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (k, d)
    intercept: np.ndarray  # (k,)

    kind = "linear"

    @property
    def n_features_in_(self) -> int:
        return int(self.coef.shape[1])

    def predict_proba(self, X: Any, exclude: Any = None, tabular: Any = None) -> np.ndarray:
        X = as_rows(X, self.n_features_in_)
        z = matmul((X - self.mean) / self.scale, self.coef.T).astype(np.float64) + self.intercept
        if self.multi_label:
            return sigmoid(z)
        if z.shape[1] == 1:
            p = sigmoid(z[:, 0])
            return np.column_stack([1 - p, p])
        return softmax(z)


@dataclass
class CompiledMLP:
    """[image | ReLU layers(standardised table)] -> ReLU layers -> a last layer; the
    probabilities of the networks are averaged."""

    classes_: np.ndarray
    multi_label: bool
    mode: str
    n_features_in_: int
    networks: list[dict[str, Layers]]
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    tabular_columns: list[str] | None = None

    kind = "mlp"

    def inputs(self, X: Any, tabular: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.mode != "tabular" and X is None:
            raise DataError(f"mode {self.mode!r} needs image vectors X")
        if self.mode != "image" and tabular is None:
            raise DataError(f"mode {self.mode!r} needs a tabular table")
        table = (standardise_table(tabular, self.tabular_columns, self.mean, self.scale)
                 if self.mode != "image" else None)
        n = len(table) if X is None else len(X)
        image = (np.zeros((n, 0), np.float32) if self.mode == "tabular"
                 else as_rows(X, self.n_features_in_))
        table = np.zeros((n, 0), np.float32) if table is None else table
        if len(table) != n:
            raise DataError(f"tabular has {len(table)} rows for {n} image vectors")
        return image, table

    def predict_proba(self, X: Any, exclude: Any = None, tabular: Any = None) -> np.ndarray:
        image, table = self.inputs(X, tabular)
        probas = []
        for weights in self.networks:
            logits = forward(weights, image, table).astype(np.float64)
            probas.append(sigmoid(logits) if self.multi_label else softmax(logits))
        return np.mean(probas, axis=0)


def forward(weights: dict[str, Layers], image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Logits of one network. Dropout is the identity at inference, so the network is its
    Linear layers and ReLUs; a table branch without layers passes the table through."""
    branch = table  # 0 columns in image mode
    for w, b in weights["table"]:
        branch = np.maximum(matmul(branch, w.T) + b, 0)
    hidden = np.concatenate([image, branch], axis=1)
    *layers, (w_out, b_out) = weights["body"]
    for w, b in layers:
        hidden = np.maximum(matmul(hidden, w.T) + b, 0)
    return matmul(hidden, w_out.T) + b_out


@dataclass
class CompiledKNN:
    """Similarity-weighted vote of the ``k`` most cosine-similar fitted vectors (exact faiss
    inner-product search over L2-normalised rows)."""

    classes_: np.ndarray
    multi_label: bool
    index: Any  # faiss.Index over the fitted rows, normalised
    targets_: np.ndarray
    k: int
    temperature: float
    prior_: np.ndarray | None = None

    kind = "knn"

    @property
    def n_features_in_(self) -> int:
        return int(self.index.d)

    def kneighbors(self, X: Any, exclude: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, row ids) of up to ``k`` neighbours; missing ones have id -1.

        ``exclude[i]`` is a fitted row id that query ``i`` must not count as a neighbour
        (itself, when the query is in the fitted set), or -1 for none.
        """
        X = np.array(as_rows(X, self.n_features_in_), dtype=np.float32, order="C")
        faiss.normalize_L2(X)
        extra = 0 if exclude is None else 1
        sims, ids = self.index.search(X, min(self.k + extra, self.index.ntotal))
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

    def predict_proba(self, X: Any, exclude: Any = None, tabular: Any = None) -> np.ndarray:
        """Vote of the neighbours, leaving fitted row ``exclude[i]`` out of query ``i``'s vote."""
        sims, ids = self.kneighbors(X, exclude)
        valid = ids >= 0
        if self.multi_label:
            labels = np.where(valid[..., None], self.targets_[np.maximum(ids, 0)], 0.0)
            return vote_multi(sims, labels, self.temperature, valid, self.prior_)
        labels = np.where(valid, self.targets_[np.maximum(ids, 0)], -1)
        return vote(sims, labels, len(self.classes_), self.temperature)


@dataclass
class CompiledEnsemble:
    """``weight * p_head + (1 - weight) * p_knn``, columns aligned to ``classes_``."""

    classes_: np.ndarray
    multi_label: bool
    head_: Any
    knn_: Any
    weight_: float

    kind = "ensemble"

    @property
    def n_features_in_(self) -> int:
        return int(self.knn_.n_features_in_)

    def predict_proba(self, X: Any, exclude: Any = None, tabular: Any = None) -> np.ndarray:
        """Blended probabilities; both parts get the same arguments (the head contract)."""
        p_head, p_knn = (align_columns(_part_proba(part, X, exclude, tabular), part.classes_, self.classes_)
                         for part in (self.head_, self.knn_))
        return self.weight_ * p_head + (1 - self.weight_) * p_knn


@dataclass
class CompiledCalibrated:
    """Another compiled head's probabilities, temperature-scaled (:func:`temperature_scale`;
    fitted by :mod:`stylegen.heads.calibration`). ``inner`` answers every other question:
    ``classes_``, ``multi_label``, ``mode`` and the inputs are its own."""

    inner: Any
    temperature: float

    kind = "calibrated"

    @property
    def classes_(self) -> np.ndarray:
        return self.inner.classes_

    @property
    def multi_label(self) -> bool:
        return bool(self.inner.multi_label)

    @property
    def mode(self) -> str:
        return getattr(self.inner, "mode", "image")

    @property
    def n_features_in_(self) -> int:
        return int(self.inner.n_features_in_)

    @property
    def knn_(self) -> CompiledKNN:
        """The inner head's kNN part, as an ensemble names it (explanations list its voters,
        weighted by its own vote temperature); AttributeError when it has none."""
        return self.inner if isinstance(self.inner, CompiledKNN) else self.inner.knn_

    def predict_proba(self, X: Any, exclude: Any = None, tabular: Any = None) -> np.ndarray:
        """The inner head's probabilities (same arguments) at ``temperature``."""
        return temperature_scale(self.inner.predict_proba(X, exclude=exclude, tabular=tabular),
                                 self.temperature, self.multi_label)


@dataclass
class CompiledHierarchy:
    """Multi-label probabilities over a label tree: ``inner`` (one sigmoid per node) gives a
    root's probability and a child's probability given its parent; a child's probability is
    then ``p(parent) * p(child | parent)``, so no parent falls below any of its children.
    ``parent[j]`` is node ``j``'s parent column, -1 for a root (fitted by
    :mod:`stylegen.heads.hierarchy`). With ``knn`` (a multi-label kNN over the roots) a root's
    probability is first ``(1 - knn_weight) * inner + knn_weight * vote``; ``exclude`` reaches
    the vote."""

    inner: Any
    parent: np.ndarray  # (k,) int
    knn: Any = None
    knn_weight: float = 0.0

    kind = "hierarchy"

    def __post_init__(self) -> None:
        parent = np.asarray(self.parent, dtype=np.int64).reshape(-1)
        if len(parent) != len(self.inner.classes_) or (parent >= len(parent)).any():
            raise DataError(f"hierarchy has {len(parent)} parent entries for {len(self.inner.classes_)} classes")
        depth = node_depths(parent)
        self.parent = parent
        self._levels = [np.flatnonzero(depth == v) for v in range(1, int(depth.max(initial=0)) + 1)]

    @property
    def classes_(self) -> np.ndarray:
        return self.inner.classes_

    @property
    def multi_label(self) -> bool:
        return True

    @property
    def n_features_in_(self) -> int:
        return int(self.inner.n_features_in_)

    def predict_proba(self, X: Any, exclude: Any = None, tabular: Any = None) -> np.ndarray:
        """Root probabilities (``inner``'s, blended with the kNN vote when there is one);
        children multiplied down level by level."""
        proba = np.asarray(self.inner.predict_proba(X, exclude=exclude, tabular=tabular), dtype=np.float64)
        if self.knn is not None and self.knn_weight > 0:
            roots = np.flatnonzero(self.parent < 0)
            vote = align_columns(self.knn.predict_proba(X, exclude=exclude), self.knn.classes_, self.classes_[roots])
            proba[:, roots] = (1 - self.knn_weight) * proba[:, roots] + self.knn_weight * vote
        for nodes in self._levels:  # parents are final before their children are touched
            proba[:, nodes] *= proba[:, self.parent[nodes]]
        return proba


def _part_proba(part: Any, X: Any, exclude: Any, tabular: Any) -> np.ndarray:
    """A part's probabilities: stylegen heads take the shared contract's arguments, a plain
    scikit-learn estimator only ``X``."""
    if isinstance(part, CompiledLinear | CompiledMLP | CompiledKNN | CompiledEnsemble | CompiledCalibrated):
        return part.predict_proba(X, exclude=exclude, tabular=tabular)
    return part.predict_proba(X)


Compiled = CompiledLinear | CompiledMLP | CompiledKNN | CompiledEnsemble | CompiledCalibrated


# ---- files ---------------------------------------------------------------------------
def _flatten(head: Compiled, prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The head's scalars as JSON; its arrays into ``arrays`` under ``prefix`` (a kNN head's
    reference rows as float16 when they were rounded to it at fit)."""
    def put(name: str, value: np.ndarray) -> str:
        arrays[prefix + name] = np.asarray(value)
        return prefix + name

    meta: dict[str, Any] = {"kind": head.kind, "multi_label": bool(head.multi_label),
                            "classes": put("classes", np.asarray(head.classes_, dtype=str))}
    if isinstance(head, CompiledLinear):
        meta |= {k: put(k, getattr(head, k)) for k in ("mean", "scale", "coef", "intercept")}
    elif isinstance(head, CompiledMLP):
        meta |= {"mode": head.mode, "n_features_in": head.n_features_in_,
                 "tabular_columns": head.tabular_columns,
                 "table": None if head.mean is None else [put("mean", head.mean), put("scale", head.scale)],
                 "networks": [{part: [[put(f"n{i}.{part}{j}.w", w), put(f"n{i}.{part}{j}.b", b)]
                                      for j, (w, b) in enumerate(net[part])]
                               for part in ("table", "body")} for i, net in enumerate(head.networks)]}
    elif isinstance(head, CompiledKNN):
        meta |= {"k": int(head.k), "temperature": float(head.temperature),
                 "vectors": put("vectors", compact(reference_vectors(head.index))),
                 "targets": put("targets", head.targets_),
                 "prior": None if head.prior_ is None else put("prior", head.prior_)}
    elif isinstance(head, CompiledEnsemble):
        meta |= {"weight": float(head.weight_), "head": _flatten(head.head_, prefix + "head.", arrays),
                 "knn": _flatten(head.knn_, prefix + "knn.", arrays)}
    elif isinstance(head, CompiledCalibrated):
        meta |= {"temperature": float(head.temperature), "inner": _flatten(head.inner, prefix + "inner.", arrays)}
    elif isinstance(head, CompiledHierarchy):
        meta |= {"parent": put("parent", head.parent), "inner": _flatten(head.inner, prefix + "inner.", arrays),
                 "knn": None if head.knn is None else _flatten(head.knn, prefix + "knn.", arrays),
                 "knn_weight": float(head.knn_weight)}
    else:
        raise DataError(f"cannot save a {type(head).__name__}")
    return meta


def _restore(meta: dict[str, Any], arrays: Any) -> Compiled:
    classes, multi = arrays[meta["classes"]].astype(object), bool(meta["multi_label"])
    kind = meta["kind"]
    if kind == "linear":
        return CompiledLinear(classes, multi, *(arrays[meta[k]] for k in ("mean", "scale", "coef", "intercept")))
    if kind == "mlp":
        table = meta["table"]
        nets = [{part: [(arrays[w], arrays[b]) for w, b in layers] for part, layers in net.items()}
                for net in meta["networks"]]
        return CompiledMLP(classes, multi, meta["mode"], int(meta["n_features_in"]), nets,
                           None if table is None else arrays[table[0]],
                           None if table is None else arrays[table[1]], meta["tabular_columns"])
    if kind == "knn":
        # heads saved before the rows were kept plain hold a serialised faiss Flat index (data, not code)
        index = flat_index(arrays[meta["vectors"]]) if "vectors" in meta else faiss.deserialize_index(arrays[meta["index"]])
        return CompiledKNN(classes, multi, index,
                           arrays[meta["targets"]], int(meta["k"]), float(meta["temperature"]),
                           None if meta["prior"] is None else arrays[meta["prior"]])
    if kind == "ensemble":
        return CompiledEnsemble(classes, multi, _restore(meta["head"], arrays),
                                _restore(meta["knn"], arrays), float(meta["weight"]))
    if kind == "calibrated":
        return CompiledCalibrated(_restore(meta["inner"], arrays), float(meta["temperature"]))
    if kind == "hierarchy":
        knn = None if meta.get("knn") is None else _restore(meta["knn"], arrays)
        return CompiledHierarchy(_restore(meta["inner"], arrays), arrays[meta["parent"]], knn,
                                 float(meta.get("knn_weight", 0.0)))
    raise DataError(f"unknown compiled head kind {kind!r}")


def saveable(head: Any) -> bool:
    """Whether ``head`` is made only of compiled parts (an ensemble may hold any estimator)."""
    if isinstance(head, CompiledEnsemble):
        return saveable(head.head_) and saveable(head.knn_)
    if isinstance(head, CompiledCalibrated):
        return saveable(head.inner)
    if isinstance(head, CompiledHierarchy):
        return saveable(head.inner) and (head.knn is None or saveable(head.knn))
    return isinstance(head, CompiledLinear | CompiledMLP | CompiledKNN)


def reference_vectors(index: Any) -> np.ndarray:
    """The rows of an exact inner-product faiss index, as float32."""
    if not isinstance(index, faiss.IndexFlat):
        raise DataError(f"a kNN head keeps an exact (Flat) index, not {type(index).__name__}")
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d).copy()


def flat_index(vectors: np.ndarray) -> Any:
    """An exact inner-product faiss index over ``vectors`` (rows as saved: already normalised)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def save_compiled(head: Compiled, path: str | Path) -> None:
    """Write ``head`` as one ``.npz`` of plain arrays (its layout in the ``meta`` entry).

    A kNN head's reference vectors are stored as plain rows (float16 when rounded to it at
    fit) and its faiss index rebuilt on load: nothing but arrays is deserialised."""
    arrays: dict[str, np.ndarray] = {}
    meta = {"format": FORMAT, **_flatten(head, "", arrays)}
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def load_compiled(path: str | Path) -> Compiled:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise DataError(f"compiled head {path} has format {meta.get('format')}, not {FORMAT}")
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read compiled head {path}: {exc}") from None
    return _restore(meta, arrays)

