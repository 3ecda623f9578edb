#!/usr/bin/env python
"""Ray Data engine: per-actor throughput vs the local engine, same covers, one run.

    python scripts/bench_ray.py [--n 160] [--cpus 2] [--batch-size 16] [--address HOST:PORT]

Embeds N real covers into fresh indexes with ``--engine ray`` (local Ray, ``--cpus`` CPUs:
one featurizer actor with cpus-1 CPUs, decode tasks on the rest) and with the local engine
(inline decode). Ray's steady-state rate is taken between the first and the last shard the
driver writes (shards of ``--batch-size`` covers), so Ray's start-up and the actor's model
load are left out and reported apart; the local rate is ``EmbedReport.embed_seconds``.
With ``--address`` the Ray run joins an existing cluster (``ray start --head``) instead of
starting a local Ray. Both indexes are then compared: same metadata, max vector difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"


def main() -> None:
    import ray

    import stylegen
    import stylegen.index.ingest_ray as ir
    from stylegen.config import EmbedConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--address", default=None, help="an existing Ray cluster to join")
    a = ap.parse_args()
    if not COVERS.exists():
        sys.exit(f"skipped: no real covers at {COVERS}")
    info = Path("/proc/cpuinfo").read_text()
    model = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
    print(f"cpu: {model}, {os.cpu_count()} cores, avx2={' avx2' in info}, avx512_bf16={' avx512_bf16' in info}; "
          f"load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rows = pd.read_csv(COVERS, dtype=str, keep_default_na=False).head(a.n)
        rows["image"] = [str(COVERS.parent / p) for p in rows["image"]]
        rows.to_csv(d / "covers.csv", index=False)
        stamps: list[tuple[float, int]] = []
        original = ir.write_shard

        def timed(index_dir, raw, meta, info):
            stamps.append((time.perf_counter(), len(meta)))
            return original(index_dir, raw, meta, info)

        ir.write_shard = timed
        t = time.perf_counter()
        if a.address:
            ray.init(address=a.address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        cluster = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        ray_start = time.perf_counter() - t
        t = time.perf_counter()
        r = stylegen.embed(d / "covers.csv", d / "ray", EmbedConfig(), engine="ray", precision="fp32",
                           batch_size=a.batch_size, checkpoint_every=a.batch_size, progress=False)
        ray_total = time.perf_counter() - t
        ray.shutdown()
        steady = sum(n for _, n in stamps[1:]) / (stamps[-1][0] - stamps[0][0])
        loc = stylegen.embed(d / "covers.csv", d / "local", EmbedConfig(), precision="fp32", workers=0,
                             batch_size=a.batch_size, progress=False)
        ia, ib = stylegen.Index.open(d / "local"), stylegen.Index.open(d / "ray")
        same_meta = ia.metadata.drop(columns=["row"], errors="ignore").equals(
            ib.metadata.drop(columns=["row"], errors="ignore"))
        print(json.dumps({
            "ray": a.address or f"local, num_cpus={a.cpus}", "cluster_resources": cluster,
            "runtime": ib.manifest.get("runtime"), "same_metadata": bool(same_meta),
            "max_abs_vector_diff": float(np.abs(np.asarray(ia.vectors) - np.asarray(ib.vectors)).max()),
            "covers": r.count, "ray_init_s": round(ray_start, 1), "ray_embed_call_s": round(ray_total, 1),
            "ray_first_shard_after_s": round(stamps[0][0] - t, 1),
            "ray_per_actor_img_s": round(steady, 2), "actor_cpus": a.cpus - 1,
            "local_img_s": round(loc.added / loc.embed_seconds, 2), "local_embed_call_s": round(loc.seconds, 1),
            "load_after": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
