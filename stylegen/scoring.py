"""Score an index's genre models: on a held-out test manifest, or by cross-validation.

``evaluate_test`` embeds the test images exactly as the index was built and scores the
trained heads; covers that the heads were trained on are left out (and counted), so a
score is never computed on fitted data. ``cross_validate`` compares heads and feature
parts on the index itself with artist-disjoint folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone

from stylegen import images
from stylegen.engine import Engine
from stylegen.errors import DataError
from stylegen.evaluate import (
    compare_table,
    cross_val_predict_proba,
    grouped_metrics,
    multi_label_metrics,
    single_label_metrics,
)
from stylegen.heads import EnsembleHead
from stylegen.labels import multi_labels, single_labels
from stylegen.store import Index
from stylegen.train import HEAD_NAMES, artist_groups, labelled_rows, make_heads

PART_CHOICES = ("style", "content", "both")


def evaluate_test(
    engine: Engine,
    manifest: str | Path,
    method: str | None = None,
    tabular: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of ``method`` on the labelled images of a test manifest (CSV or folder)."""
    items = images.list_source(manifest)
    vectors, good, bad = engine.embed_paths(items["path"].tolist())
    items = items.iloc[good].reset_index(drop=True)
    tab = tabular[good] if tabular is not None else None
    hashes = [images.hash_file(p)[0] for p in items["path"]]
    trained = set(engine.index.metadata["content_hash"].to_numpy()[engine.head_config["train_rows"]])
    fresh = np.array([h not in trained for h in hashes], dtype=bool)
    result: dict[str, Any] = {"n_images": len(items) + len(bad), "n_unreadable": len(bad),
                              "n_in_training_excluded": int((~fresh).sum()), "bad": bad}
    items, vectors = items[fresh].reset_index(drop=True), vectors[fresh]
    tab = tab[fresh] if tab is not None else None
    if not len(items):
        raise DataError("no test image is left: all are unreadable or were used to train the heads")
    proba, classes = engine.predict_proba(vectors, method, tabular=tab)
    if engine.head_config["labels"] == "multi":
        result.update(multi_label_metrics(multi_labels(items), proba, classes))
        return result
    y = single_labels(items)
    lab = y.notna().to_numpy()
    if not lab.any():
        raise DataError(f"test manifest {manifest} has no single-label rows (column genre)")
    metrics = single_label_metrics(y[lab].astype(str).tolist(), proba[lab], classes)
    if "source" in items.columns:
        metrics["by_source"] = grouped_metrics(y[lab].astype(str).tolist(), proba[lab], classes,
                                               items["source"][lab].tolist())
    multi = multi_labels(items)
    if any(len(g) > 1 for g in multi):
        metrics["multi_label"] = multi_label_metrics(multi, proba, classes)
    result.update(metrics)
    return result


def cross_validate(
    index_dir: str | Path,
    n_splits: int = 5,
    heads: Sequence[str] = HEAD_NAMES,
    parts: Sequence[str] = PART_CHOICES,
    seed: int = 0,
    tabular: np.ndarray | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Artist-disjoint CV of each head on each feature part; returns (table, metrics)."""
    index = Index.open(index_dir, use_gpu=False)
    rows, y = labelled_rows(index.metadata, "single")
    groups = artist_groups(index.metadata)[rows]
    sources = index.metadata["source"].to_numpy()[rows] if "source" in index.metadata else None
    results: dict[str, dict[str, Any]] = {}
    for part in parts:
        if part != "both" and part not in index.slices:
            continue
        X = index.part_vectors(np.asarray(index.vectors)[rows], part)
        for name in heads:
            proto = make_heads(False, seed)[name]
            fit_kw = (lambda tr: {"groups": groups[tr]}) if isinstance(proto, EnsembleHead) else None
            proba, classes = cross_val_predict_proba(lambda p=proto: clone(p), X, y, groups,
                                                     n_splits=n_splits, random_state=seed,
                                                     fit_kwargs_fn=fit_kw)
            m = single_label_metrics(y, proba, classes)
            if sources is not None:
                m["by_source"] = grouped_metrics(y, proba, classes, sources)
            results[f"{name} / {part}"] = m
    if tabular is not None:
        results.update(_cv_tabular(index, rows, y, groups, tabular, n_splits, seed))
    return compare_table(results), results


TABULAR_VARIANTS = ("image", "tabular", "hybrid")


def _cv_tabular(index: Index, rows: np.ndarray, y: np.ndarray, groups: np.ndarray,
                tabular: np.ndarray, n_splits: int, seed: int,
                variants: Sequence[str] = TABULAR_VARIANTS,
                mlp_params: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Image-only, tabular-only and hybrid MLP heads (the hybrid's settings) under the same folds.

    The folds are those of :func:`cross_validate` (stratified by genre, artist-disjoint;
    one group per row where the index has no artist). ``mlp_params`` overrides settings of
    :func:`~stylegen.train.make_heads`' hybrid MLP (e.g. ``n_models=1`` for a quick run).
    Each result also carries the
    accuracy and macro-F1 of every fold (``folds``) and their mean and std.
    """
    X = np.asarray(index.vectors)[rows]
    tab = np.asarray(tabular, np.float32)[rows]
    out = {}
    for mode in variants:
        proto = clone(make_heads(False, seed, "hybrid")["mlp"]).set_params(**{**(mlp_params or {}), "mode": mode})
        tests: list[np.ndarray] = []

        def record(test: np.ndarray, tests: list[np.ndarray] = tests) -> dict[str, Any]:
            tests.append(test)  # the test rows of each fold, for per-fold scores
            return {}

        proba, classes = cross_val_predict_proba(
            lambda p=proto: clone(p), X, y, groups, n_splits=n_splits, random_state=seed,
            extra={"tabular": tab}, predict_kwargs_fn=record)
        m = single_label_metrics(y, proba, classes)
        folds = [single_label_metrics(y[t], proba[t], classes) for t in tests]
        m["folds"] = {k: [f[k] for f in folds] for k in ("n", "accuracy", "macro_f1")}
        for k in ("accuracy", "macro_f1"):
            m[f"{k}_mean"], m[f"{k}_std"] = float(np.mean(m["folds"][k])), float(np.std(m["folds"][k]))
        out[f"mlp-{mode}"] = m
    return out


def variant_tables(results: dict[str, dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """Markdown-ready tables comparing the MLP variants of :func:`_cv_tabular`."""
    names = [k for k in results if k.startswith("mlp-") and "folds" in results[k]]
    if not names:
        return {}
    head = pd.DataFrame([{
        "variant": k.removeprefix("mlp-"), "n": results[k]["n"],
        "accuracy (pooled)": results[k]["accuracy"], "macro-F1 (pooled)": results[k]["macro_f1"],
        "accuracy per fold": f"{results[k]['accuracy_mean']:.3f} ± {results[k]['accuracy_std']:.3f}",
        "macro-F1 per fold": f"{results[k]['macro_f1_mean']:.3f} ± {results[k]['macro_f1_std']:.3f}",
    } for k in names]).set_index("variant")
    per_genre = pd.DataFrame({k.removeprefix("mlp-"): {c["genre"]: c["f1"] for c in results[k]["per_class"]}
                              for k in names})
    per_genre.index.name = "genre (F1)"
    pngs = pd.DataFrame([{"variant": k.removeprefix("mlp-"),
                          "confusion": f"![{k}](confusion_{k}.png)"} for k in names]).set_index("variant")
    return {"Image-only, tabular-only and hybrid MLP (same folds)": head,
            "Per-genre F1 of each variant": per_genre,
            "Confusion matrix of each variant (row-normalised)": pngs}


def plot_variant_confusions(results: dict[str, dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """``confusion_mlp-<variant>.png`` in ``out_dir`` for each MLP variant of :func:`_cv_tabular`."""
    from stylegen.evaluate import plot_confusion

    return [plot_confusion(m["confusion"], m["classes"], Path(out_dir) / f"confusion_{k}.png")
            for k, m in results.items() if k.startswith("mlp-") and "folds" in m]
