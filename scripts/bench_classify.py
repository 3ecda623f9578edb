#!/usr/bin/env python
"""Latency of classifying one cover through the library with the model loaded.

    python scripts/bench_classify.py --index indexes/covers [--n 100] [--methods head,knn,ensemble]

Times classifying one decoded cover (``Engine.query(PIL image)``, or ``Engine.classify`` on
engines without ``query``: resize, forward at batch 1, Gram, compression, head) for each
method on real covers, after a warm-up; prints p50/p95/mean, the featurizer's runtime and
precision, the CPU and its load. Also times similar-cover search. Needs an index with
trained heads (`stylegen train`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stylegen.query.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coldstart import cpu_line


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
    ap.add_argument("--methods", default="head,knn,ensemble")
    ap.add_argument("--runtime", default="auto", help="featurizer runtime: auto | torch | onnx | openvino")
    a = ap.parse_args()
    if not (a.index / "CURRENT").exists():
        sys.exit(f"skipped: no index at {a.index} (run stylegen embed + stylegen train first)")
    engine = Engine.open(a.index)
    if a.runtime != "auto":  # the engine chooses by itself; the benchmark may impose one
        from stylegen.featurize.runtime import load_featurizer

        engine._featurizer = load_featurizer(engine.index.config, "cpu", engine.index.manifest.get("precision", "auto"),
                                             runtime=a.runtime)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(engine.index), size=min(a.n, len(engine.index)), replace=False)
    paths = list(engine.index.rows([int(r) for r in rows])["path"])
    if hasattr(engine, "query"):
        def classify(p, m=None):
            return engine.query(Image.open(p), method=m)

        def similar(p):
            return engine.query(Image.open(p), k=12)
    else:
        def classify(p, m=None):
            return engine.classify(Image.open(p), method=m)

        def similar(p):
            return engine.similar(Image.open(p), k=12)
    for p in paths[:5]:  # warm-up: first calls build kernels
        classify(p)
    feat = engine.featurizer
    print(cpu_line())
    print(f"{len(paths)} covers, index of {len(engine.index)}, device {feat.device}, "
          f"runtime {getattr(feat, 'runtime', 'torch')}, precision {feat.precision}")
    print("| call | p50 ms | p95 ms | mean ms |\n|---|---:|---:|---:|")
    cases = {f"classify ({m})": (lambda p, m=m: classify(p, m)) for m in a.methods.split(",")}
    cases["similar (k=12, both)"] = similar
    for name, fn in cases.items():
        ms = timed(fn, paths)
        p95 = float(np.percentile(ms, 95))
        print(f"| {name} | {statistics.median(ms):.1f} | {p95:.1f} | {statistics.fmean(ms):.1f} |")
    print(cpu_line())


if __name__ == "__main__":
    main()
