"""Near-duplicate detection on planted copies of real covers, against a perceptual hash.

From the real covers, two disjoint seeded samples are drawn: ``--tune`` covers (the
threshold of each method is chosen on them: best F1 of the found pairs) and ``--report``
covers (the figures reported, at the chosen thresholds). Each sampled cover gets 8 altered
copies (see ``ALTERATIONS``; saved as JPEG q92 except ``jpeg15``), which are embedded into a
new index made of an index of all the covers plus the copies, embedded like queries (the
collection's backbone and its stored compressor; see ``add_copies``). Then:

* stylegen: ``duplicates.find_duplicates`` over the whole index (originals + copies), by
  style, content and both;
* baseline: ``imagehash.phash`` (64 bits) of every image, pairs within a Hamming distance
  found with a FAISS binary range search.

A found pair is true when both ends belong to the same planted family (a cover and its
copies); any other pair is false, including pairs of two original covers (the real set
had its near-duplicates merged by a perceptual hash, which flatters the baseline there).
Per alteration: recall = share of (original, copy) pairs found; precision = share of the
found pairs touching a copy with that alteration that are true; overall precision also counts
every pair of two original covers as false (so a threshold low enough to link unrelated covers
is penalised when the threshold is tuned). Usage::

    python scripts/bench_duplicates.py --index indexes/covers --work /tmp/dups --out docs/duplicates.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from stylegen.index.store import Index

COVERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "covers" / "covers.csv"


def jpeg15(im: Image.Image, r: np.random.Generator) -> Image.Image:
    return im  # the alteration is the save quality (see save())


def crop80(im: Image.Image, r: np.random.Generator) -> Image.Image:
    w, h = im.size
    cw, ch = int(0.8 * w), int(0.8 * h)
    x, y = int(r.integers(0, w - cw + 1)), int(r.integers(0, h - ch + 1))
    return im.crop((x, y, x + cw, y + ch))


def down64(im: Image.Image, r: np.random.Generator) -> Image.Image:
    out = im.copy()
    out.thumbnail((64, 64), Image.BILINEAR)
    return out


def gray(im: Image.Image, r: np.random.Generator) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")


def rot7(im: Image.Image, r: np.random.Generator) -> Image.Image:
    return im.rotate(7 if r.random() < 0.5 else -7, resample=Image.BILINEAR, fillcolor=(255, 255, 255))


def bright_contrast(im: Image.Image, r: np.random.Generator) -> Image.Image:
    b, c = (1.3, 0.7) if r.random() < 0.5 else (0.7, 1.3)
    return ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(b)).enhance(c)


def sticker(im: Image.Image, r: np.random.Generator) -> Image.Image:
    out = im.copy()
    w, h = out.size
    rad = int(0.12 * min(w, h))
    cx, cy = int(r.integers(rad, w - rad)), int(r.integers(rad, h // 3))
    colour = tuple(int(v) for v in r.choice([(230, 30, 40), (250, 210, 0), (20, 160, 60), (30, 90, 220)]))
    ImageDraw.Draw(out).ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=colour)
    return out


def border(im: Image.Image, r: np.random.Generator) -> Image.Image:
    return ImageOps.expand(im, border=int(0.1 * max(im.size)), fill=(255, 255, 255))


ALTERATIONS = {"jpeg15": jpeg15, "crop80": crop80, "down64": down64, "gray": gray, "rot7": rot7,
               "bright_contrast": bright_contrast, "sticker": sticker, "border": border}


def make_copies(covers: pd.DataFrame, out: Path, seed: int) -> pd.DataFrame:
    rows = []
    (out / "img").mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(covers.itertuples(index=False)):
        im = Image.open(COVERS.parent / c.image).convert("RGB")
        for name, fn in ALTERATIONS.items():
            r = np.random.default_rng([seed, i, len(name)])
            path = out / "img" / f"{Path(c.image).stem}_{name}.jpg"
            fn(im, r).save(path, "JPEG", quality=15 if name == "jpeg15" else 92)
            rows.append({"image": f"img/{path.name}", "family": c.image, "alteration": name, "split": c.split})
    table = pd.DataFrame(rows)
    table.to_csv(out / "altered.csv", index=False)
    return table


def evaluate(pairs_a: np.ndarray, pairs_b: np.ndarray, meta: pd.DataFrame, split: str) -> dict:
    """Precision/recall per alteration for the copies of one split (see the module doc)."""
    fam = meta["family_id"].to_numpy()
    alt = meta["alteration"].fillna("").to_numpy()
    spl = meta["split"].fillna("").to_numpy()
    true = fam[pairs_a] == fam[pairs_b]
    out = {}
    for name in ALTERATIONS:
        copies = np.flatnonzero((alt == name) & (spl == split))
        touch = np.isin(pairs_a, copies) | np.isin(pairs_b, copies)
        orig_of = {int(c): int(np.flatnonzero((fam == fam[c]) & (alt == ""))[0]) for c in copies}
        found = {(min(a, b), max(a, b)) for a, b in zip(pairs_a[touch], pairs_b[touch], strict=True)}
        hits = sum((min(c, o), max(c, o)) in found for c, o in orig_of.items())
        out[name] = {"recall": hits / len(copies), "precision": float(true[touch].mean()) if touch.any() else float("nan"),
                     "found_pairs": int(touch.sum()), "false_pairs": int((touch & ~true).sum())}
    both_orig = (alt[pairs_a] == "") & (alt[pairs_b] == "")
    allp = [v for v in out.values()]
    out["all"] = {"recall": float(np.mean([v["recall"] for v in allp])),
                  "precision": _overall_precision(pairs_a, pairs_b, true, spl, split),
                  "original_original_pairs": int(both_orig.sum())}
    return out


def _overall_precision(a, b, true, spl, split) -> float:
    """Pairs touching this split's copies, plus every pair of two originals (counted false:
    the real set had its near-duplicates merged)."""
    touch = (spl[a] == split) | (spl[b] == split) | ((spl[a] == "") & (spl[b] == ""))
    return float(true[touch].mean()) if touch.any() else float("nan")


def f1(ev: dict) -> float:
    p, r = ev["all"]["precision"], ev["all"]["recall"]
    return 0.0 if not p or not r or np.isnan(p) else 2 * p * r / (p + r)


def phash_pairs(codes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of 64-bit codes within ``max_distance`` bits (FAISS binary range search)."""
    import faiss

    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, dist, ids = index.range_search(codes, max_distance + 1)  # strictly below the radius
    qi = np.repeat(np.arange(len(codes)), np.diff(lims.astype(np.int64)))
    keep = qi < ids
    return qi[keep], ids[keep].astype(np.int64)


def compute_phashes(paths: list[str]) -> np.ndarray:
    import imagehash

    codes = np.zeros((len(paths), 8), np.uint8)
    for i, p in enumerate(paths):
        bits = imagehash.phash(Image.open(p)).hash.flatten()
        codes[i] = np.packbits(bits)
    return codes


def add_copies(base: Index, csv: Path, out: Path, pending: Path | None) -> Index:
    """A new index at ``out``: ``base``'s covers plus the copies listed in ``csv``, embedded
    like queries (``Engine.query_many``: the base's backbone and stored compressor, no refit).
    ``pending``: reuse raw features checkpointed by an earlier ``stylegen embed`` of the same
    copies (``DIR/pending/chunk-*.npz``) instead of running the backbone again."""
    from stylegen.index.compress import combine
    from stylegen.index.store import write_snapshot
    from stylegen.query.engine import Engine
    from stylegen.sources import images

    if (out / "CURRENT").is_file():
        return Index.open(out)
    copies = pd.read_csv(csv)
    copies["path"] = [str(csv.parent / p) for p in copies["image"]]
    copies["content_hash"] = [images.hash_bytes(images.read_bytes(p)) for p in copies["path"]]
    t = time.perf_counter()
    if pending is not None:
        raw: dict[str, list] = {}
        hashes: list[str] = []
        for chunk in sorted(pending.glob("chunk-*.npz")):
            with np.load(chunk) as z:
                hashes += [str(h) for h in z["hashes"]]
                for p in base.slices:
                    raw.setdefault(p, []).append(z[f"raw_{p}"].astype(np.float32))
        pos = {h: i for i, h in enumerate(hashes)}
        keep = [h in pos for h in copies["content_hash"]]
        copies = copies[keep].reset_index(drop=True)
        order = [pos[h] for h in copies["content_hash"]]
        parts = {p: np.concatenate(v)[order] for p, v in raw.items()}
        vectors, _ = combine(base.compressor.transform(parts), base.config.features.weights)
        print(f"{len(copies)} copies from checkpointed raw features ({sum(not k for k in keep)} not embedded)")
    else:
        results, bad = Engine(base, device="auto").query_many(copies["path"].tolist(), classify=False)
        assert not bad, bad
        vectors = np.stack([r.vector for r in results])
        print(f"embedded {len(copies)} copies in {time.perf_counter() - t:.0f} s")
    meta = pd.concat([base.metadata, copies], ignore_index=True)
    manifest = {**base.manifest, "count": len(meta)}
    write_snapshot(out, manifest, np.concatenate([np.asarray(base.vectors), vectors]), meta, base.compressor, None)
    return Index.open(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True, help="index of all the covers (copied, never changed)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tune", type=int, default=200)
    ap.add_argument("--report", type=int, default=300)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--pending", type=Path, default=None,
                    help="reuse raw features of the copies checkpointed by an interrupted stylegen embed")
    args = ap.parse_args()

    from stylegen.apps.duplicates import DEFAULT_THRESHOLD, find_duplicates

    print(subprocess.run("grep -m1 'model name' /proc/cpuinfo; uptime", shell=True, capture_output=True, text=True, check=False).stdout)
    covers = pd.read_csv(COVERS)
    sample = covers.sample(args.tune + args.report, random_state=args.seed).reset_index(drop=True)
    sample["split"] = ["tune"] * args.tune + ["report"] * args.report
    args.work.mkdir(parents=True, exist_ok=True)
    csv = args.work / "altered.csv"
    if not csv.is_file():
        t = time.perf_counter()
        make_copies(sample, args.work, args.seed)
        print(f"made {8 * len(sample)} copies in {time.perf_counter() - t:.0f} s")
    index = add_copies(Index.open(args.index), csv, args.work / "combined", args.pending)
    meta = index.metadata.copy()
    orig_row = {img: i for i, img in enumerate(meta["image"]) if not str(img).startswith("img/")}
    meta["family_id"] = [orig_row[f] if isinstance(f, str) else i for i, f in enumerate(meta["family"])]
    paths = meta["path"].tolist()

    results: dict = {"n_index": len(index), "tune": args.tune, "report": args.report, "stylegen": {}, "phash": {}}
    grid = np.round(np.arange(0.40, 0.991, 0.01), 2)
    for by in ("both", "style", "content"):
        t = time.perf_counter()
        scan = {}
        low = find_duplicates(index, threshold=float(grid[0]), by=by)  # then filtered per threshold
        elapsed = time.perf_counter() - t
        a, b, s = (low.pairs[c].to_numpy() for c in ("a", "b", "similarity"))
        for th in grid:
            keep = s >= th
            scan[float(th)] = evaluate(a[keep], b[keep], meta, "tune")
        best = max(scan, key=lambda th: f1(scan[th]))
        t = time.perf_counter()
        at_default = find_duplicates(index, threshold=DEFAULT_THRESHOLD, by=by)
        search_s = time.perf_counter() - t
        pa, pb = at_default.pairs["a"].to_numpy(), at_default.pairs["b"].to_numpy()
        keep = s >= best
        results["stylegen"][by] = {
            "tune_best_threshold": best, "tune_best_f1": f1(scan[best]),
            "tune_f1_by_threshold": {th: round(f1(v), 4) for th, v in scan.items()},
            "report_at_tuned": evaluate(a[keep], b[keep], meta, "report"),
            "report_at_default": evaluate(pa, pb, meta, "report"),
            "tune_at_default": evaluate(pa, pb, meta, "tune"),
            "default_threshold": DEFAULT_THRESHOLD, "search_seconds": round(search_s, 2),
            "groups_at_default": len(at_default.groups), "scan_seconds": round(elapsed, 2),
        }
        print(by, "tuned", best, json.dumps(results["stylegen"][by]["report_at_default"]["all"]))

    t = time.perf_counter()
    cache = args.work / f"phash_{len(paths)}.npy"
    codes = np.load(cache) if cache.is_file() else compute_phashes(paths)
    np.save(cache, codes)
    print(f"phash of {len(paths)} images in {time.perf_counter() - t:.0f} s")
    scan = {d: evaluate(*phash_pairs(codes, d), meta, "tune") for d in range(25)}
    best_d = max(scan, key=lambda d: f1(scan[d]))
    results["phash"] = {"tune_best_distance": best_d, "tune_best_f1": f1(scan[best_d]),
                        "tune_f1_by_distance": {d: round(f1(v), 4) for d, v in scan.items()},
                        "report_at_tuned": evaluate(*phash_pairs(codes, best_d), meta, "report")}
    print("phash tuned", best_d, json.dumps(results["phash"]["report_at_tuned"]["all"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=float))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| alteration | stylegen P | stylegen R | pHash P | pHash R |", "|---|---|---|---|---|"]
    ours = results["stylegen"]["both"]["report_at_default"]
    ph = results["phash"]["report_at_tuned"]
    for name in [*ALTERATIONS, "all"]:
        lines.append(f"| {name} | {ours[name]['precision']:.3f} | {ours[name]['recall']:.3f} | "
                     f"{ph[name]['precision']:.3f} | {ph[name]['recall']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
