"""Candidate recall of `duplicates` with and without `--photos` (centre-square candidates), issue 22.

    python scripts/bench_photo_candidates.py --index indexes/covers --work out/verify_photos

The altered copies of ``bench_verify.py`` (same seed: 300 tune + 600 report copies of real
covers, 12 alterations) are embedded through the one query path and added to a copy of the
index; then stage one of ``stylegen duplicates`` (:func:`candidate_pairs`, the default ``k``)
runs with and without the centre-square vectors of every cover of that combined index
(:func:`stylegen.query.verify.centre_vectors`), and the share of (original, copy) pairs that are
proposed is reported per alteration, with the number of candidate pairs (what verification
then costs). Verification decides afterwards as before; its recall given a candidate is in
``bench_verify.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alterations import ALTERATIONS  # noqa: E402
from bench_coldstart import cpu_line  # noqa: E402
from bench_verify import combined_index, make_copies  # noqa: E402


def main() -> None:
    from stylegen.apps.duplicates import candidate_pairs
    from stylegen.index.store import Index
    from stylegen.query.engine import Engine
    from stylegen.query.verify import centre_vectors

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("indexes/covers"))
    ap.add_argument("--work", type=Path, default=Path("out/verify_photos"))
    ap.add_argument("--seed", type=int, default=22)
    args = ap.parse_args()
    print("CPU:", cpu_line(), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    copies = make_copies(args.work, 300, 600, args.seed)
    base = Index.open(args.index)
    engine = Engine.open(args.index)
    t = time.perf_counter()
    results, bad = engine.query_many([str(args.work / p) for p in copies["image"]], classify=False)
    assert not bad and len(results) == len(copies), bad
    index = combined_index(base, copies, np.stack([r.vector for r in results]), args.work)
    print(f"{len(copies)} copies embedded and added in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    centre = centre_vectors(Engine(index), list(index.metadata["path"]))
    centre_s = time.perf_counter() - t
    print(f"centre squares of {len(index)} covers in {centre_s:.0f} s", flush=True)
    row_of = {img: i for i, img in enumerate(base.metadata["image"])}
    meta = index.metadata
    copy_rows = np.flatnonzero(meta["alteration"].notna().to_numpy())
    fam = {int(c): row_of[meta["family"].iloc[c]] for c in copy_rows}
    out: dict = {"cpu": cpu_line(), "covers": len(index), "centre_seconds": round(centre_s, 1)}
    for label, c in (("without", None), ("with --photos", centre)):
        cand = candidate_pairs(index, centre=c)
        found = set(zip(cand["a"].tolist(), cand["b"].tolist(), strict=True))
        per = {name: float(np.mean([(min(fam[r], r), max(fam[r], r)) in found for r in copy_rows
                                    if meta["alteration"].iloc[r] == name])) for name in ALTERATIONS}
        per["all"] = float(np.mean([(min(fam[r], r), max(fam[r], r)) in found for r in copy_rows]))
        out[label] = {"candidate_pairs": len(cand), "candidate_recall": per}
    print("| alteration | candidate recall without | with --photos |\n|---|---:|---:|")
    for name in [*ALTERATIONS, "all"]:
        print(f"| {name} | {out['without']['candidate_recall'][name]:.3f} | "
              f"{out['with --photos']['candidate_recall'][name]:.3f} |")
    print(f"candidate pairs to verify: {out['without']['candidate_pairs']} without, "
          f"{out['with --photos']['candidate_pairs']} with --photos")
    (args.work / "candidates.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
