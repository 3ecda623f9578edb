#!/usr/bin/env python
"""Metadata on the query side: the whole table in memory vs rows read from disk on demand.

    python scripts/bench_metadata.py [--n 1000000] [--work /tmp/bench_metadata]

Writes an index-like metadata table of ``--n`` covers (path, image, content hash, genres,
artist, album, year; strings as a real catalogue has them) the way ``store.write_snapshot``
does: parquet in row groups of ``store.METADATA_ROW_GROUP`` rows plus the sorted
``hashes.npy``. Then, each in a fresh process (peak RSS is the process's own VmHWM):

* **whole table** (before): ``pd.read_parquet`` at open, ``iloc`` for the rows of a query, a
  dict from content hash to row for lookups (what ``Index`` did);
* **on demand** (now): ``store.MetadataTable`` + ``store.lookup_sorted``, as ``Index.open`` does.

Each process times opening, the rows of 1,000 queries (10 random rows each: one similar-covers
answer) and 1,000 hash lookups.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def write(work: Path, n: int) -> None:
    import pandas as pd

    from stylegen.index import store

    rng = np.random.default_rng(0)
    genres = np.array(["rock", "pop", "jazz", "hip-hop", "electronic|pop", "metal", "country", "classical"])
    hashes = [f"{x:040x}" for x in rng.integers(0, 2**62, n)]
    meta = pd.DataFrame({
        "image": [f"images/{h[:16]}.jpg" for h in hashes],
        "path": [f"/data/catalogue/covers/{h[:2]}/{h[2:4]}/{h[:16]}.jpg" for h in hashes],
        "content_hash": hashes,
        "genres": genres[rng.integers(0, len(genres), n)],
        "artist": [f"Artist {i % 250_000}" for i in range(n)],
        "album": [f"Album title number {i}" for i in range(n)],
        "year": rng.integers(1950, 2026, n),
    })
    work.mkdir(parents=True, exist_ok=True)
    meta.to_parquet(work / "metadata.parquet", index=False, row_group_size=store.METADATA_ROW_GROUP)
    store.write_hash_table(work / "hashes.npy", hashes)


def child(work: Path, mode: str) -> None:
    import pandas as pd

    from stylegen import store  # both modes: the same modules loaded, so RSS compares the data

    rng = np.random.default_rng(1)
    t = time.perf_counter()
    if mode == "whole":
        meta = pd.read_parquet(work / "metadata.parquet")
        n = len(meta)
        col = meta["content_hash"].to_numpy()
        by_hash = {h: i for i, h in reversed(list(enumerate(col)))}

        def rows(ids: np.ndarray):
            return meta.iloc[ids]

        def lookup(hs: list[str]) -> list[int | None]:
            return [by_hash.get(h) for h in hs]
    else:
        table = store.MetadataTable(work / "metadata.parquet")
        keys = np.load(work / "hashes.npy", mmap_mode="r")
        n = len(table)

        def rows(ids: np.ndarray):
            return table.take(ids)

        def lookup(hs: list[str]) -> list[int | None]:
            return store.lookup_sorted(keys, hs)
    open_s = time.perf_counter() - t
    queries = [rng.integers(0, n, 10) for _ in range(1000)]
    t = time.perf_counter()
    for ids in queries:
        rows(ids)
    rows_ms = (time.perf_counter() - t) / len(queries) * 1000
    sample = rows(rng.integers(0, n, 1000))["content_hash"].tolist()
    t = time.perf_counter()
    found = [lookup([h])[0] for h in sample]
    lookup_us = (time.perf_counter() - t) / len(sample) * 1e6
    assert all(f is not None for f in found)
    print(json.dumps({"mode": mode, "open_s": open_s, "rows_ms": rows_ms, "lookup_us": lookup_us,
                      "peak_rss_mb": vmhwm() / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_metadata"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.work, a.child)
        return
    t = time.perf_counter()
    write(a.work, a.n)
    size = (a.work / "metadata.parquet").stat().st_size / 2**20
    from bench_coldstart import cpu_line

    print(f"{cpu_line()}\n{a.n:,} rows written in {time.perf_counter() - t:.0f} s, parquet {size:.0f} MB")
    print("| metadata | open s | rows of one query (10) ms | hash lookup µs | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("whole", "ondemand"):
        out = subprocess.run([sys.executable, __file__, "--work", str(a.work), "--child", mode],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {'whole table (before)' if mode == 'whole' else 'on demand (now)'} | {r['open_s']:.2f} | "
              f"{r['rows_ms']:.2f} | {r['lookup_us']:.1f} | {r['peak_rss_mb']:.0f} |")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
