#!/usr/bin/env python
"""Turn a catalogue's fine, artist-level genre lists into stylegen labels.

    python scripts/prepare_labels.py albums.csv out.csv --column genres \\
        [--min-fraction 0.05] [--taxonomy default|FILE --level 0] [--match-suffix]

Catalogues such as MusicOSet list over a thousand fine genres ("atl hip hop",
"album rock", ...), as ``|``-separated text or Python-style lists (``['pop', 'dance pop']``).
Either keep the genres that reach a frequency threshold (share of rows), or map each genre
through a taxonomy to its top-level (or other) ancestor, or both (mapping first). Writes
``genres`` (``|``-separated) and ``genre`` (set when exactly one genre is left); every other
column is kept. Rows left without a genre are kept with empty labels.
"""

from __future__ import annotations

import argparse
import ast
import sys

import pandas as pd

from stylegen.errors import StylegenError
from stylegen.sources.labels import (
    Taxonomy,
    filter_genres,
    frequent_genres,
    map_to_taxonomy,
    split_genres,
)


def parse_cell(value: object) -> list[str]:
    text = str(value).strip() if value is not None else ""
    if text.startswith("["):
        try:
            return [str(g).strip().lower() for g in ast.literal_eval(text) if str(g).strip()]
        except (ValueError, SyntaxError):
            pass
    return split_genres(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--column", default="genres")
    ap.add_argument("--min-fraction", type=float, default=None)
    ap.add_argument("--taxonomy", default=None, help="'default' or a YAML/JSON file")
    ap.add_argument("--level", default="0", help="taxonomy depth (0 = top) or 'parent'")
    ap.add_argument("--match-suffix", action="store_true", help="'atl hip hop' -> 'hip-hop'")
    a = ap.parse_args()
    try:
        df = pd.read_csv(a.source, dtype=str, keep_default_na=False)
        if a.column not in df.columns:
            raise StylegenError(f"column {a.column!r} not in {a.source}")
        lists = [parse_cell(v) for v in df[a.column]]
        if a.taxonomy:
            tax = Taxonomy.default() if a.taxonomy == "default" else Taxonomy.load(a.taxonomy)
            level = a.level if a.level == "parent" else int(a.level)
            lists = map_to_taxonomy(lists, tax, level=level, match_suffix=a.match_suffix)
        if a.min_fraction is not None:
            keep = frequent_genres(lists, a.min_fraction)
            lists = filter_genres(lists, keep)
    except StylegenError as exc:
        sys.exit(f"error: {exc}")
    df["genres"] = ["|".join(g) for g in lists]
    df["genre"] = [g[0] if len(g) == 1 else "" for g in lists]
    df.to_csv(a.out, index=False)
    counts = pd.Series([g for gs in lists for g in gs]).value_counts()
    print(f"{len(df)} rows, {sum(1 for g in lists if g)} labelled, {len(counts)} genres kept:")
    print(counts.head(20).to_string())


if __name__ == "__main__":
    main()
