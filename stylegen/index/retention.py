"""Raw retention: which covers keep their raw (pre-compression) part vectors in the shards.

Raw features cost 38.2 KB per cover (float16, the default backbone): 3.8 TB at 10^8 covers.
They serve refits, per-tap explanations and comparing indexes of different compression.
An index's manifest records its policy as ``raw_retention`` (absent: ``all``, as before it
existed):

* ``all``: every cover keeps them.
* ``sample``: a seeded uniform sample of at most ``sample_size`` covers of the index keeps
  them. The sample is bottom-k by content hash: priority(h) = the first 8 bytes of
  sha1(f"{seed}:{h}"), the kept covers are the ``sample_size`` smallest priorities of the
  whole index. It needs no state, and as the index grows covers only leave it, so pruning
  never needs a raw vector already dropped. Below ``sample_size`` covers it is ``all``.
* ``none``: no cover keeps them once it is built into the index.

Ingest always writes whole shards (the build needs the new covers' raw features); after a
build wrote a snapshot, :func:`prune_raw` rewrites the raw arrays of the shards that snapshot
built (:meth:`stylegen.index.shards.Shard.keep_raw`). Metadata is never pruned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from stylegen.errors import StylegenError
from stylegen.index.shards import list_shards
from stylegen.index.store import snapshots

RAW_POLICIES = ("all", "sample", "none")


@dataclass(frozen=True)
class RawRetention:
    """Which covers of an index keep raw features (see the module docstring)."""

    policy: str
    sample_size: int = 0  # ``sample`` only
    seed: int = 0  # ``sample`` only

    def __post_init__(self) -> None:
        if self.policy not in RAW_POLICIES:
            raise StylegenError(f"raw retention must be one of {', '.join(RAW_POLICIES)}, got {self.policy!r}")
        if self.policy == "sample" and self.sample_size < 1:
            raise StylegenError(f"a raw-feature sample needs at least one cover, got {self.sample_size}")

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> RawRetention:
        """An index's policy (indexes from before the setting keep everything)."""
        entry = manifest.get("raw_retention") or {"policy": "all"}
        return cls(entry["policy"], int(entry.get("sample_size") or 0), int(entry.get("seed") or 0))

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "sample_size": self.sample_size, "seed": self.seed}

    def same_as(self, other: RawRetention) -> bool:
        return self.policy == other.policy and (self.policy != "sample" or self == other)

    def describe(self) -> str:
        return f"sample of {self.sample_size:,} (seed {self.seed})" if self.policy == "sample" else self.policy

    def keeps(self, hashes: Sequence[str]) -> np.ndarray:
        """Which of ``hashes`` (all covers of an index) keep raw features, as a bool mask."""
        n = len(hashes)
        if self.policy == "all" or (self.policy == "sample" and n <= self.sample_size):
            return np.ones(n, bool)
        if self.policy == "none":
            return np.zeros(n, bool)
        mask = np.zeros(n, bool)
        mask[np.argpartition(priorities(hashes, self.seed), self.sample_size - 1)[: self.sample_size]] = True
        return mask


def priorities(hashes: Sequence[str], seed: int) -> np.ndarray:
    """The bottom-k priority of each content hash: first 8 bytes of sha1(f"{seed}:{h}"), uint64."""
    digest = b"".join(hashlib.sha1(f"{seed}:{h}".encode()).digest()[:8] for h in hashes)
    return np.frombuffer(digest, dtype=">u8").astype(np.uint64)


def prune_raw(index_dir: str | Path) -> int:
    """Drop the raw features the live index's policy no longer keeps, from the shards its
    snapshot built and for the covers it holds; returns the raw rows dropped. Where a cover's
    raw features lie in several shards, the first (the one builds read) is kept. The caller
    holds the index lock; only the manifest and the hash column of the snapshot are read."""
    snap = snapshots(index_dir).current()
    if snap is None:
        return 0
    manifest = json.loads((snap / "manifest.json").read_text())
    built = set(manifest.get("shards", []))
    shards = [s for s in list_shards(Path(index_dir)) if s.name in built]
    for shard in shards:
        shard.drop_stale()  # left by a prune killed between its switch and the clean-up
    retention = RawRetention.of(manifest)
    if retention.policy == "all" or (retention.policy == "sample" and manifest["count"] <= retention.sample_size):
        return 0
    hashes = pq.read_table(snap / "metadata.parquet", columns=["content_hash"]).column(0).to_pylist()
    held = set(hashes)
    kept = {h for h, k in zip(hashes, retention.keeps(hashes), strict=True) if k}
    dropped = 0
    seen: set[str] = set()
    for shard in shards:
        have = shard.raw_rows()
        if not len(have):
            continue
        meta = shard.hashes()
        keep = []
        for r in have.tolist():
            h = meta[r]
            if h not in held:  # not a cover of this snapshot: not its policy's to judge
                keep.append(r)
            elif h in kept and h not in seen:
                keep.append(r)
                seen.add(h)
        if len(keep) < len(have):
            shard.keep_raw(keep)
            dropped += len(have) - len(keep)
    return dropped


def raw_storage(index_dir: str | Path) -> dict[str, Any]:
    """What the live index keeps of raw features: its policy, covers, shard rows with raw
    features, and their bytes on disk (raw arrays of the shards it built, plus those in the
    snapshot of an index from before shards)."""
    snap = snapshots(index_dir).current()
    if snap is None:
        raise StylegenError(f"no stylegen index at {index_dir}")
    manifest = json.loads((snap / "manifest.json").read_text())
    built = set(manifest.get("shards", []))
    rows = size = 0
    for shard in list_shards(Path(index_dir)):
        if shard.name in built:
            rows += len(shard.raw_rows())
            size += sum(shard.raw_file(p).stat().st_size for p in shard.info["parts"])
    legacy = [snap / f"raw_{p}.npy" for p in manifest.get("slices", {})]
    if legacy and all(f.is_file() for f in legacy):
        rows += int(manifest["count"])
        size += sum(f.stat().st_size for f in legacy)
    count = int(manifest["count"])
    return {"policy": RawRetention.of(manifest).to_dict(), "covers": count, "covers_with_raw": rows,
            "bytes": size, "bytes_per_cover": size / count if count else 0.0}
