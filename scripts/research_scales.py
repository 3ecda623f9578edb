#!/usr/bin/env python
"""Do heavier Gram features pay on the covers? A second input scale and a spatial pyramid.

    python scripts/research_scales.py extract --size 224 --pyramid   # full + 4 quadrant Grams
    python scripts/research_scales.py extract --size 320             # full Gram at 320 px
    python scripts/research_scales.py extract --size 384             # full Gram at 384 px
    python scripts/research_scales.py cv [--heads linear,mlp]

``extract`` runs the product's featurizer definition (:func:`stylegen.featurize.features.style_vector`:
taps stage4-6, channels sketched to 128, signed sqrt, per-layer L2) in an ONNX Runtime graph
exported by this script, with the product's decoding (:class:`stylegen.config.Preprocess`) at
``--size``. ``--pyramid`` adds the style vector of each quadrant of every tap's activation map
(spatial pyramid level 1; odd maps split at H//2, W//2). Raw vectors go to
indexes/research/scales-<size>[-pyramid].npz (float16; content float32).

``cv`` compares vector recipes with the product's heads (``stylegen.heads.train.make_heads``:
LinearHead with C by inner CV, MLPHead) under the protocol of docs/results.md: the 4,621
single-genre covers, 5-fold artist-disjoint CV (StratifiedGroupKFold on artist, seed 0), PCA
fitted unsupervised on all covers, heads fitted on training folds only. Each part is PCA-256,
L2-normalised and combined as the product does (``stylegen.index.compress.combine``); style parts
share weight 1 (each 1/sqrt(n_style)), content weight 1. Results: docs/results_covers_research.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"
CACHE = ROOT / "indexes" / "research"
TAPS = ("stage4", "stage5", "stage6")
MAX_CH = 128


def _npz(size: int, pyramid: bool) -> Path:
    return CACHE / f"scales-{size}{'-pyramid' if pyramid else ''}.npz"


def export(size: int, pyramid: bool, path: Path) -> list[str]:
    """ONNX graph (the product's export, other outputs): uint8 (B, S, S, 3) -> style (full),
    [style_q0..q3], content."""
    from stylegen.config import BackboneConfig
    from stylegen.featurize import backbones
    from stylegen.featurize.features import l2_normalize, style_vector
    from stylegen.featurize.runtime import export_graph

    def quadrant(a, top: bool, left: bool):
        h, w = a.shape[2] // 2, a.shape[3] // 2
        return a[:, :, slice(0, h) if top else slice(h, None), slice(0, w) if left else slice(w, None)]

    def outputs(acts: dict, content, proj: dict) -> tuple:
        out = [style_vector(acts, True, MAX_CH, proj)]
        if pyramid:
            out += [style_vector({t: quadrant(a, top, left) for t, a in acts.items()}, True, MAX_CH, proj)
                    for top in (True, False) for left in (True, False)]
        return (*out, l2_normalize(content.float()))

    names = ["style"] + ([f"style_q{i}" for i in range(4)] if pyramid else []) + ["content"]
    bb = backbones.build(BackboneConfig(taps=TAPS, image_size=size))
    export_graph(bb, MAX_CH, outputs, names, path)
    return names


def extract(size: int, pyramid: bool, batch_size: int = 16) -> None:
    import onnxruntime as ort

    from stylegen.config import Preprocess
    from stylegen.index.ingest import read_batches
    from stylegen.sources import images

    CACHE.mkdir(parents=True, exist_ok=True)
    graph = CACHE / f"scales-{size}{'-pyramid' if pyramid else ''}.onnx"
    names = export(size, pyramid, graph)
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    # the product's graph names its input "pixels" too (stylegen.featurize.runtime.INPUT)
    rows = pd.read_csv(COVERS)
    paths = [str(COVERS.parent / p) for p in rows["image"]]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    t, done = time.perf_counter(), 0
    for _rows, pixels, bad in read_batches(list(range(len(paths))), paths, Preprocess(size=size),
                                           batch_size, 1, images.DEFAULT_MAX_PIXELS):
        assert not bad and pixels is not None, bad
        for n, v in zip(names, session.run(None, {"pixels": pixels}), strict=True):
            out[n].append(v.astype(np.float32 if n == "content" else np.float16))
        done += len(pixels)
        print(f"\r{done}/{len(paths)} {done / (time.perf_counter() - t):.1f} img/s", end="",
              file=sys.stderr)
    np.savez(_npz(size, pyramid), **{n: np.concatenate(v) for n, v in out.items()})
    print(f"\nwrote {_npz(size, pyramid)} in {time.perf_counter() - t:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------------------------- CV
def _pca(x: np.ndarray, dim: int = 256) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = np.asarray(x, np.float32)
    return PCA(min(dim, *x.shape), random_state=0, svd_solver="randomized").fit_transform(x)


def recipes() -> dict[str, dict[str, np.ndarray]]:
    """Named recipes -> their PCA-256 parts (style parts first, ``content`` last)."""
    base = np.load(_npz(224, True))
    big = np.load(_npz(320, False)) if _npz(320, False).is_file() else None
    style, content = _pca(base["style"]), _pca(base["content"])
    quads = np.concatenate([base[f"style_q{i}"] for i in range(4)], axis=1)
    out = {
        "baseline (style 224 + content)": {"style": style, "content": content},
        "+ pyramid (4 quadrants, one PCA)": {"style": style, "quads": _pca(quads), "content": content},
        "+ pyramid (quadrants averaged)": {
            "style": style, "quads": _pca(np.mean([base[f"style_q{i}"].astype(np.float32)
                                                    for i in range(4)], axis=0)), "content": content},
    }
    if big is not None:
        style320 = _pca(big["style"])
        out |= {
            "+ style 320": {"style": style, "style320": style320, "content": content},
            "style 224+320 averaged": {"style": _pca((base["style"].astype(np.float32)
                                                     + big["style"].astype(np.float32)) / 2),
                                       "content": content},
            "+ style 320 + content 320": {"style": style, "style320": style320, "content": content,
                                          "content320": _pca(big["content"])},
            "320 only (style + content)": {"style": style320, "content": _pca(big["content"])},
        }
    for size in (384,):  # the top of the 320-384 px range, where extracted
        if _npz(size, False).is_file():
            more = np.load(_npz(size, False))
            out[f"{size} only (style + content)"] = {"style": _pca(more["style"]), "content": _pca(more["content"])}
    return out


def combine_parts(parts: dict[str, np.ndarray]) -> np.ndarray:
    from stylegen.index.compress import combine

    n_style = sum(not k.startswith("content") for k in parts)
    weights = {k: 1.0 if k.startswith("content") else 1 / np.sqrt(n_style) for k in parts}
    return combine(parts, weights)[0]


def cv(heads: list[str], out: Path, seed: int = 0, only: str | None = None) -> None:
    from stylegen.evaluation.metrics import cross_val_predict_proba, single_label_metrics
    from stylegen.heads.train import make_heads

    rows = pd.read_csv(COVERS)
    lab = rows["genre"].notna().to_numpy()
    artist = rows["artist"].fillna("").astype(str)
    groups = np.array([a if a else f"__row{i}" for i, a in enumerate(artist)])[lab]
    y = rows["genre"].to_numpy()[lab]
    results = []
    for name, parts in recipes().items():
        if only and not (name.startswith("baseline") or any(o in name for o in only.split(","))):
            continue
        x = combine_parts(parts)[lab]
        for head in heads:
            t = time.perf_counter()
            proba, classes = cross_val_predict_proba(lambda h=head: make_heads(False)[h], x, y,
                                                     groups, n_splits=5, random_state=seed)
            m = single_label_metrics(y, proba, classes)
            res = {"recipe": name, "head": head, "fold_seed": seed, "dim": int(x.shape[1]),
                   "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
                   "top3": round(m["top3_accuracy"], 4), "seconds": round(time.perf_counter() - t, 1)}
            results.append(res)
            print(json.dumps(res), flush=True)
    base = {r["head"]: r for r in results if r["recipe"].startswith("baseline")}
    from bench_coldstart import cpu_line

    lines = [cpu_line(), "",
             "| recipe | head | dim | accuracy | Δ acc | macro-F1 | Δ F1 | top-3 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b = base[r["head"]]
        lines.append(f"| {r['recipe']} | {r['head']} | {r['dim']} | {r['accuracy']:.3f} | "
                     f"{r['accuracy'] - b['accuracy']:+.3f} | {r['macro_f1']:.3f} | "
                     f"{r['macro_f1'] - b['macro_f1']:+.3f} | {r['top3']:.3f} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["extract", "cv"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--pyramid", action="store_true")
    ap.add_argument("--heads", default="linear,mlp")
    ap.add_argument("--out", type=Path, default=CACHE / "scales.md")
    ap.add_argument("--seed", type=int, default=0, help="fold assignment seed (robustness check)")
    ap.add_argument("--only", default=None, help="comma-separated recipe name parts (baseline always)")
    args = ap.parse_args()
    if not COVERS.is_file():
        raise SystemExit(f"real covers not found at {COVERS} (../shared/data)")
    if args.cmd == "extract":
        extract(args.size, args.pyramid)
    else:
        cv(args.heads.split(","), args.out, args.seed, args.only)


if __name__ == "__main__":
    main()
