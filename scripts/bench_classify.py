#!/usr/bin/env python
"""Latency of classifying one cover through the library with the model loaded.

    python scripts/bench_classify.py --index indexes/covers [--n 100]

Times ``Engine.classify(Image.open(path))`` (decode, resize, forward at batch 1, Gram,
compression, head) for each method on real covers, after a warm-up; prints p50/p95/mean.
Also times ``Engine.similar``. Needs an index with trained heads (`stylegen train`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stylegen.engine import Engine


def timed(fn, items) -> list[float]:
    out = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("indexes/covers"))
    ap.add_argument("--n", type=int, default=100)
    a = ap.parse_args()
    if not (a.index / "CURRENT").exists():
        sys.exit(f"skipped: no index at {a.index} (run stylegen embed + stylegen train first)")
    engine = Engine.open(a.index)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(engine.index), size=min(a.n, len(engine.index)), replace=False)
    paths = [engine.cover_path(int(r)) for r in rows]
    for p in paths[:5]:  # warm-up: first calls build kernels
        engine.classify(Image.open(p))
    print(f"{len(paths)} covers, index of {len(engine.index)}, device {engine.featurizer.device}, "
          f"precision {engine.featurizer.precision}")
    print("| call | p50 ms | p95 ms | mean ms |\n|---|---:|---:|---:|")
    cases = {f"classify ({m})": (lambda p, m=m: engine.classify(Image.open(p), method=m))
             for m in ("head", "knn", "ensemble")}
    cases["similar (k=12, both)"] = lambda p: engine.similar(Image.open(p), k=12)
    for name, fn in cases.items():
        ms = timed(fn, paths)
        p95 = float(np.percentile(ms, 95))
        print(f"| {name} | {statistics.median(ms):.1f} | {p95:.1f} | {statistics.fmean(ms):.1f} |")


if __name__ == "__main__":
    main()
