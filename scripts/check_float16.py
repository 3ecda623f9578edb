#!/usr/bin/env python
"""What float16 vectors cost in neighbours: recall@10 of search over the rounded vectors.

    python scripts/check_float16.py --float32 indexes/covers --float16 indexes/covers-f16 --n 1000000

* **real covers**: two indexes of the same covers, one made with ``--vectors-dtype float16``.
  Each cover's top-10 (itself left out) by the float16 index's own search against the exact
  top-10 of the float32 vectors;
* **at scale**: ``--n`` vectors of the realistic corpus (``scripts/realistic_corpus.py``),
  exact top-10 of 500 held-out queries over the float16-rounded rows against the float32 rows.

Heads' cross-validated accuracy on the two indexes is ``stylegen evaluate --cv 5`` on each
(docs/scale.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import realistic_corpus
from bench_coldstart import cpu_line

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def main() -> None:
    import stylegen

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float32", type=Path, default=Path("indexes/covers"))
    p.add_argument("--float16", type=Path, default=Path("indexes/covers-f16"))
    p.add_argument("--real", type=Path, default=Path("indexes/merged"), help="real vectors the corpus is fitted to")
    p.add_argument("--n", type=int, default=1_000_000)
    a = p.parse_args()
    print(cpu_line())
    f32 = stylegen.Index.open(a.float32, use_gpu=False)
    f16 = stylegen.Index.open(a.float16, use_gpu=False)
    x32 = np.asarray(f32.vectors, np.float32)
    assert f16.manifest.get("vector_dtype") == "float16" and len(f16) == len(f32)
    truth = realistic_corpus.top_k(x32, x32, 10, skip_self=True)[1]
    _, ids = f16.search(np.asarray(f16.vectors, np.float32), k=11)
    own = [[j for j in row if j != i][:10] for i, row in enumerate(ids)]
    print(f"real covers ({len(f32)}): recall@10 of the float16 index's search vs exact float32: "
          f"{recall(np.array(own), truth):.4f}; max |float16 - float32| "
          f"{np.abs(np.asarray(f16.vectors, np.float32) - x32).max():.2e}")
    gen, _ = realistic_corpus.fit(realistic_corpus.real_vectors(a.real))
    base = gen.sample(a.n, 1)
    queries = gen.sample(500, 2)
    exact = realistic_corpus.top_k(base, queries, 10)[1]
    rounded = realistic_corpus.top_k(base.astype(np.float16).astype(np.float32), queries, 10)[1]
    print(f"realistic corpus ({a.n:,}): recall@10 of exact search over float16 rows vs float32 rows: "
          f"{recall(rounded, exact):.4f}")


if __name__ == "__main__":
    main()
