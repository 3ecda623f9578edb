#!/usr/bin/env python
"""Vectors and genre calls of an exported runtime against eager torch fp32 on real covers.

    python scripts/compare_runtimes.py --index indexes/covers [--n 200] [--runtime onnx]

For ``--n`` covers of the index: the raw part vectors (cosine per vector, min and mean), the
final index vectors after the index's PCA, and the top-1 genre of the index's default head
(kNN votes leave each cover's own row out, as for any cover of the index) from both
runtimes. Needs trained heads (`stylegen train`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coldstart import cpu_line


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("indexes/covers"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--runtime", default="onnx")
    a = ap.parse_args()
    from stylegen.featurize.runtime import load_featurizer
    from stylegen.index.compress import combine
    from stylegen.query.engine import Engine
    from stylegen.sources import images

    engine = Engine.open(a.index, device="cpu")
    index = engine.index
    method, name = engine.head_name(None)
    rows = np.sort(np.random.default_rng(0).choice(len(index), size=min(a.n, len(index)), replace=False))
    pixels = np.stack([images.prepare(p, index.preprocess) for p in index.rows(rows)["path"]])
    out = {}
    for rt in ("torch", a.runtime):
        feat = load_featurizer(index.config, "cpu", "fp32", runtime=rt)
        raw = [feat(pixels[i:i + 16]) for i in range(0, len(pixels), 16)]
        raw = {p: np.concatenate([r[p] for r in raw]) for p in raw[0]}
        vectors = combine(index.compressor.transform(raw), index.config.features.weights)[0]
        proba, classes, _ = engine.predict_proba(vectors, method, rows=[int(r) for r in rows])
        out[rt] = (raw, vectors, np.asarray(classes)[np.argmax(proba, 1)])
    (raw_t, vec_t, top_t), (raw_r, vec_r, top_r) = out["torch"], out[a.runtime]
    print(cpu_line())
    print(f"{len(rows)} covers of {a.index}; torch fp32 vs {a.runtime}; head: {name} ({method})\n")
    print("| compared | min cosine | mean cosine |\n|---|---:|---:|")
    for p in raw_t:
        c = cosines(raw_t[p], raw_r[p])
        print(f"| raw {p} vector | {c.min():.6f} | {c.mean():.6f} |")
    c = cosines(vec_t, vec_r)
    print(f"| index vector (after PCA) | {c.min():.6f} | {c.mean():.6f} |")
    same = float(np.mean(top_t == top_r))
    print(f"\ntop-1 genre identical: {int(np.sum(top_t == top_r))}/{len(rows)} ({same:.1%})")


if __name__ == "__main__":
    main()
