"""How verified near-duplicate search scales: covers/s and memory at 10k and 100k covers.

There are 4,844 real covers, so larger collections are made from them: N vectors, each a real
cover's vector plus Gaussian noise (renormalised), each row pointing to that cover's image file.
Stage one (FAISS candidates, ``candidate_pairs``) runs on all N rows, measured whole. Stage two
(keypoints + verification) costs the same per cover at any N (each cover's keypoints once, then
its candidate pairs), so it is measured on the candidate pairs of ``--verify-sample`` random rows
(their keypoints and their partners') and scaled to N; the peak memory of that stage is
measured, and the keypoint files take 66 KB per cover on disk (memory-mapped).

Usage::

    python scripts/bench_verify_scale.py --index indexes/covers --work out/verify_scale --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coldstart import cpu_line  # noqa: E402

from stylegen.index.store import Index, write_snapshot  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic(base: Index, n: int, out: Path, seed: int = 0) -> Index:
    if (out / "CURRENT").is_file():
        return Index.open(out)
    r = np.random.default_rng(seed)
    src = r.integers(0, len(base), n)
    v = np.asarray(base.vectors, np.float32)[src] + r.normal(0, 0.02, (n, base.vectors.shape[1])).astype(np.float32)
    for p, (a, b) in base.slices.items():  # each part back to unit length, like the index's own
        v[:, a:b] /= np.linalg.norm(v[:, a:b], axis=1, keepdims=True) * np.sqrt(len(base.slices))
    meta = base.metadata.iloc[src].reset_index(drop=True)[["image", "path"]]
    meta["content_hash"] = [f"synthetic{i}" for i in range(n)]
    write_snapshot(out, {**base.manifest, "count": n}, v, meta, base.compressor, None)
    return Index.open(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--verify-sample", type=int, default=150)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from stylegen.apps.duplicates import candidate_pairs
    from stylegen.query.verify import MIRROR_MIN_SIMILARITY, KeypointCache

    print("CPU:", cpu_line(), flush=True)
    base = Index.open(args.index)
    res = {"cpu": cpu_line(), "sizes": {}}
    for n in (int(s) for s in args.sizes.split(",")):
        index = synthetic(base, n, args.work / f"n{n}")
        before = rss_mb()
        t = time.perf_counter()
        cand = candidate_pairs(index)
        t_cand = time.perf_counter() - t
        cand_rss = rss_mb()
        rows = np.random.default_rng(1).choice(n, args.verify_sample, replace=False)
        sub = cand[np.isin(cand["a"], rows) | np.isin(cand["b"], rows)]
        paths = list(index.metadata["path"])
        involved = np.unique(sub[["a", "b"]].to_numpy())
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            cache = KeypointCache(paths, folder=tmp)
            t = time.perf_counter()
            for r in involved:
                cache.get(int(r))
            t_kp = (time.perf_counter() - t) / len(involved)
            t = time.perf_counter()
            for a, b, sim in sub.itertuples(index=False):
                cache.verify(int(a), int(b), mirror=sim >= MIRROR_MIN_SIMILARITY)
            t_pair = (time.perf_counter() - t) / max(1, len(sub))
            verify_rss = rss_mb()
            del cache
        est_verify = n * t_kp + len(cand) * t_pair  # each cover's keypoints once, each candidate pair once
        res["sizes"][n] = {
            "candidate_pairs": len(cand), "pairs_per_cover": round(len(cand) / n, 2),
            "candidates_seconds": round(t_cand, 1), "candidates_rss_mb": round(cand_rss), "rss_before_mb": round(before),
            "verify_sample_pairs": len(sub), "verify_sample_covers": len(involved),
            "keypoints_seconds_per_cover": round(t_kp, 4), "match_seconds_per_pair": round(t_pair, 4),
            "verify_rss_mb": round(verify_rss),
            "verify_seconds_estimated": round(est_verify),
            "covers_per_second_estimated": round(n / (t_cand + est_verify), 1),
            "seconds_per_1000_covers_estimated": round(1000 * (t_cand + est_verify) / n, 1),
            "keypoint_files_gb": round(n * 66_000 / 1e9, 2),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        print(n, json.dumps(res["sizes"][n]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    print(pd.DataFrame(res["sizes"]).T.to_string())


if __name__ == "__main__":
    main()
