#!/usr/bin/env python
"""Incremental add: 100 new covers into the 4,844-cover index vs a full build, in one run.

    python scripts/bench_incremental.py [--index indexes/covers] [--new 100] [--full]

* works on a copy of the index (the original is never written); an index from before
  shards first moves its raw features into a shard (one-time, timed apart);
* trains heads on the copy when it has none (linear + knn, not timed);
* the 100 new covers are real covers mirrored and re-encoded (new bytes, new content hash);
* **add**: ``stylegen.index.ingest`` of the grown collection (4,844 + 100) into the copy, model load
  and hashing of every file included: the one command a user runs;
* **full build**: the build step alone over all covers (``stylegen index --refit``: fit on
  the sample, transform everything, write the index), plus embedding every cover at the rate
  this run measured (``--full`` embeds them all into a fresh index instead, ~10+ min);
* checks: old vectors bit-identical, feature_id unchanged, heads trained before the add load
  and classify the new covers without ``train``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"


def new_covers(n: int, folder: Path) -> pd.DataFrame:
    rows = pd.read_csv(COVERS, dtype=str, keep_default_na=False).head(n).copy()
    folder.mkdir(parents=True)
    paths = []
    for p in rows["image"]:
        out = folder / f"mirror_{Path(p).name}"
        Image.open(COVERS.parent / p).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(out, quality=90)
        paths.append(str(out))
    rows["image"] = paths
    return rows


def main() -> None:
    import stylegen
    from stylegen.index.ingest import build
    from stylegen.query.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("indexes/covers"))
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--full", action="store_true", help="also embed every cover into a fresh index")
    a = ap.parse_args()
    if not (a.index / "CURRENT").is_file() or not COVERS.exists():
        sys.exit(f"skipped: needs the built index at {a.index} and {COVERS}")
    info = Path("/proc/cpuinfo").read_text()
    model = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
    print(f"cpu: {model}, {os.cpu_count()} cores, flags: "
          f"{' '.join(f for f in ('avx2', 'avx512_bf16', 'amx_bf16') if f' {f}' in info)}; load {os.getloadavg()}")
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        idx = d / "covers"
        shutil.copytree(a.index, idx, ignore=shutil.ignore_patterns(".lock"))
        if not (idx / "heads" / "heads.json").is_file():
            from stylegen.heads.train import train

            train(idx, ["linear", "knn"], validate=False)
        before = stylegen.Index.open(idx)
        old_vectors, old_id, n_old = np.array(before.vectors), before.feature_id, len(before)
        t = time.perf_counter()
        build(idx)  # an index from before shards: its raw features move into a shard (once)
        out["migrate_legacy_raw_s"] = round(time.perf_counter() - t, 2)

        rows = pd.read_csv(COVERS, dtype=str, keep_default_na=False)
        rows["image"] = [str(COVERS.parent / p) for p in rows["image"]]
        grown = pd.concat([rows, new_covers(a.new, d / "new")], ignore_index=True)
        grown.to_csv(d / "grown.csv", index=False)

        t = time.perf_counter()
        report = stylegen.embed(d / "grown.csv", idx, progress=False)
        add_s = time.perf_counter() - t
        after = stylegen.Index.open(idx)
        engine = Engine.open(idx, device="cpu")
        proba, classes = engine.predict_proba(np.asarray(after.vectors[n_old:]), "head")[:2]
        cli = subprocess.run([sys.executable, "-m", "stylegen", "classify", grown["image"].iloc[-1],
                              "--index", str(idx), "--json"], capture_output=True, text=True, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        out["add"] = {
            "seconds": round(add_s, 1), "added": report.added, "embed_seconds": round(report.embed_seconds, 1),
            "build_seconds": round(report.build_seconds, 2), "count": len(after),
            "old_vectors_bit_identical": bool(np.array_equal(np.asarray(after.vectors[:n_old]), old_vectors)),
            "feature_id_unchanged": after.feature_id == old_id,
            "heads_classify_new_covers": proba.shape == (a.new, len(classes)),
            "cli_classify_exit_code": cli.returncode,
        }
        rate = report.added / report.embed_seconds

        t = time.perf_counter()
        refit = build(idx, refit=True)
        refit_s = time.perf_counter() - t
        out["full_build"] = {"build_step_refit_s": round(refit_s, 1), "covers": refit.count,
                             "embed_rate_img_s_this_run": round(rate, 2),
                             "embed_all_estimated_s": round(refit.count / rate, 1)}
        full_s = refit.count / rate + refit_s
        if a.full:
            t = time.perf_counter()
            stylegen.embed(d / "grown.csv", d / "fresh", progress=False)
            full_s = time.perf_counter() - t
            out["full_build"]["measured_full_embed_s"] = round(full_s, 1)
        out["full_build"]["seconds"] = round(full_s, 1)
        out["add_over_full"] = round(add_s / full_s, 4)
        recorded = json.loads((a.index / "embed_report.json").read_text()) if (a.index / "embed_report.json").is_file() else {}
        if recorded:
            out["recorded_full_embed_of_the_index_s"] = round(recorded["seconds"], 1)
            out["add_over_recorded_full"] = round(add_s / recorded["seconds"], 4)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
