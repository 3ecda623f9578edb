#!/usr/bin/env python
"""Kill test: SIGKILL `stylegen embed` at random moments of one 300-image job, then check.

    python scripts/kill_test.py [--n 300] [--kills 20] [--shard-size 16] [--seed 0]

The job embeds N real covers (../shared/data/covers, or generated images when that is
absent) into a fresh index. It is started, SIGKILLed at a random moment, started again, ...
``--kills`` times, then run to the end. A clean run first measures the start-up, the time
per shard and the commit. Kills are aimed: ``--startup-kills`` at a random moment of the
start-up, then kills at sorted random fractions of the ingest (once that many covers are in
shards, plus a random part of one shard's time), then ``--commit-kills`` at a random moment
of the commit (build, snapshot write, CURRENT switch) once every cover is ingested. The
phase each kill really hit is read from what it left on disk.

After every kill: the index opens (when one exists), holds no duplicate content hash and no
more covers than the job has. After the final run: exactly N covers, the same hashes as a
clean uninterrupted run, vectors within tolerance of that run's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"


def make_source(n: int, folder: Path) -> Path:
    """A manifest of n real covers (absolute paths), or of n generated images."""
    csv = folder / "source.csv"
    if COVERS.exists():
        rows = pd.read_csv(COVERS, dtype=str, keep_default_na=False).head(n)
        rows["image"] = [str(COVERS.parent / p) for p in rows["image"]]
    else:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import make_image

        rows = pd.DataFrame([{"image": str(make_image(folder / "img" / f"{i}.png", kind=i, seed=i)),
                              "genre": f"g{i % 3}"} for i in range(n)])
    rows.to_csv(csv, index=False)
    return csv


def embed_cmd(csv: Path, index: Path, shard_size: int) -> list[str]:
    return [sys.executable, "-m", "stylegen", "embed", str(csv), "--index", str(index), "--no-progress",
            "--precision", "fp32", "--workers", "0", "--shard-size", str(shard_size)]


def run_to_end(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=_env())
    return time.perf_counter() - t


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def state(index: Path) -> dict:
    """What is on disk: live snapshot, complete shards, half-written folders."""
    shards = index / "shards"
    current = index / "CURRENT"
    return {
        "current": current.read_text().strip() if current.is_file() else None,
        "shards": sorted(p.name for p in shards.glob("shard-*")) if shards.is_dir() else [],
        "tmp_shard": bool(list(shards.glob(".tmp-*"))) if shards.is_dir() else False,
        "tmp_snapshot": bool(list(index.glob(".tmp-*"))),
    }


def phase(before: dict, after: dict, finished: bool) -> str:
    if finished:
        return "finished before the kill"
    if after["current"] != before["current"]:
        return "commit: after the CURRENT switch"
    if after["tmp_snapshot"]:
        return "commit: writing the snapshot"
    if after["tmp_shard"]:
        return "ingest: writing a shard"
    if after["shards"] != before["shards"]:
        return "ingest: after a shard was written"
    return "start-up or featurizing (nothing new on disk yet)"


def check(index: Path, n: int) -> tuple[int, str]:  # n: the most covers the index may hold
    """Open the index the way every reader does; (count, problem or '')."""
    if not (index / "CURRENT").is_file():
        return 0, ""
    import stylegen

    idx = stylegen.Index.open(index, use_gpu=False)
    hashes = idx.metadata["content_hash"]
    if not hashes.is_unique:
        return len(idx), f"{int(hashes.duplicated().sum())} duplicate content hashes"
    if len(idx) > n or idx.faiss_index.ntotal != len(hashes) or len(idx.vectors) != len(hashes):
        return len(idx), f"inconsistent sizes: faiss {idx.faiss_index.ntotal}, metadata {len(hashes)}"
    return len(idx), ""


def kill_plan(kills: int, startup_kills: int, commit_kills: int, rng: random.Random) -> list[tuple[str, float]]:
    """One (phase aimed at, position) per round: start-up kills at a random moment of the
    start-up; ingest kills once a random fraction of the covers is ingested (sorted, so the
    job moves forward); commit kills at a random moment after every cover is ingested."""
    ingest = sorted(rng.random() for _ in range(kills - startup_kills - commit_kills))
    return ([("start-up", rng.random()) for _ in range(startup_kills)] + [("ingest", f) for f in ingest]
            + [("commit", rng.random()) for _ in range(commit_kills)])


def kill_job(csv: Path, index: Path, expected: int, plan: list[tuple[str, float]], shard_size: int,
             rng: random.Random, startup: float, per_shard: float, build: float) -> list[dict]:
    """Run the job once per planned kill, SIGKILLing it at that moment; one record per round."""
    rounds = []
    cmd = embed_cmd(csv, index, shard_size)
    for i, (aim, x) in enumerate(plan):
        before, before_ingested = state(index), _ingested(index)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
        t0 = time.perf_counter()
        if aim == "start-up":
            delay = x * startup
        elif aim == "commit" and before_ingested >= expected:  # only start-up + commit left to run
            delay = startup + x * build * 1.2
        else:  # wait for the aimed-at progress, then a random part of one shard's (or the commit's) time
            target = expected if aim == "commit" else max(1, int(x * expected))
            while proc.poll() is None and _ingested(index) < target:
                time.sleep(0.01)
            delay = rng.uniform(0, build * 1.2 if aim == "commit" else per_shard)
        try:
            proc.wait(timeout=delay)
            finished = True
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            finished = False
        ran = time.perf_counter() - t0
        after = state(index)
        count, problem = check(index, expected)
        hit = phase(before, after, finished)
        if hit.startswith("start-up") and _ingested(index) >= expected and ran > startup:
            hit = "commit: fitting/transforming (inferred: all ingested, past start-up, nothing new on disk)"
        rounds.append({"round": i + 1, "aimed_at": aim, "ran_s": round(ran, 1), "phase": hit,
                       "ingested": _ingested(index), "index_count": count, "problem": problem})
        print(json.dumps(rounds[-1]), flush=True)
    return rounds


def _ingested(index: Path) -> int:
    return sum(json.loads((s / "shard.json").read_text())["count"] for s in (index / "shards").glob("shard-*")) \
        if (index / "shards").is_dir() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--startup-kills", type=int, default=3, help="of the kills, how many aim at the start-up")
    ap.add_argument("--commit-kills", type=int, default=5, help="of the kills, how many aim at the commit")
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    print(f"cpu: {_cpu()}; load: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        csv = make_source(a.n, d)
        clean = d / "clean"
        total = run_to_end(embed_cmd(csv, clean, a.shard_size))
        report = json.loads((clean / "embed_report.json").read_text())
        startup = run_to_end(embed_cmd(csv, clean, a.shard_size))  # nothing to do: start-up + hashing
        build = report["build_seconds"]
        per_shard = max(total - startup - build, 1.0) / a.n * a.shard_size
        print(f"clean run {total:.1f} s, start-up {startup:.1f} s, commit {build:.1f} s; "
              f"{report['count']} covers", flush=True)
        index = d / "killed"
        plan = kill_plan(a.kills, a.startup_kills, a.commit_kills, rng)
        rounds = kill_job(csv, index, report["count"], plan, a.shard_size, rng, startup, per_shard, build)
        final_s = run_to_end(embed_cmd(csv, index, a.shard_size))
        count, problem = check(index, a.n)
        import stylegen

        got, ref = stylegen.Index.open(index), stylegen.Index.open(clean)
        same_hashes = set(got.metadata["content_hash"]) == set(ref.metadata["content_hash"])
        ref_rows = dict(zip(ref.metadata["content_hash"], range(len(ref)), strict=True))
        order = [ref_rows[h] for h in got.metadata["content_hash"]]
        diff = float(np.abs(np.asarray(got.vectors) - np.asarray(ref.vectors)[order]).max()) if same_hashes else None
    killed = [r for r in rounds if r["phase"] != "finished before the kill"]
    phases = pd.Series([r["phase"] for r in rounds]).value_counts().to_dict()
    ok = (not problem and count == report["count"] and same_hashes and not any(r["problem"] for r in rounds))
    summary = {"kills": len(killed), "rounds": len(rounds), "phases": phases, "final_count": count,
               "expected_count": report["count"], "same_hashes_as_clean_run": same_hashes,
               "max_abs_vector_diff_vs_clean": diff, "final_run_s": round(final_s, 1),
               "problems": [r for r in rounds if r["problem"]] + ([problem] if problem else []), "ok": ok}
    print(json.dumps(summary, indent=1))
    sys.exit(0 if ok else 1)


def _cpu() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = [f for f in ("avx2", "avx512_bf16", "amx_bf16") if f" {f}" in info]
    return f"{model} ({os.cpu_count()} cores, {' '.join(flags)})"


if __name__ == "__main__":
    main()
