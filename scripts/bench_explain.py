#!/usr/bin/env python
"""Warm latency of ``classify --explain`` on an index made by ``stylegen embed``.

    python scripts/bench_explain.py [--n 400] [--queries 30]

Embeds ``--n`` real covers of ../shared/data/covers into a temporary index (the product's
``stylegen embed`` and ``stylegen train --head knn --head linear``), then in a fresh process
times ``Engine.query(id, explain=True)`` for covers of the index (raw vectors read from the
shards) and for new images (one forward pass), after a warm-up, and says whether torch was
imported. Prints p50/p95 with the CPU line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"
sys.path.insert(0, str(ROOT / "scripts"))
from bench_coldstart import cpu_line  # noqa: E402  (after the path above)

PROBE = """
import json, statistics, sys, time
from stylegen.query.engine import Engine
engine = Engine.open(sys.argv[1], device="cpu")
new = json.loads(sys.argv[2]); q = int(sys.argv[3])
for method in ("knn", "head"):
    engine.query(0, method=method, explain=True); engine.query(new[0], method=method, explain=True)
out = {}
for method in ("knn", "head"):
    for kind, items in (("indexed", list(range(1, q + 1))), ("new", new[1:])):
        ms = []
        for it in items:
            t = time.perf_counter(); engine.query(it, method=method, explain=True)
            ms.append((time.perf_counter() - t) * 1000)
        ms.sort()
        out[f"{method}/{kind}"] = {"p50": statistics.median(ms), "p95": ms[int(0.95 * (len(ms) - 1))], "n": len(ms)}
out["torch_imported"] = "torch" in sys.modules
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--queries", type=int, default=30)
    a = ap.parse_args()
    if not COVERS.exists():
        sys.exit(f"skipped: real covers not found at {COVERS}")
    covers = pd.read_csv(COVERS).sample(a.n + a.queries, random_state=0)
    with tempfile.TemporaryDirectory() as d:
        manifest = Path(d) / "covers.csv"
        part = covers.iloc[: a.n].copy()
        part["image"] = [str(COVERS.parent / p) for p in part["image"]]
        part.to_csv(manifest, index=False)
        idx = Path(d) / "idx"
        for args in (["embed", str(manifest), "--index", str(idx), "--no-progress"],
                     ["train", "--index", str(idx), "--head", "knn", "--head", "linear"]):
            subprocess.run([sys.executable, "-m", "stylegen", *args], check=True, capture_output=True)
        new = [str(COVERS.parent / p) for p in covers["image"].iloc[a.n:]]
        run = subprocess.run([sys.executable, "-c", PROBE, str(idx), json.dumps(new), str(a.queries)],
                             check=True, capture_output=True, text=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print(cpu_line())
    print(f"index of {a.n} real covers made by `stylegen embed`; torch imported by explain: {out.pop('torch_imported')}")
    for key, v in out.items():
        print(f"  explain {key:14s} p50 {v['p50']:6.1f} ms  p95 {v['p95']:6.1f} ms  (n={v['n']})")


if __name__ == "__main__":
    main()
