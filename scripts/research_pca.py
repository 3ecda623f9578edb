#!/usr/bin/env python
"""How many power iterations does the compression's randomized PCA need?

    python scripts/research_pca.py --index indexes/covers320 [--iterations auto,4,2,1] [--queries 1000]

Fitting the PCA is the largest cost of a new index that the exported runtimes do not speed
up. This reads the index's raw part vectors (its ingest shards), fits each part's PCA as
:func:`stylegen.index.compress.fit_projection` does (scikit-learn, randomized SVD, the index's
dims and seed) with each ``--iterations`` setting (``auto``: scikit-learn's default, the
product's), and prints per setting: the fit time, the share of each part's variance the
projection keeps, and how many of the 10 nearest neighbours of ``--queries`` covers (combined
vectors, :func:`stylegen.index.compress.combine`) stay those of the first setting. Prints the CPU.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from bench_coldstart import cpu_line
from sklearn.decomposition import PCA

from stylegen.index.build import raw_batches
from stylegen.index.compress import combine
from stylegen.index.store import Index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--iterations", default="auto,4,2,1")
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    index = Index.open(args.index)
    batches = raw_batches(index)
    if batches is None:
        raise SystemExit(f"{args.index} keeps no raw vectors (no ingest shards)")
    raw: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for part, x in batch.items():
            raw.setdefault(part, []).append(x)
    parts = {p: np.concatenate(v) for p, v in raw.items()}
    comp = index.config.compression
    print(cpu_line())
    print(f"{len(index)} covers; " + ", ".join(f"{p} {x.shape[1]} -> {comp.dims.get(p, 256)} dims"
                                                for p, x in parts.items()))
    total = {p: float(((x - x.mean(0)) ** 2).sum()) for p, x in parts.items()}
    reference = None
    print("\n| power iterations | fit s | variance kept | kNN@10 unchanged |\n|---|---:|---|---:|")
    for setting in args.iterations.split(","):
        q = setting if setting == "auto" else int(setting)
        t = time.perf_counter()
        fitted = {p: PCA(n_components=comp.dims.get(p, 256), svd_solver="randomized", iterated_power=q,
                         random_state=comp.seed).fit(x) for p, x in parts.items()}
        seconds = time.perf_counter() - t
        projected = {p: (parts[p] - f.mean_) @ f.components_.T for p, f in fitted.items()}
        vectors, _ = combine(projected, index.config.features.weights)
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        _, nn = flat.search(vectors[:args.queries], 11)
        reference = nn if reference is None else reference
        same = np.mean([len(set(a[1:]) & set(b[1:])) / 10 for a, b in zip(nn, reference, strict=True)])
        kept = ", ".join(f"{p} {float((y ** 2).sum()) / total[p]:.4f}" for p, y in projected.items())
        print(f"| {setting} | {seconds:.1f} | {kept} | {same:.3f} |", flush=True)
    print(cpu_line())


if __name__ == "__main__":
    main()
