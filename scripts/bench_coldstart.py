#!/usr/bin/env python
"""Cold start of the CLI: whole processes, repeated, median wall time and peak RSS.

    python scripts/bench_coldstart.py --index indexes/covers [--repeats 5]
        [--cover PATH] [--baseline ../main-baseline [--baseline-index DIR]] [--model covers-9genres]

Times ``stylegen --help`` and ``stylegen classify COVER --index IDX`` (a cover that is not
in the index, so the featurizer runs) as fresh processes. ``--baseline`` runs the same
commands with another checkout on PYTHONPATH (e.g. the main branch) in the same run,
interleaved, so drift of a shared machine hits both alike. Peak RSS is each child's
``ru_maxrss`` (os.wait4). The first classify run of a checkout also fills the export cache;
it is run once untimed. ``--model`` adds ``stylegen classify COVER --model NAME`` (no index):
once per repeat with a new, empty cache, as the first classify after an install, and with
the cache that run left, as every later one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers"


def cpu_line() -> str:
    """CPU model, the flags that decide the fast paths, and the load average."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    have = ", ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"CPU: {model}; {os.cpu_count()} logical cores; flags: {have}; load average {load}"


def run(cmd: list[str], pythonpath: str, cache: str | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, exit code) of one fresh process (``cache``: its STYLEGEN_CACHE)."""
    env = {**os.environ, "PYTHONPATH": pythonpath, **({"STYLEGEN_CACHE": cache} if cache else {})}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=pythonpath, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    return wall, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("indexes/covers"))
    ap.add_argument("--cover", type=Path, default=None, help="query image (default: a generated one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to compare with")
    ap.add_argument("--baseline-index", type=Path, default=None,
                    help="the index the baseline reads (default: --index), e.g. one whose heads "
                         "the baseline's code trained")
    ap.add_argument("--model", default=None, help="also time the first and later classify with this model, no index")
    a = ap.parse_args()
    cover = a.cover
    tmp = tempfile.TemporaryDirectory()
    if cover is None:  # a cover that is not in the index: the featurizer must run
        import numpy as np
        from PIL import Image

        cover = Path(tmp.name) / "query.jpg"
        rgb = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(cover)
    stylegen = [sys.executable, "-c", "from stylegen.apps.cli import main; main()"]
    def commands_for(index: Path) -> dict[str, list[str]]:
        classify = [*stylegen, "classify", str(cover), "--index", str(index)]
        return {"stylegen --help": [*stylegen, "--help"],
                "stylegen classify COVER --index IDX": classify,
                **{f"stylegen classify COVER --index IDX --method {m}": [*classify, "--method", m]
                   for m in ("knn", "ensemble")}}

    checkouts = {"this checkout": (str(ROOT), commands_for(a.index))}
    if a.baseline is not None:
        checkouts = {f"baseline {a.baseline}": (str(a.baseline), commands_for(a.baseline_index or a.index)),
                     **checkouts}
    print(cpu_line())
    for path, commands in checkouts.values():  # warm the page cache and the export cache
        for cmd in commands.values():
            _, _, code = run(cmd, path)
            if code:
                sys.exit(f"{' '.join(cmd)} failed with exit code {code} (PYTHONPATH={path})")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    names = list(commands_for(a.index))
    for _ in range(a.repeats):
        for name in names:
            for label, (path, commands) in checkouts.items():
                wall, rss, _ = run(commands[name], path)
                results.setdefault((name, label), []).append((wall, rss))
    if a.model:
        model_cmd = [*stylegen, "classify", str(cover), "--model", a.model]
        for i in range(a.repeats):
            cache = str(Path(tmp.name) / f"cache{i}")  # new and empty: the first classify after an install
            for name in ("first classify after install: --model, empty cache", "later classify: --model"):
                wall, rss, code = run(model_cmd, str(ROOT), cache)
                if code:
                    sys.exit(f"{' '.join(model_cmd)} failed with exit code {code}")
                results.setdefault((name, "this checkout"), []).append((wall, rss))
    print(f"\n{a.repeats} runs each, interleaved; median (min-max)\n")
    print("| command | code | wall s | peak RSS MB |\n|---|---|---:|---:|")
    for (name, label), rows in results.items():
        walls, rss = [w for w, _ in rows], [r for _, r in rows]
        print(f"| {name} | {label} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) "
              f"| {statistics.median(rss):.0f} |")
    print(cpu_line())


if __name__ == "__main__":
    main()
