#!/usr/bin/env python
"""Adding covers to a large index: 10k new covers into a 1M-cover stylegen index.

    python scripts/bench_add.py --index indexes/merged --n 1000000 --add 10000 --dtype float16

* **the 1M index** is a real stylegen index folder: vectors from the realistic generator
  (``scripts/realistic_corpus.py``, fitted to the real index's vectors), synthetic metadata
  (image, path, content hash, genre, artist), the real index's manifest settings and frozen
  compressor; ``write_snapshot`` builds its FAISS index as the planner says (timed apart);
* **the new covers** are an ingest shard of ``--add`` raw feature rows (real covers' raw
  features from the real index's shards, with a little noise so every row is new), as
  ``stylegen embed`` would have written it;
* **add** = ``stylegen.index.ingest.build`` (what ``stylegen embed`` runs after ingest, and
  ``stylegen index DIR``): transform the new rows with the frozen compressor, extend the FAISS
  index, write the new snapshot (vectors, metadata, hashes), switch CURRENT;
* **searchable at once**: the index is opened again and each new cover's vector is searched:
  its own row must come back first. Embedding the new covers' images is not part of the add;
  the time it would take at the real index's measured embed rate is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import realistic_corpus
from bench_coldstart import cpu_line

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def synthetic_metadata(n: int, first: int, rng: np.random.Generator) -> pd.DataFrame:
    ids = np.arange(first, first + n)
    genres = np.array(["rock", "pop", "jazz", "electronic", "hiphop", "metal", "folk", "classical", "reggae"])
    return pd.DataFrame({
        "image": [f"covers/{i:09d}.jpg" for i in ids], "path": [f"/catalogue/covers/{i:09d}.jpg" for i in ids],
        "content_hash": [f"{i:040x}" for i in ids], "genre": genres[rng.integers(0, len(genres), n)],
        "artist": [f"artist {i // 7}" for i in ids]})


def main() -> None:
    from stylegen.index.build import index_ingest_id
    from stylegen.index.ingest import build
    from stylegen.index.shards import list_shards, write_shard
    from stylegen.index.store import Index, choose_index_key, write_snapshot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("indexes/merged"), help="the real index to take settings from")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--add", type=int, default=10_000)
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float16")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_add"))
    a = ap.parse_args()
    print(cpu_line())
    print(f"start: {load()}", flush=True)
    real = Index.open(a.index, use_gpu=False)
    rng = np.random.default_rng(0)
    shutil.rmtree(a.work, ignore_errors=True)
    idx = a.work / "index"
    idx.mkdir(parents=True)

    t = time.perf_counter()
    gen, _ = realistic_corpus.fit(realistic_corpus.real_vectors(a.index))
    vectors = gen.sample(a.n, 1, a.work / "vectors.npy", dtype=a.dtype)
    manifest = {k: v for k, v in real.manifest.items()
                if k not in ("search_params", "search_recall", "index_plan", "model")}
    manifest.update(count=a.n, shards=[], ingest_id=index_ingest_id(real),
                    index_key=choose_index_key(a.n, vectors.shape[1]))
    if a.dtype != "float32":
        manifest["vector_dtype"] = a.dtype
    else:
        manifest.pop("vector_dtype", None)
    meta = synthetic_metadata(a.n, 0, rng)
    print(f"data: {a.n:,} x {vectors.shape[1]} {a.dtype} vectors in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    write_snapshot(idx, manifest, vectors, meta, real.compressor)
    initial_s = time.perf_counter() - t
    base = Index.open(idx, use_gpu=False)
    print(f"initial build: {base.manifest['index_key']} {base.manifest.get('search_params')} over {len(base):,} "
          f"in {initial_s:.0f} s | {load()}", flush=True)
    del base, vectors, meta

    # the new covers: an ingest shard as `stylegen embed` writes it
    shard = next(s for s in list_shards(a.index) if s.ingest_id == index_ingest_id(real))
    raw_real = {p: np.asarray(x, np.float32) for p, x in shard.raw().items()}
    pick = rng.integers(0, shard.count, a.add)
    raw = {p: x[pick] * (1 + 0.05 * rng.standard_normal(x[pick].shape).astype(np.float32)) for p, x in raw_real.items()}
    new_meta = synthetic_metadata(a.add, a.n, rng)
    new_meta["_run"], new_meta["_order"] = time.time_ns(), np.arange(a.add)
    write_shard(idx, raw, new_meta, shard.info)
    del raw_real, raw

    t = time.perf_counter()
    result = build(idx)
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    grown = Index.open(idx, use_gpu=False)
    open_s = time.perf_counter() - t
    new_rows = np.arange(a.n, a.n + a.add)
    _, ids = grown.search(np.asarray(grown.vectors[new_rows], np.float32), k=1)
    found = float(np.mean(ids[:, 0] == new_rows))
    report = json.loads((a.index / "embed_report.json").read_text())
    rate = report["added"] / report["embed_seconds"]
    out = {"cpu": cpu_line(), "n": a.n, "add": a.add, "dtype": a.dtype, "index_key": grown.manifest["index_key"],
           "initial_build_s": initial_s, "add_s": add_s, "added": result.added, "count": len(grown),
           "reopen_s": open_s, "new_found_first": found, "embed_rate_img_s": rate,
           "embed_estimate_s": a.add / rate, "peak_rss_gb": vm("VmHWM"), "load": load()}
    (a.work / "results.json").write_text(json.dumps(out, indent=1))
    print(f"add {result.added:,} covers to {a.n:,} ({out['index_key']}, {a.dtype}): {add_s:.1f} s; reopen "
          f"{open_s:.2f} s; new covers found first by their own vector: {found:.4f}; embedding them at "
          f"{rate:.0f} img/s (the real index's last embed) would take {a.add / rate:.0f} s; peak RSS "
          f"{out['peak_rss_gb']:.2f} GB | {load()}")


if __name__ == "__main__":
    main()
