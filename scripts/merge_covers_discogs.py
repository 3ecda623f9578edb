#!/usr/bin/env python
"""One manifest of both real cover sets, labelled in Discogs terms.

    python scripts/merge_covers_discogs.py out/merged.csv
    stylegen embed out/merged.csv --index indexes/merged
    stylegen train --index indexes/merged --labels multi --label-column genres --label-column styles \\
        --taxonomy discogs --head hierarchy --head knn --group-column artist
    stylegen evaluate --index indexes/merged --cv 5 --heads hierarchy,knn --group-column artist

../shared/data/covers (4,844 covers, 9 genres) joins ../shared/data/discogs-styles (2,895 covers,
Discogs genres and styles; deduplicated against the first set) through the packaged mapping
``covers9-discogs`` (``stylegen/data/covers9_to_discogs.json``: hip-hop → Hip Hop, country →
"Folk, World, & Country", metal → Rock + Rock---Heavy Metal, ...). Columns: ``image``
(absolute, so the manifest can live anywhere), ``genres`` (Discogs genres), ``styles``
(``Genre---Style``; empty for the 9-genre covers but metal's), ``source`` (``covers9`` or
``discogs``: ``evaluate --cv`` scores each source apart), ``artist`` (the covers' artist, or the
Discogs ``artist_group``; a cover with neither is a group of its own).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from stylegen.sources.labels import label_map, map_labels, split_genres

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    covers, discogs = DATA / "covers" / "covers.csv", DATA / "discogs-styles" / "covers.csv"
    for path in (covers, discogs):
        if not path.is_file():
            sys.exit(f"{path.name} not found under ../shared/data ({path.parent.name}/)")
    a, b = pd.read_csv(covers), pd.read_csv(discogs)
    mapped = map_labels([split_genres(g) for g in a["genre"]], label_map("covers9-discogs"))
    left = pd.DataFrame({
        "image": [str((covers.parent / p).resolve()) for p in a["image"]],
        "genres": ["|".join(g for g in labels if "---" not in g) for labels in mapped],
        "styles": ["|".join(g for g in labels if "---" in g) for labels in mapped],
        "source": "covers9",
        "artist": a["artist"],
    })
    right = pd.DataFrame({
        "image": [str((discogs.parent / p).resolve()) for p in b["image"]],
        "genres": b["genres"].fillna(""), "styles": b["styles"].fillna(""), "source": "discogs",
        "artist": "discogs:" + b["artist_group"].astype(str),
    })
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = pd.concat([left, right], ignore_index=True)
    merged.to_csv(out, index=False)
    print(f"{len(merged)} covers ({len(left)} covers9, {len(right)} discogs) -> {out}")


if __name__ == "__main__":
    main()
