#!/usr/bin/env python
"""A held-out test manifest for the shipped 9-genre model from the Discogs covers.

    python scripts/discogs_as_covers9.py out/discogs9.csv

../shared/data/discogs-styles holds 2,895 Discogs covers, deduplicated against
../shared/data/covers (on which the shipped model was trained), with Discogs genres. Covers whose
single Discogs genre has a counterpart among the model's 9 genres are kept with that label:
Rock → rock, Electronic → electronic, Hip Hop → hip-hop, Pop → pop, Jazz → jazz, Classical →
classical, Reggae → reggae, "Folk, World, & Country" → country (Discogs has no metal genre: metal
is a Rock style). Image paths are written absolute, so the manifest can live anywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "discogs-styles" / "covers.csv"
TO_COVERS9 = {"Rock": "rock", "Electronic": "electronic", "Hip Hop": "hip-hop", "Pop": "pop", "Jazz": "jazz",
              "Classical": "classical", "Reggae": "reggae", "Folk, World, & Country": "country"}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if not SOURCE.is_file():
        sys.exit(f"Discogs covers not found at {SOURCE} (../shared/data)")
    df = pd.read_csv(SOURCE)
    df = df[df["genre"].isin(list(TO_COVERS9))].copy()
    df["genre"] = df["genre"].map(TO_COVERS9)
    df["genres"] = df["genre"]
    df["image"] = [str((SOURCE.parent / p).resolve()) for p in df["image"]]
    df["artist"] = df["artist_group"]
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    df[["image", "genre", "genres", "artist", "album", "year"]].to_csv(out, index=False)
    print(f"{len(df)} covers: " + ", ".join(f"{g} {n}" for g, n in df["genre"].value_counts().items()))


if __name__ == "__main__":
    main()
