"""Flat vs hierarchical multi-label heads on the Discogs covers (genres and styles), grouped CV.

    python scripts/research_discogs.py --index indexes/discogs

The index comes from ``stylegen embed ../shared/data/discogs-styles/covers.csv --index
indexes/discogs``. Labels: the ``genres`` column plus the closure of ``styles`` (a
``Genre---Style`` implies its genre) under the packaged Discogs taxonomy. Folds: 5 grouped
folds by ``artist_group`` (stratified on each cover's first genre). Every method is scored per
level (genres; styles) over the classes with at least ``--min-support`` covers in the whole
data: macro-AUROC and macro-AP per test fold (mean and standard deviation over the folds) and
on the pooled out-of-fold predictions; macro-F1 of the pooled out-of-fold predictions at
thresholds chosen for each test fold on the other folds' out-of-fold predictions (never on the
test fold's labels): one threshold per level (``F1@t``) or one per class (``F1@t_c``). Also:
fit seconds per fold, the share of (cover, parent, child) triples with a child above its
parent, and the time of one hierarchical fit on every cover.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from bench_coldstart import cpu_line
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from threadpoolctl import threadpool_limits

import stylegen
from stylegen.evaluation.metrics import cv_level_scores, label_matrix, to_markdown
from stylegen.heads import KNNHead
from stylegen.heads.compiled import align_columns
from stylegen.heads.hierarchy import HierarchyHead
from stylegen.sources.labels import Taxonomy, column_labels, label_closure


class FlatLR:
    """One class-balanced logistic regression per class on all covers, nothing shared.

    ``standardise``: per-dimension z-scores (as :class:`~stylegen.heads.LinearHead`), else
    centred and divided by one RMS scale (as :class:`HierarchyHead`). A class with fewer than
    3 positives gets its base rate."""

    def __init__(self, C: float, standardise: bool) -> None:
        self.C, self.standardise = C, standardise

    def fit(self, X: np.ndarray, Y: np.ndarray) -> FlatLR:
        self.mean_ = X.mean(axis=0)
        sd = X.std(axis=0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0) if self.standardise else np.sqrt(np.mean(sd**2))
        Z = (X - self.mean_) / self.scale_
        self.models_: list[Any] = []
        for j in range(Y.shape[1]):
            pos = int(Y[:, j].sum())
            if min(pos, len(Y) - pos) < 3:
                self.models_.append((pos + 0.5) / (len(Y) + 1.0))
            else:
                self.models_.append(LogisticRegression(C=self.C, class_weight="balanced",
                                                       max_iter=300).fit(Z, Y[:, j]))
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean_) / self.scale_
        return np.column_stack([np.full(len(Z), m) if isinstance(m, float) else m.predict_proba(Z)[:, 1]
                                for m in self.models_])


def label_data(index: stylegen.Index) -> tuple[list[list[str]], list[str], np.ndarray, np.ndarray]:
    """(closed label lists, classes, 0/1 matrix, parent column per class or -1)."""
    tax = Taxonomy.discogs()
    lists = label_closure(column_labels(index.metadata, ["genres", "styles"]), tax)
    classes = sorted({c for labels in lists for c in labels})
    position = {c: j for j, c in enumerate(classes)}
    parent = np.array([position.get(tax.parent(c) or "", -1) for c in classes])
    return lists, classes, label_matrix(lists, classes), parent


def methods(classes: list[str]) -> dict[str, tuple[str, Callable[[np.ndarray, Any, np.ndarray], np.ndarray]]]:
    """name -> (vector part, fit-and-predict(X_train, label lists / matrix, X_test))."""
    def flat(C: float, standardise: bool) -> Callable[..., np.ndarray]:
        return lambda Xtr, Ytr, Xte: FlatLR(C, standardise).fit(Xtr, Ytr).predict_proba(Xte)

    def knn(Xtr: np.ndarray, Ytr: np.ndarray, Xte: np.ndarray) -> np.ndarray:
        lists = [[classes[j] for j in np.flatnonzero(row)] for row in Ytr]
        head = KNNHead(k=50, temperature=0.1, multi_label=True).fit(Xtr, lists)
        return align_columns(head.predict_proba(Xte), [str(c) for c in head.classes_], classes)

    def hier(**kw: Any) -> Callable[..., np.ndarray]:
        def run(Xtr: np.ndarray, Ytr: np.ndarray, Xte: np.ndarray) -> np.ndarray:
            lists = [[classes[j] for j in np.flatnonzero(row)] for row in Ytr]
            head = HierarchyHead("discogs", **kw).fit(Xtr, lists)
            return align_columns(head.predict_proba(Xte), [str(c) for c in head.classes_], classes)
        return run

    def blend(Xtr: np.ndarray, Ytr: np.ndarray, Xte: np.ndarray) -> np.ndarray:
        # both parts keep parent >= child (kNN votes on closed label sets), so their mean does
        return 0.8 * hier(knn_weight=0.0)(Xtr, Ytr, Xte) + 0.2 * knn(Xtr, Ytr, Xte)

    return {
        "flat kNN (k=50, T=0.1)": ("both", knn),
        "flat LR, per-dim standardised, C=0.001": ("both", flat(0.001, True)),
        "flat LR, RMS-scaled, C=0.002": ("both", flat(0.002, False)),
        "flat LR, RMS-scaled, C=0.0002": ("both", flat(0.0002, False)),
        "hierarchical (HierarchyHead: roots 0.8 LR + 0.2 kNN)": ("both", hier()),
        "hierarchical, no kNN (knn_weight=0)": ("both", hier(knn_weight=0.0)),
        "hierarchical, no shrinkage": ("both", hier(shrink=0.0)),
        "hierarchical, content part only": ("content", hier()),
        "hierarchical, style part only": ("style", hier()),
        "hierarchical (no kNN) 0.8 + flat kNN 0.2, every node": ("both", blend),
    }


def evaluate(P: np.ndarray, Y: np.ndarray, classes: list[str], parent: np.ndarray,
             folds: list[tuple[np.ndarray, np.ndarray]], min_support: int) -> dict[str, Any]:
    """Per level (:func:`~stylegen.evaluation.metrics.cv_level_scores`, as ``evaluate --cv``
    scores): fold mean/sd and pooled macro-AUROC/AP, macro-F1 at training-fold thresholds."""
    levels = {"genres": [c for c, p in zip(classes, parent) if p < 0],
              "styles": [c for c, p in zip(classes, parent) if p >= 0]}
    out: dict[str, Any] = cv_level_scores(P, Y, classes, levels, folds, min_support)
    child = np.flatnonzero(parent >= 0)
    out["child_above_parent"] = float((P[:, child] > P[:, parent[child]] + 1e-12).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="indexes/discogs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-support", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (2 busy cores: 1)")
    parser.add_argument("--only", default="", help="comma-separated substrings of method names")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    index = stylegen.Index.open(args.index, use_gpu=False)
    lists, classes, Y, parent = label_data(index)
    groups = index.metadata["artist_group"].astype(str).to_numpy()
    folds = list(StratifiedGroupKFold(args.folds, shuffle=True, random_state=args.seed)
                 .split(np.zeros(len(Y)), [labels[0] for labels in lists], groups))
    support = Y.sum(axis=0)
    print(f"{len(Y)} covers, {len(set(groups))} artist groups, {int((parent < 0).sum())} genres "
          f"({int(((parent < 0) & (support >= args.min_support)).sum())} with >= {args.min_support} covers), "
          f"{int((parent >= 0).sum())} styles ({int(((parent >= 0) & (support >= args.min_support)).sum())} "
          f"with >= {args.min_support})", flush=True)
    rows, results = [], {}
    with threadpool_limits(args.threads):
        for name, (part, fit_predict) in methods(classes).items():
            if args.only and not any(s.strip() in name for s in args.only.split(",")):
                continue
            X = index.part_vectors(index.vectors, part).astype(np.float64)
            P, seconds = np.zeros(Y.shape), []
            for train, test in folds:
                start = time.perf_counter()
                P[test] = fit_predict(X[train], Y[train], X[test])
                seconds.append(time.perf_counter() - start)
            res = evaluate(P, Y, classes, parent, folds, args.min_support)
            res["fit_predict_s"] = float(np.mean(seconds))
            results[name] = res
            for level in ("genres", "styles"):
                r = res[level]
                rows.append({"method": name, "level": f"{level} ({r['n_classes']})",
                             "macro-AUROC": f"{r['auroc']:.3f} ± {r['auroc_sd']:.3f}",
                             "macro-AP": f"{r['ap']:.3f} ± {r['ap_sd']:.3f}",
                             "pooled AUROC": r["pooled_auroc"], "pooled AP": r["pooled_ap"],
                             "F1@t": r["f1"], "F1@t_c": r["f1_per_class"], "child > parent": f"{100 * res['child_above_parent']:.2f}%",
                             "s / fold": res["fit_predict_s"]})
            print(f"{name}: genres {res['genres']['auroc']:.3f}/{res['genres']['ap']:.3f}, styles "
                  f"{res['styles']['auroc']:.3f}/{res['styles']['ap']:.3f}", flush=True)
        X = index.vectors.astype(np.float64)
        start = time.perf_counter()
        head = HierarchyHead("discogs").fit(X, lists)
        full_fit = time.perf_counter() - start
    proba, child = head.predict_proba(X), np.flatnonzero(head.parent_ >= 0)
    gap = float((proba[:, child] - proba[:, head.parent_[child]]).max())
    print()
    print(to_markdown(pd.DataFrame(rows), index=False))
    ours = next((n for n in results if n.startswith("hierarchical (HierarchyHead")), None)
    for name in [n for n in results if n.startswith("flat LR")] if ours else []:
        parts = []
        for level in ("genres", "styles"):
            for metric in ("auroc", "ap"):
                diff = np.subtract(results[ours][level][f"{metric}_folds"], results[name][level][f"{metric}_folds"])
                parts.append(f"{level} {metric} {diff.mean():+.3f} ({int((diff > 0).sum())}/{len(diff)} folds up)")
        print(f"HierarchyHead minus {name}, paired by fold: " + "; ".join(parts))
    print(f"HierarchyHead fit on all {len(X)} covers ({len(head.classes_)} nodes): {full_fit:.1f} s; "
          f"largest p(style) - p(genre) on them: {gap:.2e}")
    print(cpu_line())
    if args.json:
        args.json.write_text(json.dumps({"results": results, "full_fit_s": full_fit}, indent=2))


if __name__ == "__main__":
    main()
