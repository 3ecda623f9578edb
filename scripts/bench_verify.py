"""Verified near-duplicates (issue 22): `duplicates` and `similar --verify` on altered real covers.

Two disjoint seeded samples of the real covers: ``--tune`` covers (the decision thresholds
are chosen on their copies) and ``--report`` covers (the figures reported). Each sampled cover
gets ONE altered copy, the alterations dealt out in turn (``scripts/alterations.py``: JPEG q15,
80 % crop, 64 px, grayscale, 7 deg rotation, brightness/contrast, sticker, white border, text
overlay, mirror, white border + JPEG q20, photo on a table), so every alteration has
``tune / 12`` and ``report / 12`` copies. Then:

* ``similar``: each copy is a query (``Engine.query_many``, the one query path) against the
  index of the original covers, ``verify=True``; recall@1 = the copy's original comes first.
  Without verification (the same run): the candidate with the highest similarity.
* ``duplicates``: the copies, embedded by that query (the collection's backbone and frozen
  compressor), are added to a copy of the index; ``verified_duplicates`` runs over all of it
  (candidates, then local-feature verification) with the loosest decision, and the pairs are
  filtered per threshold. A pair is true when both ends are one family (a cover and its copy);
  every pair of two original covers is counted false. Recall per alteration = share of
  (original, copy) pairs found; precision = true share of the found pairs touching a copy with
  that alteration; overall precision also counts the original-original pairs.

Usage::

    python scripts/bench_verify.py --index indexes/covers --work out/verify --out out/verify/results.json
    python scripts/bench_verify.py --index indexes/covers --work out/verify_photos --photos --out out/verify_photos/results.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alterations import ALTERATIONS, save  # noqa: E402
from bench_coldstart import cpu_line  # noqa: E402

from stylegen.index.store import Index  # noqa: E402

COVERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "covers" / "covers.csv"


def make_copies(work: Path, n_tune: int, n_report: int, seed: int) -> pd.DataFrame:
    csv = work / "altered.csv"
    if csv.is_file():
        return pd.read_csv(csv)
    covers = pd.read_csv(COVERS)
    sample = covers.sample(n_tune + n_report, random_state=seed).reset_index(drop=True)
    names = list(ALTERATIONS)
    (work / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, c in enumerate(sample.itertuples(index=False)):
        split = "tune" if i < n_tune else "report"
        name = names[i % len(names)]
        r = np.random.default_rng([seed, i])
        path = work / "img" / f"{Path(c.image).stem}_{name}.jpg"
        save(ALTERATIONS[name](Image.open(COVERS.parent / c.image).convert("RGB"), r), name, path)
        rows.append({"image": f"img/{path.name}", "family": c.image, "alteration": name, "split": split})
    table = pd.DataFrame(rows)
    table.to_csv(csv, index=False)
    return table


def query_copies(index_dir: Path, copies: pd.DataFrame, work: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Each copy through ``Engine.query_many(..., verify=True)``: vectors and the similar answers."""
    from stylegen.query.engine import Engine
    from stylegen.query.verify import VERIFY_CANDIDATES

    vec_file, ans_file = work / "copy_vectors.npy", work / "similar.parquet"
    if vec_file.is_file() and ans_file.is_file():
        return np.load(vec_file), pd.read_parquet(ans_file)
    from stylegen.query.verify import KeypointCache

    engine = Engine.open(index_dir, device="cpu")
    # the collection's keypoints in memory-mapped files (each computed once), not the LRU of a service
    engine._keypoints = KeypointCache(list(engine.index.metadata["path"]), folder=work / "keypoints_similar", reuse=True)
    paths = [str(work / p) for p in copies["image"]]
    vectors, answers = [], []
    t = time.perf_counter()
    for a in range(0, len(paths), 32):
        results, bad = engine.query_many(paths[a:a + 32], k=VERIFY_CANDIDATES, classify=False, verify=True)
        assert not bad, bad
        for r in results:
            vectors.append(r.vector)
            hits = r.neighbours
            by_sim = max(hits, key=lambda h: h["similarity"])
            answers.append({"top_verified": hits[0]["id"], "top_verified_ok": hits[0]["verified"],
                            "top_inliers": hits[0]["inliers"], "top_similarity": by_sim["id"],
                            "candidates": [h["id"] for h in hits]})
        print(f"  {a + len(results)}/{len(paths)} queries, {time.perf_counter() - t:.0f} s", flush=True)
    seconds = time.perf_counter() - t
    answers_df = pd.DataFrame(answers)
    answers_df["seconds_per_query"] = seconds / len(paths)
    np.save(vec_file, np.stack(vectors))
    answers_df.to_parquet(ans_file)
    return np.stack(vectors), answers_df


def combined_index(base: Index, copies: pd.DataFrame, vectors: np.ndarray, work: Path) -> Index:
    from stylegen.index.store import write_snapshot
    from stylegen.sources import images

    out = work / "combined"
    if (out / "CURRENT").is_file():
        return Index.open(out)
    meta = copies.copy()
    meta["path"] = [str((work / p).resolve()) for p in meta["image"]]
    meta["content_hash"] = [images.hash_bytes(images.read_bytes(p)) for p in meta["path"]]
    meta = pd.concat([base.metadata, meta], ignore_index=True)
    write_snapshot(out, {**base.manifest, "count": len(meta)}, np.concatenate([np.asarray(base.vectors), vectors]),
                   meta, base.compressor, None)
    return Index.open(out)


def evaluate(a: np.ndarray, b: np.ndarray, meta: pd.DataFrame, split: str, n_originals: int) -> dict:
    fam, alt, spl = meta["family_id"].to_numpy(), meta["alteration"].fillna("").to_numpy(), meta["split"].fillna("").to_numpy()
    true = fam[a] == fam[b]
    found = set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist(), strict=True))
    out = {}
    for name in ALTERATIONS:
        copies = np.flatnonzero((alt == name) & (spl == split))
        touch = np.isin(a, copies) | np.isin(b, copies)
        hits = sum((min(int(c), int(fam[c])), max(int(c), int(fam[c]))) in found for c in copies)
        out[name] = {"n": len(copies), "recall": hits / len(copies) if len(copies) else float("nan"),
                     "precision": float(true[touch].mean()) if touch.any() else float("nan"),
                     "found_pairs": int(touch.sum()), "false_pairs": int((touch & ~true).sum())}
    both_orig = (alt[a] == "") & (alt[b] == "")
    mine = (spl[a] == split) | (spl[b] == split) | both_orig
    copies = np.flatnonzero(spl == split)
    hits = sum((min(int(c), int(fam[c])), max(int(c), int(fam[c]))) in found for c in copies)
    out["all"] = {"n": len(copies), "recall": hits / len(copies),
                  "precision": float(true[mine].mean()) if mine.any() else float("nan"),
                  "original_original_pairs": int(both_orig.sum()),
                  "original_original_per_1000": round(1000 * int(both_orig.sum()) / n_originals, 3),
                  "min_recall": min(v["recall"] for k, v in out.items() if k != "all"),
                  "min_precision": min(v["precision"] for k, v in out.items() if k != "all")}
    return out


def f1(ev: dict) -> float:
    p, r = ev["all"]["precision"], ev["all"]["recall"]
    return 0.0 if not p or not r or np.isnan(p) else 2 * p * r / (p + r)


def vector_recall(index_dir: Path, copies: pd.DataFrame, work: Path) -> dict:
    """recall@1 of ``similar`` by style + content WITHOUT verification, per alteration, on an index
    of the same covers (e.g. one built with --trim-border): what the decoding does to similar search."""
    from stylegen.query.engine import Engine

    engine = Engine.open(index_dir, device="cpu")
    row_of = {img: i for i, img in enumerate(engine.index.metadata["image"])}
    orig = np.array([row_of[f] for f in copies["family"]])
    results, bad = engine.query_many([str(work / p) for p in copies["image"]], k=1, classify=False)
    assert not bad, bad
    top = np.array([r.neighbours[0]["id"] for r in results])
    out = {name: float((top == orig)[(copies["alteration"] == name).to_numpy()].mean()) for name in ALTERATIONS}
    out["all"] = float((top == orig).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True, help="index of the original covers (read, never changed)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tune", type=int, default=300)
    ap.add_argument("--report", type=int, default=600)
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--photos", action="store_true", help="duplicates --photos: centre-square candidates too")
    ap.add_argument("--compare-decoding", type=Path, nargs="*", default=None,
                    help="only: recall@1 of similar without verification on these indexes (e.g. with and without "
                         "border trim), all copies of both splits")
    args = ap.parse_args()
    if args.compare_decoding:
        copies = make_copies(args.work, args.tune, args.report, args.seed)
        print("CPU:", cpu_line())
        found = {str(d): vector_recall(d, copies, args.work) for d in args.compare_decoding}
        print(pd.DataFrame(found).round(3).to_string())
        if args.out:
            args.out.write_text(json.dumps(found, indent=1))
        return

    from stylegen.apps.duplicates import DEFAULT_CANDIDATES, candidate_pairs, verified_duplicates
    from stylegen.query import verify

    print("CPU:", cpu_line(), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    copies = make_copies(args.work, args.tune, args.report, args.seed)
    base = Index.open(args.index)
    n_orig = len(base)
    t = time.perf_counter()
    vectors, answers = query_copies(args.index, copies, args.work)
    print(f"similar --verify of {len(copies)} copies: {answers['seconds_per_query'].iloc[0]:.2f} s/query "
          f"({time.perf_counter() - t:.0f} s this run)", flush=True)
    row_of = {img: i for i, img in enumerate(base.metadata["image"])}
    orig = np.array([row_of[f] for f in copies["family"]])
    res: dict = {"cpu": cpu_line(), "n_originals": n_orig, "n_copies": len(copies), "similar": {}, "duplicates": {}}
    for split in ("tune", "report"):
        sel = (copies["split"] == split).to_numpy()
        per = {}
        for name in [*ALTERATIONS, "all"]:
            m = sel & ((copies["alteration"] == name).to_numpy() if name != "all" else True)
            per[name] = {"n": int(m.sum()),
                         "recall_at_1_verify": float((answers["top_verified"].to_numpy()[m] == orig[m]).mean()),
                         "recall_at_1_vectors": float((answers["top_similarity"].to_numpy()[m] == orig[m]).mean()),
                         "candidate_recall": float(np.mean([o in c for o, c in zip(orig[m], answers["candidates"][m], strict=True)]))}
        per["all"]["mean_over_alterations_verify"] = float(np.mean([per[n]["recall_at_1_verify"] for n in ALTERATIONS]))
        res["similar"][split] = per
    res["similar"]["seconds_per_query"] = float(answers["seconds_per_query"].iloc[0])

    index = combined_index(base, copies, vectors, args.work)
    meta = index.metadata.copy()
    meta["family_id"] = [row_of[f] if isinstance(f, str) else i for i, f in enumerate(meta["family"])]
    centre = None
    if args.photos:
        from stylegen.query.engine import Engine

        t = time.perf_counter()
        centre = verify.centre_vectors(Engine(index), list(index.metadata["path"]))
        res["duplicates"]["centre_seconds"] = round(time.perf_counter() - t, 1)
    cand = candidate_pairs(index, centre=centre)
    cset = set(zip(cand["a"].tolist(), cand["b"].tolist(), strict=True))
    fam = meta["family_id"].to_numpy()
    copy_rows = np.flatnonzero(meta["alteration"].notna().to_numpy())
    res["duplicates"]["candidate_pairs"] = len(cand)
    res["duplicates"]["candidate_recall"] = {
        name: float(np.mean([(int(fam[c]), int(c)) in cset for c in copy_rows if meta["alteration"].iloc[c] == name]))
        for name in ALTERATIONS}
    print("candidate recall:", json.dumps(res["duplicates"]["candidate_recall"]), flush=True)

    # the originals' keypoints were computed by the similar stage (same images, same rows): copy them over
    kp_dir, sim_dir = args.work / "keypoints_combined", args.work / "keypoints_similar"
    fresh = not (kp_dir / "info.npy").is_file()
    kp = verify.KeypointCache(list(index.metadata["path"]), folder=kp_dir, reuse=True)
    if fresh and (sim_dir / "info.npy").is_file():
        for name in ("desc", "xy", "info"):
            kp._disk[name][:n_orig] = np.load(sim_dir / f"{name}.npy", mmap_mode="r")
    reused = int((kp._disk["info"][:, 0] != -1).sum())
    t = time.perf_counter()
    loose = verified_duplicates(index, min_inliers=4, min_coverage=0.0, keypoints=kp, centre=centre)
    res["duplicates"]["keypoints_reused_from_similar"] = reused
    total = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["duplicates"]["timing"] = {"covers": len(index), "seconds": round(total, 1), **(loose.seconds or {}),
                                   "seconds_per_1000_covers": round(1000 * total / len(index), 1),
                                   "max_rss_mb": round(rss)}
    print("verified scan:", json.dumps(res["duplicates"]["timing"]), flush=True)
    p = loose.pairs
    a, b, inl, cov = (p[c].to_numpy() for c in ("a", "b", "inliers", "coverage"))
    scan = {}
    for mi in range(6, 41, 2):
        for mc in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25):
            keep = (inl >= mi) & (cov >= mc)
            scan[(mi, mc)] = evaluate(a[keep], b[keep], meta, "tune", n_orig)
    best = max(scan, key=lambda key: f1(scan[key]))
    default = (verify.MIN_INLIERS, verify.MIN_COVERAGE)
    keep = (inl >= default[0]) & (cov >= default[1])
    res["duplicates"].update({
        "tune_best": {"min_inliers": best[0], "min_coverage": best[1], "f1": f1(scan[best])},
        "default": {"min_inliers": default[0], "min_coverage": default[1], "candidates_k": DEFAULT_CANDIDATES},
        "report_at_default": evaluate(a[keep], b[keep], meta, "report", n_orig),
        "tune_at_default": evaluate(a[keep], b[keep], meta, "tune", n_orig),
        "report_at_tuned": evaluate(*(x[(inl >= best[0]) & (cov >= best[1])] for x in (a, b)), meta, "report", n_orig),
        "tune_f1": {f"{k[0]}/{k[1]}": round(f1(v), 4) for k, v in scan.items()},
    })
    oo = p[(meta["alteration"].isna().to_numpy()[a]) & (meta["alteration"].isna().to_numpy()[b]) & keep]
    res["duplicates"]["original_original_at_default"] = [
        {"a": meta["image"].iloc[int(r.a)], "b": meta["image"].iloc[int(r.b)], "inliers": int(r.inliers),
         "coverage": float(r.coverage), "similarity": round(float(r.similarity), 3)} for r in oo.itertuples()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=float))
    print(table(res))


def table(res: dict) -> str:
    d, s = res["duplicates"]["report_at_default"], res["similar"]["report"]
    lines = ["| alteration | n | duplicates P | duplicates R | similar R@1 (verify) | similar R@1 (vectors) |",
             "|---|---|---|---|---|---|"]
    for name in [*ALTERATIONS, "all"]:
        lines.append(f"| {name} | {d[name]['n']} | {d[name]['precision']:.3f} | {d[name]['recall']:.3f} | "
                     f"{s[name]['recall_at_1_verify']:.3f} | {s[name]['recall_at_1_vectors']:.3f} |")
    lines.append(f"original-original pairs: {d['all']['original_original_pairs']} "
                 f"({d['all']['original_original_per_1000']} per 1,000 covers)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
