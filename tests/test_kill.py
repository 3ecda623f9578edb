"""SIGKILL `stylegen embed` mid-ingest and mid-commit: the index always opens, never holds a
cover twice, and the next run ends with exactly the right count (the long version with 20
kills of a 300-cover job is scripts/kill_test.py, results in docs/benchmarks.md)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import stylegen
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parents[1]


def ingested(index: Path) -> int:
    return len(list((index / "shards").glob("shard-*"))) * 4 if (index / "shards").is_dir() else 0


def check(index: Path) -> int:
    if not (index / "CURRENT").is_file():
        return 0
    idx = stylegen.Index.open(index, use_gpu=False)
    assert idx.metadata["content_hash"].is_unique and idx.faiss_index.ntotal == len(idx.metadata) == len(idx.vectors)
    return len(idx)


@pytest.mark.slow
def test_sigkill_mid_ingest_and_mid_commit_never_corrupts_or_duplicates(tmp_path):
    for i in range(24):
        make_image(tmp_path / "src" / f"{i}.png", kind=i, seed=i)
    index = tmp_path / "idx"
    cmd = [sys.executable, "-m", "stylegen", "embed", str(tmp_path / "src"), "--index", str(index),
           "--no-progress", "--precision", "fp32", "--workers", "0", "--batch-size", "4", "--shard-size", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    for wait_for in (4, 12, 24):  # covers in shards before the kill: mid-ingest twice, then the commit
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and ingested(index) < wait_for:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert check(index) in (0, 24)  # the index appears only once, whole
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert check(index) == 24
