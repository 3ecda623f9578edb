"""Score an index's genre models: on a held-out test manifest, or by cross-validation.

``evaluate_test`` embeds the test images exactly as the index was built and scores the
trained heads; covers that the heads were trained on are left out (and counted), so a
score is never computed on fitted data. ``cross_validate`` compares heads and feature
parts on the index itself with artist-disjoint folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone

from stylegen.errors import DataError, StylegenError
from stylegen.evaluation.metrics import (
    compare_table,
    cross_val_predict_proba,
    grouped_metrics,
    multi_label_metrics,
    single_label_metrics,
)
from stylegen.heads import EnsembleHead
from stylegen.heads.io import trained_hashes
from stylegen.heads.train import HEAD_NAMES, artist_groups, labelled_rows, make_heads
from stylegen.index.store import Index
from stylegen.query.engine import Engine
from stylegen.sources import images
from stylegen.sources.labels import multi_labels, single_labels

PART_CHOICES = ("style", "content", "both")
SUMMARY_KEYS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy", "macro_auroc", "macro_auprc")


@dataclass(frozen=True)
class TableSpec:
    """Where per-item numbers for hybrid heads come from: a CSV (or the manifest's own
    columns when ``path`` is None), which columns, and the key column joining it to images."""

    path: Path | None
    columns: list[str] | None
    key: str = "image"


@dataclass
class Outcome:
    """What ``stylegen evaluate`` prints: JSON, or a text summary with tables."""

    metrics: dict[str, Any]
    text: str

    def as_json(self) -> Any:
        return jsonable(self.metrics)

    def summary(self) -> str:
        return self.text


def jsonable(value: Any) -> Any:
    """Metrics as plain JSON types (numpy scalars and arrays converted)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pd.DataFrame):
        return jsonable(value.reset_index().to_dict(orient="records"))
    return value


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def run_test(index_dir: str | Path | None, manifest: str | Path, *, method: str | None = None,
             table: TableSpec | None = None, report: str | Path | None = None,
             device: str = "auto", weights: str | None = None, model: str | Path | None = None) -> Outcome:
    """``stylegen evaluate --test``: score the trained heads on a held-out manifest
    (``index_dir``, ``weights``, ``model``: see :meth:`~stylegen.query.engine.Engine.open`)."""
    from stylegen.evaluation.metrics import write_report

    engine = Engine.open(index_dir, device=device, weights=weights, model=model)
    tab = None
    if table is not None:
        keys = images.list_source(manifest)[table.key].astype(str).tolist()
        tab = engine.tabular_for(keys, table.path if table.path is not None else manifest, table.columns, table.key)
    metrics = evaluate_test(engine, manifest, method, tabular=tab)
    if report is not None:
        write_report(metrics, report, f"Evaluation of {index_dir} on {manifest}")
    lines = ["  ".join(f"{k}={metrics[k]:.3f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                       for k in SUMMARY_KEYS if k in metrics)]
    if metrics["n_in_training_excluded"]:
        lines.append(f"left out {metrics['n_in_training_excluded']} test covers the heads were trained on")
    lines += [f"  {src}: n={m['n']} accuracy={m['accuracy']:.3f} macro_f1={m['macro_f1']:.3f}"
              for src, m in (metrics.get("by_source") or {}).items()]
    lines += [f"  {level}: {m['n_classes']} classes  macro_auroc={_fmt(m['macro_auroc'])}  "
              f"macro_ap={_fmt(m['macro_ap'])}  macro_f1@{_fmt(m['threshold'], '.2f')}={_fmt(m['macro_f1'])}"
              for level, m in (metrics.get("levels") or {}).items()]
    return Outcome(metrics, "\n".join(lines))


def run_cv(index_dir: str | Path, n_splits: int, *, heads: Sequence[str] | None = None,
           parts: Sequence[str] = PART_CHOICES, table: TableSpec | None = None,
           report: str | Path | None = None, labels: str | None = None,
           label_columns: Sequence[str] | None = None, taxonomy: str | None = None,
           group_column: str | None = None, min_support: int = 10) -> Outcome:
    """``stylegen evaluate --cv N``: compare heads (and feature parts) with group-disjoint folds.

    ``labels`` (default: what the index's heads were trained with, else ``single``),
    ``label_columns`` and ``taxonomy`` (defaults: as trained) choose the task; multi-label
    runs go to :func:`cross_validate_multi` and are scored per level."""
    from stylegen.evaluation.metrics import to_markdown, write_report
    from stylegen.heads.io import has_head_set, read_head_set
    from stylegen.sources.tabular import load_tabular

    cfg = read_head_set(index_dir) if has_head_set(index_dir) else {}
    labels = labels or cfg.get("labels") or "single"
    if labels == "multi":
        if table is not None:
            raise StylegenError("--tabular with --cv is single-label only")
        frame, results = cross_validate_multi(
            index_dir, n_splits, heads=heads or MULTI_CV_HEADS,
            label_columns=label_columns or cfg.get("label_columns"),
            taxonomy=taxonomy or (cfg.get("taxonomy_name") if cfg.get("label_closure") else None),
            group_column=group_column or cfg.get("group_column"), min_support=min_support)
        if report is not None:
            from stylegen.util.persist import atomic_write_text

            Path(report).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(report) / "report.md", f"# Cross-validation ({n_splits} grouped folds), per level\n\n"
                              + to_markdown(frame) + "\n")
        return Outcome(results, to_markdown(frame))
    if labels != "single":
        raise StylegenError(f"--labels must be single or multi, got {labels!r}")
    if heads and (unknown := [h for h in heads if h not in HEAD_NAMES]):
        raise StylegenError(f"{', '.join(unknown)}: a multi-label head (use --labels multi)")
    tab = None
    if table is not None:
        meta = Index.open(index_dir, use_gpu=False).metadata
        tab, _ = load_tabular(meta, columns=table.columns, table=table.path, key=table.key)
    frame, results = cross_validate(index_dir, n_splits, heads=heads or HEAD_NAMES, parts=parts, tabular=tab,
                                    group_column=group_column)
    variants = variant_tables(results) if tab is not None else {}
    if report is not None:
        best = "mlp-hybrid" if tab is not None else max(results, key=lambda k: results[k]["accuracy"])
        write_report(results[best], report, f"Cross-validation ({n_splits} stratified, artist-disjoint folds); "
                     f"{'headline' if tab is not None else 'best'}: {best}",
                     extra_tables={**variants, "All heads and feature parts": frame})
        if tab is not None:
            plot_variant_confusions(results, report)
    keys = (*SUMMARY_KEYS[:5], "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std")
    metrics = {k: {m: v[m] for m in keys if m in v} for k, v in results.items()}
    text = "\n\n".join([to_markdown(frame), *(f"{name}\n\n{to_markdown(t)}" for name, t in list(variants.items())[:2])])
    return Outcome(metrics, text)


def evaluate_test(
    engine: Engine,
    manifest: str | Path,
    method: str | None = None,
    tabular: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of ``method`` on the labelled images of a test manifest (CSV or folder).

    Every image goes through :meth:`Engine.query_many`, the path ``classify`` takes. Covers
    the heads were trained on (found by content hash) are left out and counted, so a score
    is never computed on fitted data.
    """
    items = images.list_source(manifest)
    results, bad = engine.query_many(items["path"].tolist(), method=method, tabular=tabular,
                                     labels=[str(i) for i in range(len(items))], top=3)
    trained = set(engine.head_config["train_rows"])
    fitted = trained_hashes(engine.head_config["dir"])  # a model bundle's training covers
    fresh = [r for r in results if (r.row is None or r.row not in trained) and r.content_hash not in fitted]
    out: dict[str, Any] = {"n_images": len(items), "n_unreadable": len(bad),
                           "n_in_training_excluded": len(results) - len(fresh), "bad": bad,
                           "method": results[0].method if results else None}
    if not fresh:
        raise DataError("no test image is left: all are unreadable or were used to train the heads")
    bad = [{**b, "image": items["image"].iloc[int(b["image"])]} for b in bad]
    out["bad"] = bad
    items = items.iloc[[int(r.label) for r in fresh]].reset_index(drop=True)
    out["predictions"] = [{"image": img, "genres": r.genres} for img, r in zip(items["image"], fresh, strict=True)]
    proba, classes = np.stack([r.proba for r in fresh]), fresh[0].classes
    if engine.head_config["labels"] == "multi":
        lists = test_label_lists(engine.head_config, items, engine.taxonomy)
        out.update(multi_label_metrics(lists, proba, classes))
        out["levels"] = level_report(engine, lists, proba, classes, results[0].method)
        return out
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
    out.update(metrics)
    return out


def test_label_lists(cfg: dict[str, Any], items: pd.DataFrame, taxonomy: Any) -> list[list[str]]:
    """A test manifest's label sets read as the heads were trained: the same columns, closed
    upward through the taxonomy when training closed them."""
    from stylegen.sources.labels import column_labels, label_closure

    lists = column_labels(items, cfg["label_columns"]) if cfg.get("label_columns") else multi_labels(items)
    if cfg.get("label_closure") and taxonomy is not None:
        lists = label_closure(lists, taxonomy, keep_unknown=True)
    return lists


def level_report(engine: Engine, lists: Sequence[Sequence[str]], proba: np.ndarray, classes: Sequence[str],
                 method: str) -> dict[str, dict[str, Any]]:
    """Per level of the taxonomy (genres; styles): macro-AUROC, macro-AP and macro-F1 at the
    threshold ``train`` chose for the level on held-out covers (0.5 where none was recorded)."""
    from stylegen.evaluation.metrics import hierarchy_metrics
    from stylegen.heads.train import class_levels

    tax = engine.taxonomy
    levels = class_levels(classes, tax) if tax is not None else {"genre": list(classes)}
    name = engine.head_name(method)[1]
    recorded = (((engine.head_config.get("calibration") or {}).get(name) or {}).get("thresholds")) or {}
    thresholds = {level: float(recorded.get(level, 0.5)) for level in levels}
    return hierarchy_metrics(lists, proba, classes, levels, min_support=1, thresholds=thresholds)


def cross_validate(
    index_dir: str | Path,
    n_splits: int = 5,
    heads: Sequence[str] = HEAD_NAMES,
    parts: Sequence[str] = PART_CHOICES,
    seed: int = 0,
    tabular: np.ndarray | None = None,
    group_column: str | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Artist-disjoint CV of each head on each feature part; returns (table, metrics).
    ``group_column``: what keeps covers together (default ``artist``, else ``artist_group``)."""
    index = Index.open(index_dir, use_gpu=False)
    rows, y = labelled_rows(index.metadata, "single")
    groups = artist_groups(index.metadata, group_column)[rows]
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


MULTI_CV_HEADS = ("knn", "hierarchy")  # the multi-label heads `evaluate --cv` compares unless told


def _grouped_label_folds(lists: Sequence[Sequence[str]], groups: np.ndarray, n_splits: int,
                         seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group-disjoint folds stratified on each row's first label (its genre, after closure)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    if len(set(groups)) < n_splits:
        raise DataError(f"only {len(set(groups))} distinct groups for {n_splits} folds")
    first = [labels[0] if labels else "" for labels in lists]
    with warnings.catch_warnings():  # a label rarer than the folds: some folds lack it
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return list(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
                    .split(np.zeros(len(first)), first, groups))


def _within(rows: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``folds`` restricted to ``rows`` (sorted positions), renumbered 0..len(rows)-1."""
    pos = np.full(max((int(t.max()) for f in folds for t in f if len(t)), default=0) + 1, -1)
    pos[rows] = np.arange(len(rows))
    return [(pos[tr][pos[tr] >= 0], pos[te][pos[te] >= 0]) for tr, te in folds]


def cross_validate_multi(
    index_dir: str | Path,
    n_splits: int = 5,
    heads: Sequence[str] = MULTI_CV_HEADS,
    label_columns: Sequence[str] | None = None,
    taxonomy: str | Path | None = None,
    group_column: str | None = None,
    min_support: int = 10,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Grouped K-fold CV of multi-label heads, scored per level of the taxonomy.

    Labels come from ``label_columns`` (default ``genres``); with a ``taxonomy`` they are
    closed upward (a ``Genre---Style`` also labels its genre) and the classes split into
    levels (genres; styles), as ``train`` does. Folds keep each group (``group_column``,
    default ``artist``, else ``artist_group``) on one side and are stratified on each cover's
    first label. Each head is fitted as ``train`` fits it (flat heads on the labels with at
    least 10 covers when ``hierarchy`` is compared too, else 3) and scored with
    :func:`~stylegen.evaluation.metrics.cv_level_scores` over the classes with at least
    ``min_support`` covers; with a ``source`` column, also per source. Returns (table, metrics).
    """
    from stylegen.evaluation.metrics import cv_level_scores, label_matrix
    from stylegen.heads.compiled import align_columns
    from stylegen.heads.train import FLAT_MIN_COVERS, MULTI_HEAD_NAMES, class_levels, make_heads
    from stylegen.sources.labels import Taxonomy, filter_genres, label_closure

    if unknown := [h for h in heads if h not in MULTI_HEAD_NAMES]:
        raise DataError(f"heads must be among {', '.join(MULTI_HEAD_NAMES)}, got {', '.join(unknown)}")
    index = Index.open(index_dir, use_gpu=False)
    meta = index.metadata
    groups_all = artist_groups(meta, group_column)
    tax = Taxonomy.named(taxonomy) if taxonomy is not None else None
    rows, lists = labelled_rows(meta, "multi", label_columns)
    if not len(rows):
        raise DataError(f"no cover of {index_dir} has a label in {', '.join(label_columns or ['genres'])}")
    if tax is not None:
        lists = label_closure(lists, tax, keep_unknown=True)
    classes = sorted({c for labels in lists for c in labels})
    Y = label_matrix(lists, classes)
    levels = class_levels(classes, tax) if tax is not None else {"genre": classes}
    groups = groups_all[rows]
    folds = _grouped_label_folds(lists, groups, n_splits, seed)
    counts = Y.sum(axis=0)
    floor = FLAT_MIN_COVERS if "hierarchy" in heads and (counts >= FLAT_MIN_COVERS).sum() >= 2 else 3
    flat = filter_genres(lists, [c for c, n in zip(classes, counts, strict=True) if n >= floor])
    X = np.ascontiguousarray(index.vectors[rows], dtype=np.float32)
    sources = meta["source"].astype(str).to_numpy()[rows] if "source" in meta else None
    factory = make_heads(True, seed, taxonomy=taxonomy)
    results: dict[str, dict[str, Any]] = {}
    for name in heads:
        yy = lists if name == "hierarchy" else flat
        P = np.zeros(Y.shape)
        for train, test in folds:
            kw = {"groups": groups[train]} if isinstance(factory[name], EnsembleHead) else {}
            est = clone(factory[name]).fit(X[train], [yy[i] for i in train], **kw)
            P[test] = align_columns(np.asarray(est.predict_proba(X[test]), np.float64),
                                    [str(c) for c in est.classes_], classes)
        res: dict[str, Any] = {"levels": cv_level_scores(P, Y, classes, levels, folds, min_support)}
        if sources is not None and len(set(sources)) > 1:
            res["by_source"] = {}
            for src in sorted(set(sources)):
                at = np.flatnonzero(sources == src)
                res["by_source"][src] = cv_level_scores(P[at], Y[at], classes, levels, _within(at, folds), min_support)
        if tax is not None:
            col = {c: j for j, c in enumerate(classes)}
            pairs = [(j, col[p]) for j, c in enumerate(classes) if (p := tax.parent(c)) is not None and p in col]
            if pairs:
                child, parent = (np.array(x) for x in zip(*pairs, strict=True))
                res["child_above_parent"] = float((P[:, child] > P[:, parent] + 1e-9).mean())
        results[name] = res
    return multi_cv_table(results), results


def multi_cv_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per head and level (and source): macro-AUROC and macro-AP (fold mean ± sd),
    F1 at thresholds chosen on the other folds, and how often a style outscored its genre."""
    rows = []
    for name, res in results.items():
        scopes = [("all", res["levels"]), *sorted((res.get("by_source") or {}).items())]
        for scope, levels in scopes:
            for level, r in levels.items():
                rows.append({
                    "head": name, "covers": scope, "level": f"{level} ({r['n_classes']} with >= {r['min_support']})",
                    "macro-AUROC": f"{r['auroc']:.3f} ± {r['auroc_sd']:.3f}" if r["auroc"] is not None else "",
                    "macro-AP": f"{r['ap']:.3f} ± {r['ap_sd']:.3f}" if r["ap"] is not None else "",
                    "F1@t": r["f1"],
                    "child > parent": (f"{100 * res['child_above_parent']:.2f}%"
                                       if "child_above_parent" in res else ""),
                })
    return pd.DataFrame(rows).set_index("head") if rows else pd.DataFrame()


TABULAR_VARIANTS = ("image", "tabular", "hybrid")


def _cv_tabular(index: Index, rows: np.ndarray, y: np.ndarray, groups: np.ndarray,
                tabular: np.ndarray, n_splits: int, seed: int,
                variants: Sequence[str] = TABULAR_VARIANTS,
                mlp_params: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Image-only, tabular-only and hybrid MLP heads (the hybrid's settings) under the same folds.

    The folds are those of :func:`cross_validate` (stratified by genre, artist-disjoint;
    one group per row where the index has no artist). ``mlp_params`` overrides settings of
    :func:`~stylegen.heads.train.make_heads`' hybrid MLP (e.g. ``n_models=1`` for a quick run).
    Each result also carries the
    accuracy and macro-F1 of every fold (``folds``) and their mean and std.
    """
    X = np.asarray(index.vectors[rows], dtype=np.float32)
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
    from stylegen.evaluation.metrics import plot_confusion

    return [plot_confusion(m["confusion"], m["classes"], Path(out_dir) / f"confusion_{k}.png")
            for k, m in results.items() if k.startswith("mlp-") and "folds" in m]
