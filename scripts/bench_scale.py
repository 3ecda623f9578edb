"""Flat vs HNSW vs IVF-PQ on N synthetic vectors derived from the real cover vectors.

    python scripts/bench_scale.py --index indexes/merged --n 1000000 --dtype float16

Data (``--data realistic``, the default): the neighbour-mix generator of
``scripts/realistic_corpus.py``, fitted to the index's real vectors so that held-out queries
see 1st/10th nearest-neighbour similarities like real covers do. ``--data noisy`` is the old
recipe: a real cover vector plus Gaussian noise with ``noise**2`` times the real vectors'
covariance (4,844 tight clusters: easy). Queries are drawn the same way with another seed
(held out: not in the database). ``--dtype float16`` writes the database as float16, as an
index with ``vector_dtype`` float16 keeps vectors.npy (the build reads it, the PQ re-rank reads
its rows). Ground truth: exact inner-product search over the whole database.

Each build runs in its own subprocess (peak RSS: its VmHWM), then another subprocess
opens the written index from disk (IVF memory-mapped, stored search parameters applied) and
measures recall@10 against exact search and single-query latency (1 thread).
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
import realistic_corpus
from bench_coldstart import cpu_line

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def import_ann_alone():
    """stylegen.index.ann without the package __init__ (which imports torch): RSS is the index's."""
    import types

    if "stylegen" not in sys.modules:
        pkg = types.ModuleType("stylegen")
        pkg.__path__ = [str(ROOT / "stylegen")]
        sys.modules["stylegen"] = pkg
    from stylegen.index import ann

    return ann


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def child_build(args: argparse.Namespace) -> None:
    ann = import_ann_alone()

    base = np.load(args.work / "base.npy", mmap_mode="r")
    t = time.perf_counter()
    r = ann.build(base, args.key, target_recall=args.target, n_queries=args.tune_queries)
    build_s = time.perf_counter() - t - r.timings.get("tune_s", 0.0)
    path = args.work / f"{args.kind}.faiss"
    entry = ann.write_index(r, path)
    (args.work / f"{args.kind}.build.json").write_text(
        json.dumps({**entry, "timings": r.timings, "build_s": build_s, "file": str(path), "peak_rss": peak_rss()}))


def child_search(args: argparse.Namespace) -> None:
    import faiss

    ann = import_ann_alone()
    info = json.loads(Path(args.work / f"{args.kind}.build.json").read_text())
    t = time.perf_counter()
    index = ann.read_index(info["file"], info["index_key"], info["search_params"])
    open_s = time.perf_counter() - t
    queries = np.load(args.work / "queries.npy")
    truth = np.load(args.work / "truth.npy")
    base = np.load(args.work / "base.npy", mmap_mode="r")  # what Index.search re-ranks against
    factor = ann.refine_factor(info["index_key"], info["search_params"])
    faiss.omp_set_num_threads(1)
    found = np.empty_like(truth)
    lat = []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        found[i] = ann.refine_search(index, q[None], truth.shape[1], base, factor)[1][0]
        lat.append(time.perf_counter() - t)
    lat = np.array(lat[10:]) * 1000  # first queries warm the page cache
    (args.work / f"{args.kind}.search.json").write_text(json.dumps({
        "recall": ann.recall_at(found, truth, truth.shape[1]), "open_s": open_s,
        "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)), "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS since exec (VmHWM). ``ru_maxrss`` of a child is not usable here:
    it keeps the RSS the forked parent had before exec (1.32 GB for every build at 100k)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(args: argparse.Namespace, role: str, kind: str, key: str) -> int:
    """Run one step in a fresh process; returns its peak RSS in bytes (from its own VmHWM)."""
    cmd = [sys.executable, __file__, "--work", str(args.work), "--child", role, "--kind", kind,
           "--key", key, "--target", str(args.target), "--tune-queries", str(args.tune_queries)]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise SystemExit(f"{role} {kind} failed")
    return json.loads((args.work / f"{kind}.{role}.json").read_text())["peak_rss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=Path, default=Path("indexes/merged"), help="real vectors to fit the data to")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall/latency")
    p.add_argument("--tune-queries", type=int, default=500, help="rows held out to tune nprobe/efSearch")
    p.add_argument("--target", type=float, default=0.95, help="recall@10 the tuning aims at")
    p.add_argument("--noise", type=float, default=0.5, help="--data noisy: the noise scale")
    p.add_argument("--data", choices=("realistic", "noisy"), default="realistic")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="how the database vectors are kept on disk (an index's vector_dtype)")
    p.add_argument("--kinds", default="flat;hnsw;ivfpq", help="; separated: flat, hnsw, ivfpq or factory strings")
    p.add_argument("--ivf-key", default=None, help="IVF factory string (default: the planned one)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    p.add_argument("--reuse-data", action="store_true", help="keep the work folder's corpus from the last run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    p.add_argument("--key", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return (child_build if args.child == "build" else child_search)(args)

    ann = import_ann_alone()

    args.work.mkdir(parents=True, exist_ok=True)
    print(cpu_line())
    print(f"start: {load()} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    real = realistic_corpus.real_vectors(args.index)
    if args.reuse_data and (args.work / "data.json").is_file():  # same recipe, n and dtype as last time
        recipe = json.loads((args.work / "data.json").read_text())["recipe"]
        print(f"data: reused {args.work / 'base.npy'} ({recipe})", flush=True)
    else:
        recipe = make_corpus(args, real)
        (args.work / "data.json").write_text(json.dumps({"recipe": recipe, "n": args.n, "dtype": args.dtype}))
    base = np.load(args.work / "base.npy", mmap_mode="r")
    if len(base) != args.n or base.dtype != np.dtype(args.dtype):
        raise SystemExit(f"{args.work / 'base.npy'} holds {len(base)} {base.dtype} rows, not {args.n} {args.dtype}")
    keys = {"flat": "Flat", "hnsw": f"HNSW{ann.HNSW_M}",
            "ivfpq": args.ivf_key or ann.plan_index(args.n, real.shape[1], kind="ivfpq").key}
    run_kinds(args, ann, keys, recipe)


def make_corpus(args: argparse.Namespace, real: np.ndarray) -> str:
    """Write base.npy, queries.npy and truth.npy into the work folder; returns the recipe."""
    ann = import_ann_alone()
    t = time.perf_counter()
    if args.data == "realistic":
        gen, check = realistic_corpus.fit(real)
        recipe = (f"neighbour mix fitted to {len(real)} real vectors (σ={gen.sigma}; KS sim@1 "
                  f"{check['candidates'][f'{gen.sigma:g}']['ks sim@1']}, sim@10 "
                  f"{check['candidates'][f'{gen.sigma:g}']['ks sim@10']})")
    else:
        gen = realistic_corpus.noisy_copies(real, args.noise)
        recipe = f"{len(real)} real vectors + {args.noise}·N(0, Σ)"
    base = gen.sample(args.n, 1, args.work / "base.npy", dtype=args.dtype)
    queries = gen.sample(args.queries, 2).astype(args.dtype).astype(np.float32)
    np.save(args.work / "queries.npy", queries)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = ann.exact_knn([base], queries, 10)
    np.save(args.work / "truth.npy", truth)
    print(f"data: {args.n} x {real.shape[1]} {args.dtype}, {recipe}, in {gen_s:.0f} s; "
          f"exact top-10 of {args.queries} queries in {time.perf_counter() - t:.0f} s", flush=True)
    return recipe


def run_kinds(args: argparse.Namespace, ann, keys: dict[str, str], recipe: str) -> None:
    rows = []
    for kind in args.kinds.split(";"):
        key = keys.get(kind, kind)
        name = kind if kind in keys else key.replace(",", "_")
        rss = run_child(args, "build", name, key)
        search_rss = run_child(args, "search", name, key)
        b = json.loads(Path(args.work / f"{name}.build.json").read_text())
        s = json.loads(Path(args.work / f"{name}.search.json").read_text())
        rows.append({"kind": name, "key": key, "build_s": b["build_s"], "train_s": b["timings"].get("train_s", 0),
                     "tune_s": b["timings"].get("tune_s", 0), "params": b["search_params"],
                     "peak_rss_gb": rss / 1e9, "search_rss_gb": search_rss / 1e9,
                     "disk_mb": os.path.getsize(b["file"]) / 1e6, **s, "load": load()})
        r = rows[-1]
        print(f"{name}: {key} build {r['build_s']:.0f} s (train {r['train_s']:.0f}, tune {r['tune_s']:.0f}) "
              f"rss {r['peak_rss_gb']:.2f} GB disk {r['disk_mb']:.0f} MB recall@10 {r['recall']:.3f} "
              f"p50 {r['p50_ms']:.2f} ms p95 {r['p95_ms']:.2f} ms {r['params']} | {r['load']}", flush=True)
    (args.work / "results.json").write_text(json.dumps(
        {"cpu": cpu_line(), "n": args.n, "data": args.data, "recipe": recipe, "dtype": args.dtype, "rows": rows},
        indent=2))
    print("\n| index | factory | build s (+ tune) | peak RSS GB | disk MB | recall@10 | p50 ms | p95 ms | params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | `{r['key']}` | {r['build_s']:.0f} (+{r['tune_s']:.0f}) | {r['peak_rss_gb']:.2f} "
              f"| {r['disk_mb']:.0f} "
              f"| {r['recall']:.3f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {ann.params_string(r['params'])} |")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
