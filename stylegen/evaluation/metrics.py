"""Metrics, cross-validation, plots and reports for genre heads.

Metrics are scikit-learn's, computed from a probability matrix whose columns follow
``classes``. A metrics dict from :func:`single_label_metrics` may carry two optional keys
that :func:`compare_table` and :func:`write_report` understand: ``by_source`` (the output of
:func:`grouped_metrics`) and ``multi_label`` (the output of :func:`multi_label_metrics`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from stylegen.errors import DataError

# calibration metrics live with the heads (heads may not import evaluation); re-exported here
from stylegen.heads.calibration import best_threshold as best_threshold
from stylegen.heads.calibration import expected_calibration_error as expected_calibration_error
from stylegen.heads.calibration import label_matrix as label_matrix
from stylegen.heads.calibration import min_confidence as min_confidence
from stylegen.heads.calibration import precision_coverage as precision_coverage
from stylegen.util.persist import atomic_write, atomic_write_text
from stylegen.util.tables import safe_frame

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy")


def _check_proba(proba: np.ndarray, n: int, classes: Sequence[str]) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if n == 0:
        raise DataError("cannot compute metrics on zero samples")
    if proba.ndim != 2 or proba.shape != (n, len(classes)):
        raise DataError(
            f"probabilities have shape {proba.shape}, expected ({n}, {len(classes)}) "
            "(samples x classes)"
        )
    return proba


def single_label_metrics(
    y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, top-3 accuracy, per-class scores, confusion.

    The prediction is the arg-max column. True labels not in ``classes`` count as errors
    everywhere except the confusion matrix (which has no row for them; see ``n_unknown``).
    Macro-F1 averages over the classes that occur in ``y_true`` or in the predictions.
    """
    classes = [str(c) for c in classes]
    y = np.asarray([str(v) for v in y_true], dtype=object)
    proba = _check_proba(proba, len(y), classes)
    pred = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
    known = np.isin(y, classes)
    present = [c for c in classes if c in set(y) | set(pred)]
    k = min(3, len(classes))
    if k >= len(classes):  # every known label is within the top k
        top3 = float(known.mean())
    elif known.any():  # unknown labels are misses; sklearn wants sorted labels
        order = np.argsort(classes)
        hits = top_k_accuracy_score(y[known], proba[known][:, order], k=k,
                                    labels=np.asarray(classes)[order], normalize=False)
        top3 = float(hits) / len(y)
    else:
        top3 = 0.0
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected
        warnings.simplefilter("ignore", UserWarning)
        bal = float(balanced_accuracy_score(y, pred))
    prec, rec, f1, sup = precision_recall_fscore_support(
        y, pred, labels=classes, zero_division=0
    )
    return {
        "n": len(y),
        "n_unknown": int((~known).sum()),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": bal,
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "top3_accuracy": top3,
        "per_class": [
            {"genre": c, "precision": float(p), "recall": float(r), "f1": float(f),
             "support": int(s)}
            for c, p, r, f, s in zip(classes, prec, rec, f1, sup)
        ],
        "confusion": confusion_matrix(y, pred, labels=classes).tolist(),
        "classes": classes,
    }


def multi_label_metrics(
    Y_true: Sequence[Sequence[str]], proba: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Macro/micro AUROC and AUPRC, per-class scores and macro-F1 at threshold 0.5.

    Classes whose column in ``Y_true`` is all 0 or all 1 are left out of the AUROC/AUPRC
    averages (their per-class values are ``None``). Labels not in ``classes`` are ignored.
    """
    classes = [str(c) for c in classes]
    proba = _check_proba(proba, len(Y_true), classes)
    col = {c: j for j, c in enumerate(classes)}
    Y = np.zeros(proba.shape, dtype=int)
    for i, labels in enumerate(Y_true):
        Y[i, [col[str(lab)] for lab in labels if str(lab) in col]] = 1
    pos = Y.sum(axis=0)
    ok = (pos > 0) & (pos < len(Y))
    auroc, auprc = roc_auc_score, average_precision_score
    per = [{"genre": c, "auroc": float(auroc(Y[:, j], proba[:, j])) if ok[j] else None,
            "auprc": float(auprc(Y[:, j], proba[:, j])) if ok[j] else None,
            "support": int(pos[j])} for j, c in enumerate(classes)]
    out: dict[str, Any] = {"n": len(Y), "n_scored_classes": int(ok.sum())}
    for avg in ("macro", "micro"):
        for name, fn in (("auroc", auroc), ("auprc", auprc)):
            out[f"{avg}_{name}"] = float(fn(Y[:, ok], proba[:, ok], average=avg)) if ok.any() else None
    pred = (proba >= 0.5).astype(int)
    used = (pos > 0) | (pred.sum(axis=0) > 0)
    f1 = f1_score(Y[:, used], pred[:, used], average="macro", zero_division=0) if used.any() else 0
    out["macro_f1"] = float(f1)
    out["per_class"] = per
    out["classes"] = classes
    return out


# ---- hierarchical multi-label: one score table per level ---------------------------------
def level_metrics(Y_true: Any, proba: np.ndarray, classes: Sequence[str], min_support: int = 1,
                  threshold: float | Sequence[float] = 0.5) -> dict[str, Any]:
    """Macro-AUROC, macro-AP and macro-F1 (at ``threshold``: one, or one per class) over the
    classes with at least ``min_support`` positive rows (and at least one negative);
    per-class values too."""
    classes = [str(c) for c in classes]
    Y = label_matrix(Y_true, classes)
    proba = _check_proba(proba, len(Y), classes)
    pos = Y.sum(axis=0)
    scored = (pos >= max(min_support, 1)) & (pos < len(Y))
    per = [{"class": c, "support": int(pos[j]),
            "auroc": float(roc_auc_score(Y[:, j], proba[:, j])) if scored[j] else None,
            "ap": float(average_precision_score(Y[:, j], proba[:, j])) if scored[j] else None}
           for j, c in enumerate(classes)]
    cut = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(classes),))
    pred = proba[:, scored] >= cut[scored]
    tp = (pred & (Y[:, scored] > 0)).sum(axis=0)
    f1 = 2 * tp / np.maximum(pred.sum(axis=0) + pos[scored], 1)
    auroc, ap = ([p[key] for p in per if p[key] is not None] for key in ("auroc", "ap"))
    return {"n": len(Y), "n_classes": int(scored.sum()), "min_support": int(min_support),
            "macro_auroc": float(np.mean(auroc)) if auroc else None,
            "macro_ap": float(np.mean(ap)) if ap else None,
            "macro_f1": float(f1.mean()) if scored.any() else None,
            "threshold": float(cut[0]) if np.ndim(threshold) == 0 else cut.tolist(), "per_class": per}


def hierarchy_metrics(Y_true: Any, proba: np.ndarray, classes: Sequence[str],
                      levels: Mapping[str, Sequence[str]],
                      min_support: int | Mapping[str, int] = 1,
                      thresholds: float | Mapping[str, float] = 0.5) -> dict[str, dict[str, Any]]:
    """:func:`level_metrics` per level: ``levels`` maps a level name ("genre", "style") to
    its classes (columns of ``proba`` in ``classes`` order); ``min_support`` and
    ``thresholds`` may be given per level."""
    classes = [str(c) for c in classes]
    Y = label_matrix(Y_true, classes)
    proba = _check_proba(proba, len(Y), classes)
    col = {c: j for j, c in enumerate(classes)}
    out = {}
    for name, members in levels.items():
        if missing := [str(m) for m in members if str(m) not in col]:
            raise DataError(f"level {name!r} names classes the probabilities lack: {missing[:5]}")
        cols = [col[str(m)] for m in members]
        support = min_support[name] if isinstance(min_support, Mapping) else min_support
        t = thresholds[name] if isinstance(thresholds, Mapping) else thresholds
        out[name] = level_metrics(Y[:, cols], proba[:, cols], [classes[j] for j in cols], support, t)
    return out


def cv_level_scores(P: np.ndarray, Y: np.ndarray, classes: Sequence[str], levels: Mapping[str, Sequence[str]],
                    folds: Sequence[tuple[np.ndarray, np.ndarray]], min_support: int = 10) -> dict[str, dict[str, Any]]:
    """Scores of out-of-fold probabilities ``P`` (columns: ``classes``) per level, over the
    level's classes with at least ``min_support`` positive rows in ``Y`` (0/1): macro-AUROC
    and macro-AP per test fold (``auroc``/``ap``: their mean, ``*_sd``, ``*_folds``) and on
    the pooled predictions (``pooled_*``), and the macro-F1 of the pooled predictions at one
    threshold per level chosen for each test fold on the other folds' predictions (``f1``),
    never on the fold's own labels (``f1_per_class``: one threshold per class)."""
    classes = [str(c) for c in classes]
    col = {c: j for j, c in enumerate(classes)}
    support = Y.sum(axis=0)
    out: dict[str, dict[str, Any]] = {}
    for level, members in levels.items():
        cols = np.array([col[str(m)] for m in members if str(m) in col and support[col[str(m)]] >= min_support],
                        dtype=int)
        if not len(cols):
            continue
        names = [classes[j] for j in cols]
        per_fold, pred = [], np.zeros((2, len(Y), len(cols)), dtype=bool)
        for k, (_, test) in enumerate(folds):
            others = np.concatenate([t for i, (_, t) in enumerate(folds) if i != k])
            for p, per_class in enumerate((False, True)):
                t = best_threshold(Y[np.ix_(others, cols)], P[np.ix_(others, cols)], names, per_class=per_class)
                pred[p, test] = P[np.ix_(test, cols)] >= t
            per_fold.append(level_metrics(Y[np.ix_(test, cols)], P[np.ix_(test, cols)], names, 1))
        pooled = level_metrics(Y[:, cols], P[:, cols], names, 1)
        tp = (pred & (Y[:, cols] > 0)).sum(axis=1)
        f1 = 2 * tp / np.maximum(pred.sum(axis=1) + Y[:, cols].sum(axis=0), 1)
        au = [m["macro_auroc"] for m in per_fold if m["macro_auroc"] is not None]
        ap = [m["macro_ap"] for m in per_fold if m["macro_ap"] is not None]
        out[level] = {
            "n_classes": len(cols), "min_support": int(min_support),
            "auroc": float(np.mean(au)) if au else None, "auroc_sd": float(np.std(au)) if au else None,
            "ap": float(np.mean(ap)) if ap else None, "ap_sd": float(np.std(ap)) if ap else None,
            "auroc_folds": au, "ap_folds": ap,
            "pooled_auroc": pooled["macro_auroc"], "pooled_ap": pooled["macro_ap"],
            "f1": float(f1[0].mean()), "f1_per_class": float(f1[1].mean()),
        }
    return out


def parent_child_gap(proba: np.ndarray, classes: Sequence[str],
                     parents: Mapping[str, str | None]) -> float:
    """The largest ``p(child) - p(parent)`` over rows and the class pairs of ``parents``
    (child -> parent) that both have a column: <= 0 when no parent is below its child."""
    col = {str(c): j for j, c in enumerate(classes)}
    proba = _check_proba(proba, len(proba), classes)
    pairs = [(col[str(c)], col[str(p)]) for c, p in parents.items()
             if p is not None and str(c) in col and str(p) in col]
    if not pairs or not len(proba):
        return float("-inf")
    child, parent = (np.array(x) for x in zip(*pairs))
    return float((proba[:, child] - proba[:, parent]).max())


def grouped_metrics(
    y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str], groups: Sequence[Any]
) -> dict[str, dict[str, Any]]:
    """:func:`single_label_metrics` per group (e.g. per ``source``); missing groups -> "(missing)"."""
    proba = _check_proba(proba, len(y_true), classes)
    if len(groups) != len(y_true):
        raise DataError(f"{len(groups)} group values for {len(y_true)} samples")
    s = pd.Series(list(groups), dtype=object)
    g = s.where(s.notna(), "(missing)").astype(str).to_numpy()
    y = np.asarray([str(v) for v in y_true], dtype=object)
    return {
        name: single_label_metrics(y[g == name], proba[g == name], classes)
        for name in sorted(set(g))
    }


def _take(a: Any, idx: np.ndarray) -> Any:
    return a.iloc[idx] if hasattr(a, "iloc") else a[idx]


def _fill_groups(groups: Sequence[Any]) -> np.ndarray:
    """Group labels as strings; a missing value (None, NaN, "") becomes a group of its own."""
    s = pd.Series(list(groups), dtype=object)
    missing = s.isna() | (s.astype(str).str.strip() == "")
    out = "g:" + s.astype(str)
    out[missing] = [f"row:{i}" for i in np.flatnonzero(missing.to_numpy())]
    return out.to_numpy()


def cross_val_predict_proba(
    make_estimator: Callable[[], Any],
    X: Any,
    y: Sequence[str],
    groups: Sequence[Any] | None = None,
    n_splits: int = 5,
    random_state: int = 0,
    fit_kwargs_fn: Callable[[np.ndarray], dict[str, Any]] | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
    predict_kwargs_fn: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Out-of-fold class probabilities for every row, columns in sorted-class order.

    With ``groups`` (e.g. artist) folds come from StratifiedGroupKFold, so one group never
    sits on both sides of a split; rows with a missing group are groups of their own.
    Without, StratifiedKFold. A fold model that never saw a class scores it 0. Arrays in
    ``extra`` are sliced per fold and passed by name to ``fit`` and ``predict_proba``;
    ``fit_kwargs_fn(train_idx)`` / ``predict_kwargs_fn(test_idx)`` add further keywords.
    """
    y = np.asarray([str(v) for v in y], dtype=object)
    n = len(y)
    if len(X) != n:
        raise DataError(f"X has {len(X)} rows but y has {n} labels")
    if n_splits < 2:
        raise DataError(f"n_splits must be at least 2, got {n_splits}")
    for name, arr in (extra or {}).items():
        if len(arr) != n:
            raise DataError(f"extra array {name!r} has {len(arr)} rows, expected {n}")
    classes = sorted(set(y))
    if groups is not None:
        if len(groups) != n:
            raise DataError(f"{len(groups)} group values for {n} samples")
        g = _fill_groups(groups)
        if len(set(g)) < n_splits:
            raise DataError(f"only {len(set(g))} distinct groups for {n_splits} folds")
        splits = StratifiedGroupKFold(n_splits, shuffle=True, random_state=random_state).split(
            np.zeros(n), y, g
        )
    else:
        if n < n_splits:
            raise DataError(f"only {n} samples for {n_splits} folds")
        splits = StratifiedKFold(n_splits, shuffle=True, random_state=random_state).split(
            np.zeros(n), y
        )
    col = {c: j for j, c in enumerate(classes)}
    oof = np.zeros((n, len(classes)), dtype=np.float64)
    for train, test in splits:
        fit_kw = {k: _take(v, train) for k, v in (extra or {}).items()}
        pred_kw = {k: _take(v, test) for k, v in (extra or {}).items()}
        fit_kw.update(fit_kwargs_fn(train) if fit_kwargs_fn else {})
        pred_kw.update(predict_kwargs_fn(test) if predict_kwargs_fn else {})
        est = make_estimator()
        est.fit(_take(X, train), y[train], **fit_kw)
        p = np.asarray(est.predict_proba(_take(X, test), **pred_kw), dtype=np.float64)
        seen = [col[str(c)] for c in est.classes_]
        if p.shape != (len(test), len(seen)):
            raise DataError(f"predict_proba gave shape {p.shape}, expected {(len(test), len(seen))}")
        oof[np.ix_(test, seen)] = p
    return oof, classes


def compare_table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per method: headline metrics plus accuracy, macro-F1 and top-3 accuracy of each
    group in ``by_source`` (columns ``accuracy[<source>]``, ``macro_f1[<source>]``, ...)."""
    rows = []
    for name, m in results.items():
        row: dict[str, Any] = {"method": name, "n": m.get("n")}
        row.update({k: m.get(k) for k in HEADLINE})
        by_source = sorted((m.get("by_source") or {}).items())
        for key in ("accuracy", "macro_f1", "top3_accuracy"):
            for src, sm in by_source:
                row[f"{key}[{src}]"] = sm.get(key)
        rows.append(row)
    return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()


def to_markdown(df: pd.DataFrame, floatfmt: str = ".3f", index: bool = True) -> str:
    """A GitHub-style markdown table (no ``tabulate`` needed); ``None``/NaN shown as ``-``."""
    if index:
        df = df.reset_index()

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if isinstance(v, (float, np.floating)):
            return format(v, floatfmt)
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = [cell(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> Path:
    return atomic_write_text(path, text)


def plot_confusion(
    confusion: Sequence[Sequence[float]], classes: Sequence[str], path: Path,
    normalize: bool = True,
) -> Path:
    """Save a confusion-matrix heat map (rows true, columns predicted) as PNG."""
    cm = np.asarray(confusion, dtype=np.float64)
    k = len(classes)
    if cm.shape != (k, k):
        raise DataError(f"confusion matrix has shape {cm.shape}, expected ({k}, {k})")
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = max(4.0, 0.45 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), [str(c) for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalised)" if normalize else "confusion (counts)")
    if k <= 20:
        top = cm.max() if cm.size else 0
        for i in range(k):
            for j in range(k):
                txt = f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > 0.5 * top else "black")
    fig.tight_layout()
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))


def write_confusion_csv(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path
) -> Path:
    """Save the confusion matrix as CSV, rows true and columns predicted."""
    df = pd.DataFrame(np.asarray(confusion), index=list(classes), columns=list(classes))
    df.index.name = "true\\predicted"
    return atomic_write(Path(path), lambda tmp: safe_frame(df).to_csv(tmp))


def _multi_label_section(ml: Mapping[str, Any]) -> list[str]:
    keys = ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc", "macro_f1")
    head = pd.DataFrame([{k: ml.get(k) for k in ("n", *keys)}])
    return ["## Multi-label", "", to_markdown(head, index=False),
            to_markdown(pd.DataFrame(ml["per_class"]), index=False)]


def write_report(
    metrics: Mapping[str, Any], out_dir: Path, title: str,
    extra_tables: Mapping[str, pd.DataFrame] | None = None,
) -> Path:
    """Write ``report.md`` (plus ``confusion.png``/``confusion.csv``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    if "accuracy" in metrics:
        head = pd.DataFrame([{k: metrics.get(k) for k in ("n", *HEADLINE)}])
        parts += ["## Headline", "", to_markdown(head, index=False)]
    if metrics.get("per_class") and "precision" in metrics["per_class"][0]:
        parts += ["## Per genre", "", to_markdown(pd.DataFrame(metrics["per_class"]), index=False)]
    if metrics.get("by_source"):
        src = pd.DataFrame([{"source": s, **{k: m.get(k) for k in ("n", *HEADLINE)}}
                            for s, m in sorted(metrics["by_source"].items())])
        parts += ["## Per source", "", to_markdown(src, index=False)]
    if metrics.get("confusion") is not None:
        plot_confusion(metrics["confusion"], metrics["classes"], out_dir / "confusion.png")
        write_confusion_csv(metrics["confusion"], metrics["classes"], out_dir / "confusion.csv")
        parts += ["## Confusion", "", "![confusion matrix](confusion.png)", "",
                  "Counts: [confusion.csv](confusion.csv) (rows true, columns predicted).", ""]
    ml = metrics.get("multi_label") or (metrics if "macro_auroc" in metrics else None)
    if ml:
        parts += _multi_label_section(ml)
    for name, table in (extra_tables or {}).items():
        parts += [f"## {name}", "", to_markdown(table)]
    return _write_text(out_dir / "report.md", "\n".join(parts))
