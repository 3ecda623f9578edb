#!/usr/bin/env python
"""Split a manifest into train/test CSVs, artist-disjoint and stratified by genre.

    python scripts/split_manifest.py ../shared/data/covers/covers.csv out/split --test-size 0.2

Rows with the same (non-empty) artist land on the same side; rows without an artist are
their own group. Image paths are rewritten to stay valid next to the new CSVs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--test-size", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    df = pd.read_csv(a.manifest, dtype=str, keep_default_na=False)
    a.out.mkdir(parents=True, exist_ok=True)
    base = a.manifest.resolve().parent
    df["image"] = [os.path.relpath(base / p, a.out.resolve()) for p in df["image"]]
    artist = df["artist"] if "artist" in df else pd.Series([""] * len(df))
    groups = np.array([x.strip().lower() or f"#row{i}" for i, x in enumerate(artist)])
    strata = df["genre"].where(df["genre"] != "", "multi") if "genre" in df else pd.Series(["all"] * len(df))
    folds = StratifiedGroupKFold(round(1 / a.test_size), shuffle=True, random_state=a.seed)
    train, test = next(folds.split(df, strata, groups))
    df.iloc[train].to_csv(a.out / "train.csv", index=False)
    df.iloc[test].to_csv(a.out / "test.csv", index=False)
    shared = set(groups[train]) & set(groups[test])
    print(f"train {len(train)} rows, test {len(test)} rows, artists on both sides: {len(shared)}")


if __name__ == "__main__":
    main()
