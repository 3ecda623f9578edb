"""Logistic-regression head with the regularisation strength chosen by cross-validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, check_is_fitted

from stylegen.errors import DataError
from stylegen.heads.compiled import CompiledLinear
from stylegen.sources.labels import decode_predictions, encode_targets


class LinearHead(ClassifierMixin, BaseEstimator):
    """Class-balanced logistic regression; C picked from ``Cs`` by ``cv``-fold log-loss (one
    value in ``Cs``: that C, no search).

    Features are standardised first (a StandardScaler in the pipeline): on L2-normalised
    vectors every coordinate is tiny, and scaling lets one grid of ``Cs`` suit any backbone.
    Multi-label targets get one such classifier per label (one-vs-rest, sigmoid outputs); a
    label with fewer than 2 positive (or negative) rows, as a rare label often is in one CV
    fold, cannot be fitted and gets a constant: its smoothed base rate ``(pos + 0.5) / (n + 1)``.
    """

    def __init__(
        self,
        multi_label: bool = False,
        Cs: Sequence[float] = (0.001, 0.003, 0.01, 0.03, 0.1, 1),
        cv: int = 3,
        max_iter: int = 2000,
        random_state: int = 0,
        scale: bool = True,
    ) -> None:
        self.multi_label = multi_label
        self.Cs = Cs
        self.cv = cv
        self.max_iter = max_iter
        self.random_state = random_state
        self.scale = scale

    def fit(self, X: np.ndarray, y: Any) -> LinearHead:
        X = check_array(X, dtype=np.float32)
        targets, self.classes_ = encode_targets(y, self.multi_label, len(X))
        if self.multi_label:
            pos = targets.sum(0)
            fit = np.minimum(pos, len(X) - pos) >= 2
            self.fitted_labels_ = np.flatnonzero(fit)
            self.base_rate_ = (pos + 0.5) / (len(X) + 1.0)
            if not fit.any():  # every label constant: nothing to fit
                self.model_ = None
                self.n_features_in_ = X.shape[1]
                return self
            targets = targets[:, fit]
            counts = np.minimum(targets.sum(0), len(X) - targets.sum(0))
        else:
            counts = np.bincount(targets)
            if counts.min() < 2:
                rare = self.classes_[np.argmin(counts)]
                raise DataError(f"class {rare!r} has fewer than 2 examples; drop or merge it")
        logistic = LogisticRegression(
            C=float(self.Cs[0]), class_weight="balanced", max_iter=self.max_iter,
            random_state=self.random_state) if len(self.Cs) == 1 else LogisticRegressionCV(
            Cs=list(self.Cs),
            cv=StratifiedKFold(int(min(self.cv, counts.min())), shuffle=True,
                               random_state=self.random_state),
            l1_ratios=(0.0,),
            scoring="neg_log_loss",
            class_weight="balanced",
            max_iter=self.max_iter,
            random_state=self.random_state,
            use_legacy_attributes=False,
        )
        if self.multi_label:
            logistic = OneVsRestClassifier(logistic)
        self.model_: Pipeline | None = make_pipeline(StandardScaler() if self.scale else "passthrough",
                                                     logistic)
        self.model_.fit(X, targets.astype(int))
        self.n_features_in_ = X.shape[1]
        return self

    @property
    def C_(self) -> float | np.ndarray:
        """The chosen C (one per label for multi-label heads; NaN for a constant label)."""
        check_is_fitted(self)

        def chosen(est: Any) -> Any:
            return est.C_ if hasattr(est, "C_") else est.C  # a fixed C has no search result

        if not self.multi_label:
            return chosen(self.model_[-1])
        out = np.full(len(self.classes_), np.nan)
        if self.model_ is not None:
            out[self.fitted_labels_] = [chosen(est) for est in self.model_[-1].estimators_]
        return out

    def compile(self) -> CompiledLinear:
        """Scaler and logistic regression(s) as arrays: softmax (sigmoid for two classes) of
        ``((x - mean) / scale) @ coef.T + intercept``, or one sigmoid per label (a constant
        label: zero weights and the logit of its base rate)."""
        check_is_fitted(self)
        d = self.n_features_in_
        if self.multi_label:
            rate = self.base_rate_
            coef, intercept = np.zeros((len(self.classes_), d)), np.log(rate) - np.log1p(-rate)
            mean, scale = np.zeros(d), np.ones(d)
            if self.model_ is not None:
                scaler, logistic = self.model_[0], self.model_[-1]
                if scaler != "passthrough":
                    mean, scale = scaler.mean_, scaler.scale_
                for j, est in zip(self.fitted_labels_, logistic.estimators_, strict=True):
                    coef[j], intercept[j] = est.coef_[0], float(est.intercept_[0])
        else:
            scaler, logistic = self.model_[0], self.model_[-1]
            mean, scale = ((np.zeros(d), np.ones(d)) if scaler == "passthrough"
                           else (scaler.mean_, scaler.scale_))
            coef, intercept = logistic.coef_, logistic.intercept_
        return CompiledLinear(self.classes_, self.multi_label, np.asarray(mean, np.float64),
                              np.asarray(scale, np.float64), np.asarray(coef, np.float64),
                              np.asarray(intercept, np.float64))

    def predict_proba(self, X: np.ndarray, exclude: np.ndarray | None = None,
                      tabular: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities; ``exclude`` and ``tabular`` are part of the heads' shared calling
        contract (see :mod:`stylegen.heads`) and do not change a linear model's answer."""
        return self.compile().predict_proba(X)

    def predict(self, X: np.ndarray, exclude: np.ndarray | None = None,
                tabular: np.ndarray | None = None) -> np.ndarray | list[list[str]]:
        return decode_predictions(self.predict_proba(X), self.classes_, self.multi_label)
