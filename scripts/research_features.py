#!/usr/bin/env python
"""Feature research on the real covers: cache per-layer Gram matrices once, then compare
tap layers, compression, flip, backbone and heads by artist-disjoint 5-fold CV.

    python scripts/research_features.py extract --backbone efficientnet-lite2 [--flip]
    python scripts/research_features.py sweep --backbone efficientnet-lite0 --grid layers
    python scripts/research_features.py sweep --grid best --source-breakdown

``extract`` writes indexes/research/<backbone>.npz (raw Gram upper triangles per stage,
float16, plus the pooled content); with ``--flip`` it runs the image and its mirror and
writes both <backbone>.npz and <backbone>-flip.npz (features averaged over the two views).

``sweep`` builds the vectors the way the product does (stylegen.featurize.features / compress):
style = concatenation of the tap layers' signed-sqrt, L2-normalised Gram vectors (layers
wider than ``max_ch`` channels sketched to ``max_ch`` channels, P G Pᵀ), one PCA per part
(style, content) fitted on the whole collection, parts normalised, weighted and joined
(stylegen.index.compress.combine). Heads only ever see the training folds. Every result line is
also appended to indexes/research/results.jsonl. Findings: docs/results_covers_research.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"
CACHE = ROOT / "indexes" / "research"
ALL_TAPS = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6")
WIDE_TAPS = ("stage7",)  # stored already sketched to 128 channels (full Gram too large)
S46 = ("stage4", "stage5", "stage6")


# --------------------------------------------------------------------------- extraction
def extract(backbone: str, flip: bool, batch_size: int = 32) -> None:
    from stylegen.config import BackboneConfig, FeatureConfig
    from stylegen.featurize import backbones
    from stylegen.featurize.features import Featurizer, channel_projection, gram_upper
    from stylegen.index.ingest import read_batches
    from stylegen.sources import images

    rows = pd.read_csv(COVERS)
    paths = [str(COVERS.parent / p) for p in rows["image"]]
    bb = backbones.build(BackboneConfig(name=backbone, taps=ALL_TAPS + WIDE_TAPS))
    feat = Featurizer(bb, FeatureConfig(), torch.device("cpu"), "bf16", True)
    views = ("plain", "flip") if flip else ("plain",)
    out: dict[str, dict[str, list[np.ndarray]]] = {v: {} for v in views}
    t = time.perf_counter()
    done = 0
    for _rows, pixels, bad in read_batches(list(range(len(paths))), paths, bb.preprocess,
                                           batch_size, 2, images.DEFAULT_MAX_PIXELS):
        assert not bad, bad
        x = feat.prepare(pixels)
        per_view = []
        for v in views:
            xv = x if v == "plain" else torch.flip(x, dims=[3])
            with torch.inference_mode(), feat._autocast():
                acts, content = bb.forward(xv)
            f = {}
            for tap, a in acts.items():
                if tap in WIDE_TAPS:
                    p = channel_projection(a.shape[1], 128)
                    a = torch.einsum("oc,bchw->bohw", p, a.float())
                f[tap] = gram_upper(a)
            f["content"] = content.float()
            per_view.append(f)
        # "plain" = first view; "flip" = mean of both views (raw features)
        for v in views:
            for k in per_view[0]:
                val = per_view[0][k] if v == "plain" else sum(pv[k] for pv in per_view) / len(per_view)
                out[v].setdefault(k, []).append(val.numpy().astype(np.float32))
        done += len(x)
        print(f"\r{done}/{len(paths)} {done / (time.perf_counter() - t):.1f} img/s", end="",
              file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    for v in views:
        path = CACHE / f"{backbone}{'-flip' if v == 'flip' else ''}.npz"
        np.savez(path, **{k: np.concatenate(a).astype(np.float32 if k == "content" else np.float16)
                          for k, a in out[v].items()})
        print(f"\nwrote {path}", file=sys.stderr)


# --------------------------------------------------------------------------- features
@dataclass(frozen=True)
class Spec:
    """One vector recipe and head. ``content`` / ``style`` dims of 0 drop that part."""

    backbone: str = "efficientnet-lite0"
    flip: bool = False
    taps: tuple[str, ...] = S46
    style: int = 256
    content: int = 256
    whiten: bool = False
    w_style: float = 1.0
    w_content: float = 1.0
    max_ch: int = 128  # product default (FeatureConfig.max_gram_channels); 0 = full Gram
    per_layer_pca: bool = False  # research variant: one PCA per tap layer instead of per part
    head: str = "lr"
    hp: tuple[tuple[str, Any], ...] = (("C", 0.1),)

    def label(self) -> str:
        bb = self.backbone.replace("efficientnet-", "")
        taps = ",".join(t.replace("stage", "s") for t in self.taps) or "-"
        hp = ",".join(f"{k}={v}" for k, v in self.hp)
        return (f"{bb}{'+flip' if self.flip else ''} taps={taps} style={self.style} "
                f"content={self.content}{' wh' if self.whiten else ''}"
                f"{'' if self.w_content == 1 else f' wc={self.w_content}'}"
                f"{'' if self.max_ch == 128 else f' maxch={self.max_ch}'}"
                f"{' perlayer' if self.per_layer_pca else ''} {self.head}({hp})")


@lru_cache(maxsize=4)
def _npz(backbone: str, flip: bool) -> dict[str, np.ndarray]:
    z = np.load(CACHE / f"{backbone}{'-flip' if flip else ''}.npz")
    return {k: z[k] for k in z.files}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _sym(upper: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    c = int((np.sqrt(8 * upper.shape[1] + 1) - 1) / 2)
    iu = np.triu_indices(c)
    return iu[0], iu[1], c


@lru_cache(maxsize=32)
def layer_vector(backbone: str, flip: bool, tap: str, max_ch: int) -> np.ndarray:
    """Signed-sqrt, L2-normalised Gram vector of one tap (sketched as the product does)."""
    from stylegen.featurize.features import channel_projection

    g = _npz(backbone, flip)[tap]
    i, j, c = _sym(g)
    if max_ch and c > max_ch and tap not in WIDE_TAPS:
        p = channel_projection(c, max_ch).numpy().astype(np.float32)
        iu = np.triu_indices(max_ch)
        parts = []
        for s in range(0, len(g), 512):  # P G Pᵀ in chunks (n x c x c is large)
            full = np.zeros((min(512, len(g) - s), c, c), np.float32)
            full[:, i, j] = g[s:s + 512]
            full[:, j, i] = g[s:s + 512]
            parts.append(np.einsum("oc,ncd,pd->nop", p, full, p, optimize=True)[:, iu[0], iu[1]])
        g = np.concatenate(parts)
    else:
        g = g.astype(np.float32)
    return _unit(np.sign(g) * np.sqrt(np.abs(g)))


def raw_part(backbone: str, flip: bool, part: str, taps: tuple[str, ...], max_ch: int) -> np.ndarray:
    if part == "content":
        return _unit(_npz(backbone, flip)["content"].astype(np.float32))
    blocks = [layer_vector(backbone, flip, t, max_ch) for t in taps]
    return np.concatenate(blocks, axis=1) / np.sqrt(len(blocks))


@lru_cache(maxsize=64)
def pca_scores(backbone: str, flip: bool, part: str, taps: tuple[str, ...], max_ch: int,
               dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Unwhitened PCA scores (n, dim) and explained variances, fitted on all covers."""
    from sklearn.decomposition import PCA

    key = f"{backbone}{'-flip' if flip else ''}_{part}_{'-'.join(taps)}_{max_ch}_{dim}"
    path = CACHE / "pca" / f"{key}.npz"
    if path.exists():
        z = np.load(path)
        return z["scores"], z["ev"]
    x = raw_part(backbone, flip, part, taps, max_ch)
    dim = min(dim, x.shape[1], x.shape[0])
    pca = PCA(dim, random_state=0, svd_solver="randomized").fit(x)
    scores, ev = pca.transform(x).astype(np.float32), pca.explained_variance_.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, scores=scores, ev=ev)
    return scores, ev


def compress(backbone: str, flip: bool, part: str, taps: tuple[str, ...], max_ch: int, dim: int,
             whiten: bool) -> np.ndarray:
    # PCA at a size from a fixed ladder, truncated: one fit serves several dims
    fit_dim = next(d for d in (256, 512, 1024, 2048) if d >= dim)
    s, ev = pca_scores(backbone, flip, part, taps, max_ch, fit_dim)
    s, ev = s[:, :dim], ev[:dim]
    return s / np.sqrt(ev) if whiten else s


def vectors(spec: Spec) -> np.ndarray:
    from stylegen.index.compress import combine

    backbones = spec.backbone.split("+")  # "a+b": the two backbones' vectors side by side
    parts: dict[str, np.ndarray] = {}
    for bb in backbones:
        if spec.style and spec.taps:
            taps = tuple(t for t in spec.taps if t in _npz(bb, spec.flip))
            if spec.per_layer_pca:
                for t in taps:
                    parts[f"{bb}:{t}"] = compress(bb, spec.flip, "style", (t,), spec.max_ch,
                                                  spec.style, spec.whiten)
            else:
                parts[f"{bb}:style"] = compress(bb, spec.flip, "style", taps, spec.max_ch,
                                                spec.style, spec.whiten)
        if spec.content:
            parts[f"{bb}:content"] = compress(bb, spec.flip, "content", (), 0, spec.content,
                                              spec.whiten)
    n_style = sum(":content" not in k for k in parts)
    weights = {k: spec.w_content if k.endswith(":content") else spec.w_style / np.sqrt(n_style)
               for k in parts}
    return combine(parts, weights)[0]


# --------------------------------------------------------------------------- heads
def make_head(spec: Spec):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stylegen.heads import EnsembleHead, KNNHead, LinearHead, MLPHead

    hp = dict(spec.hp)

    def lr(C: float):
        return make_pipeline(StandardScaler(),
                             LogisticRegression(C=C, max_iter=500, class_weight="balanced"))

    if spec.head == "lr":  # fixed C (fast); LinearHead picks C by inner CV
        return lambda: lr(hp["C"])
    if spec.head == "linear":
        return lambda: LinearHead(Cs=hp.get("Cs", (0.01, 0.1, 1, 10)))
    if spec.head == "knn":
        return lambda: KNNHead(k=hp["k"], temperature=hp["t"])
    if spec.head == "mlp":
        return lambda: MLPHead(hidden=hp.get("hidden", (256,)), dropout=hp.get("dropout", 0.5),
                               weight_decay=hp.get("wd", 1e-4), num_threads=2)
    if spec.head == "ens":
        return lambda: EnsembleHead(lr(hp["C"]), KNNHead(k=hp["k"], temperature=hp["t"]))
    raise ValueError(spec.head)


# --------------------------------------------------------------------------- evaluation
@lru_cache(maxsize=1)
def labelled() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rows = pd.read_csv(COVERS)
    lab = rows["genre"].notna().to_numpy()
    artist = rows["artist"].fillna("").astype(str)
    groups = np.array([a if a else f"__row{i}" for i, a in enumerate(artist)])
    return lab, rows["genre"].to_numpy()[lab], groups[lab], rows["source"].to_numpy()[lab]


def evaluate(spec: Spec, by_source: bool = False) -> dict[str, Any]:
    from stylegen.evaluation.metrics import (
        cross_val_predict_proba,
        grouped_metrics,
        single_label_metrics,
    )

    lab, y, groups, source = labelled()
    t = time.perf_counter()
    x = vectors(spec)[lab]
    proba, classes = cross_val_predict_proba(make_head(spec), x, y, groups, n_splits=5)
    m = single_label_metrics(y, proba, classes)
    res = {"label": spec.label(), "acc": m["accuracy"], "f1": m["macro_f1"],
           "top3": m["top3_accuracy"], "bal_acc": m["balanced_accuracy"], "dim": x.shape[1],
           "seconds": round(time.perf_counter() - t, 1), "spec": asdict(spec)}
    line = (f"{res['label']:78s} acc={res['acc']:.3f} f1={res['f1']:.3f} top3={res['top3']:.3f}"
            f" bal={res['bal_acc']:.3f} ({res['seconds']:.0f}s)")
    if by_source:
        g = grouped_metrics(y, proba, classes, source)
        res["by_source"] = {s: {"n": v["n"], "acc": v["accuracy"], "f1": v["macro_f1"]}
                            for s, v in g.items()}
        res["per_class"] = {c["genre"]: round(c["f1"], 3) for c in m["per_class"]}
        line += "  " + " ".join(f"{s}: n={v['n']} acc={v['accuracy']:.3f}" for s, v in g.items())
        line += "\n    per-class F1: " + " ".join(f"{k}={v}" for k, v in res["per_class"].items())
    print(line, flush=True)
    with open(CACHE / "results.jsonl", "a") as f:
        f.write(json.dumps(res, default=list) + "\n")
    return res


def grid(name: str, base: Spec) -> list[Spec]:
    """Named experiment groups; each varies one thing around ``base``."""
    def lr(C: float) -> tuple[tuple[str, float], ...]:
        return (("C", C),)

    if name == "C":
        return [replace(base, hp=lr(C)) for C in (0.003, 0.01, 0.03, 0.1)]
    if name == "layers":
        sets = [("stage4", "stage5", "stage6"), ("stage5", "stage6"), ("stage6",),
                ("stage3", "stage4", "stage5", "stage6"), ("stage2", "stage3", "stage4", "stage5")]
        if "stage7" in _npz(base.backbone.split("+")[0], base.flip):
            sets += [("stage5", "stage6", "stage7"), ("stage4", "stage5", "stage6", "stage7")]
        return ([replace(base, taps=s, content=0) for s in sets]
                + [replace(base, taps=s) for s in sets] + [replace(base, taps=(), style=0)])
    if name == "maxch":
        return [replace(base, max_ch=0), replace(base, per_layer_pca=True)]
    if name == "dims":
        return [replace(base, style=s, content=c)
                for s, c in ((128, 128), (512, 256), (1024, 256), (512, 512))]
    if name == "weights":
        return [replace(base, w_content=w) for w in (0.5, 0.75, 1.5, 2.0)]
    if name == "whiten":
        return [replace(base, whiten=True), replace(base, whiten=True, hp=lr(0.01))]
    if name == "knn":
        return [replace(base, head="knn", hp=(("k", k), ("t", t)))
                for k in (15, 30, 50) for t in (0.05, 0.1, 0.2)]
    if name == "knn_wh":
        return [replace(base, whiten=True, head="knn", hp=(("k", k), ("t", t)))
                for k in (15, 30, 50) for t in (0.05, 0.1)]
    if name == "mlp":
        return [replace(base, head="mlp", hp=(("hidden", h), ("dropout", d), ("wd", w)))
                for h, d, w in (((256,), 0.5, 1e-4), ((512,), 0.5, 1e-3), ((256,), 0.7, 1e-2))]
    if name == "ens":
        C = dict(base.hp).get("C", 0.003)
        return [replace(base, head="ens", hp=(("C", C), ("k", k), ("t", t)))
                for k, t in ((15, 0.05), (30, 0.05), (50, 0.1), (30, 0.2))]
    if name == "linear":
        return [replace(base, head="linear", hp=()),
                replace(base, head="linear", hp=(("Cs", (0.003, 0.01, 0.03, 0.1)),))]
    if name == "base":
        return [base]
    raise SystemExit(f"unknown grid {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["extract", "sweep"])
    ap.add_argument("--backbone", default="efficientnet-lite0",
                    help="for sweep, 'a+b' puts two backbones' vectors side by side")
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--grid", default="base", help="comma-separated names, see grid()")
    ap.add_argument("--taps", default=",".join(S46))
    ap.add_argument("--style", type=int, default=256)
    ap.add_argument("--content", type=int, default=256)
    ap.add_argument("--whiten", action="store_true")
    ap.add_argument("--w-content", type=float, default=1.0)
    ap.add_argument("--C", type=float, default=0.03)
    ap.add_argument("--head", default="lr", choices=["lr", "linear", "knn", "mlp", "ens"])
    ap.add_argument("--k", type=int, default=50, help="kNN neighbours (knn, ens)")
    ap.add_argument("--t", type=float, default=0.1, help="kNN temperature (knn, ens)")
    ap.add_argument("--source-breakdown", action="store_true")
    a = ap.parse_args()
    if not COVERS.exists():
        sys.exit(f"skipped: {COVERS} not found")
    if a.cmd == "extract":
        return extract(a.backbone, a.flip)
    base = Spec(backbone=a.backbone, flip=a.flip, taps=tuple(t for t in a.taps.split(",") if t),
                style=a.style, content=a.content, whiten=a.whiten, w_content=a.w_content,
                head=a.head, hp={"lr": (("C", a.C),), "linear": (), "mlp": (),
                                 "knn": (("k", a.k), ("t", a.t)),
                                 "ens": (("C", a.C), ("k", a.k), ("t", a.t))}[a.head])
    torch.set_num_threads(2)
    for g in a.grid.split(","):
        for spec in grid(g, base):
            evaluate(spec, by_source=a.source_breakdown)


if __name__ == "__main__":
    main()
