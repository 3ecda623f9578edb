"""A small MLP head; optionally fed a per-item numeric table (image, tabular or hybrid).

Training runs in torch (:mod:`stylegen.heads._mlp_torch`, imported by ``fit`` only); the fitted
weights are kept as numpy arrays, so loading a head and predicting never import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from stylegen.errors import DataError
from stylegen.heads.compiled import CompiledMLP, standardise_table
from stylegen.sources.labels import decode_predictions, encode_targets, grouped_split

MODES = ("image", "tabular", "hybrid")


class MLPHead(ClassifierMixin, BaseEstimator):
    """MLP trained with AdamW and early stopping on a stratified validation split.

    The best epoch's weights (lowest validation loss) are restored. Training is seeded by
    ``random_state`` without touching torch's global RNG, so two fits give identical
    probabilities. ``mode`` picks the inputs: "image" (X), "tabular" (the ``tabular`` table,
    X may be None) or "hybrid" (X joined with an MLP branch of sizes ``tabular_hidden`` over the
    table). The table is standardised with the mean and scale of the rows given to ``fit``.
    ``num_threads`` caps torch's CPU threads while fitting (None: torch's setting); 1 is
    fastest for small heads on a busy machine. ``n_models`` > 1 trains that
    many networks (seeds ``random_state + k``, each with its own validation split) and
    averages their probabilities; ``history_`` is that of the first. Fitted weights live in
    ``weights_`` (one dict of numpy (weight, bias) layers per network), so a saved head loads
    and predicts without torch; heads saved with torch networks are converted on load.
    ``fit(..., groups=...)`` (e.g. artists) makes the early-stopping split group-disjoint; on
    the covers that stopped training too early (5-fold CV macro-F1 0.413 vs 0.451), so
    ``stylegen train`` does not pass it.
    """

    def __init__(self, hidden: Sequence[int] = (512,), dropout: float = 0.3,
                 weight_decay: float = 1e-4, lr: float = 1e-3, batch_size: int = 128,
                 max_epochs: int = 200, patience: int = 15, val_fraction: float = 0.15,
                 multi_label: bool = False, class_weight: str | None = "balanced",
                 random_state: int = 0, device: str = "cpu", mode: str = "image",
                 tabular_hidden: Sequence[int] = (64,), num_threads: int | None = None,
                 n_models: int = 1) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.multi_label = multi_label
        self.class_weight = class_weight
        self.random_state = random_state
        self.device = device
        self.mode = mode
        self.tabular_hidden = tabular_hidden
        self.num_threads = num_threads
        self.n_models = n_models

    def _training_inputs(self, X: Any, tabular: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validated (image, standardised table) float32 arrays of the training rows (unused
        ones have 0 columns); sets the table's columns, mean and scale."""
        if self.mode not in MODES:
            raise DataError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "image" and tabular is not None:
            if isinstance(tabular, pd.DataFrame):
                self.tabular_columns_ = [str(c) for c in tabular.columns]
            raw = standardise_table(tabular, None, np.zeros(np.shape(tabular)[-1]),
                                    np.ones(np.shape(tabular)[-1])).astype(np.float64)
            self.mean_ = raw.mean(axis=0)
            scale = raw.std(axis=0)
            self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        n_features = None if X is None or self.mode == "tabular" else np.shape(X)[-1]
        self.n_features_in_ = 0 if n_features is None else int(n_features)
        return self.compile(unfitted=True).inputs(X, tabular)

    def fit(self, X: Any, y: Any, tabular: Any = None, groups: Any = None) -> MLPHead:
        from stylegen.heads import _mlp_torch

        for stale in ("mean_", "scale_", "tabular_columns_"):  # from an earlier fit
            self.__dict__.pop(stale, None)
        image, table = self._training_inputs(X, tabular)
        targets, self.classes_ = encode_targets(y, self.multi_label, len(image))
        if not isinstance(self.n_models, int | np.integer) or self.n_models < 1:
            raise DataError(f"n_models must be a positive integer, got {self.n_models!r}")
        self.weights_, self.histories_ = [], []
        for seed in range(self.random_state, self.random_state + self.n_models):
            train, val = grouped_split(targets, self.val_fraction, seed, groups)
            weights, history = _mlp_torch.fit_net(self, image, table, targets,
                                                  len(self.classes_), train, val, seed)
            self.weights_.append(weights)
            self.histories_.append(history)
            if seed == self.random_state:
                has_val = len(val) > 0
        self.history_ = self.histories_[0]
        self.n_epochs_ = len(self.history_)
        self.best_epoch_ = int(np.argmin(self.history_)) if has_val else self.n_epochs_ - 1
        return self

    def compile(self, unfitted: bool = False) -> CompiledMLP:
        """The fitted networks as numpy layers, with the table's columns and standardisation."""
        if not unfitted:
            check_is_fitted(self)
        return CompiledMLP(getattr(self, "classes_", np.array([])), self.multi_label, self.mode,
                           self.n_features_in_, getattr(self, "weights_", []),
                           getattr(self, "mean_", None), getattr(self, "scale_", None),
                           getattr(self, "tabular_columns_", None))

    def predict_proba(self, X: Any, exclude: Any = None, tabular: Any = None) -> np.ndarray:
        """Class probabilities; ``exclude`` (shared head contract) has no effect on an MLP."""
        return self.compile().predict_proba(X, tabular=tabular)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Heads pickled with torch networks (``nets_``/``net_``) get numpy weights."""
        nets = state.pop("nets_", None) or ([state["net_"]] if "net_" in state else None)
        state.pop("net_", None)
        if nets is not None and "weights_" not in state:
            from stylegen.heads import _mlp_torch

            state["weights_"] = [_mlp_torch.to_weights(net) for net in nets]
        self.__dict__.update(state)

    def predict(self, X: Any, exclude: Any = None, tabular: Any = None) -> Any:
        return decode_predictions(self.predict_proba(X, tabular=tabular), self.classes_, self.multi_label)
