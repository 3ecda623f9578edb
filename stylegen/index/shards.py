"""Ingest shards: the append-only record of embedded covers, before compression.

An ingest run (local or on Ray) writes its covers in shards under ``DIR/shards``::

    DIR/shards/shard-<id>/
        raw_style.npy       raw part vectors, float16, one row per cover
        raw_content.npy
        metadata.parquet    content_hash, image, path, genre(s), every manifest column, _run, _order
        shard.json          ingest id (backbone, weights, taps, features, precision, preprocess),
                            ingest settings, row count

A shard is written to a temporary folder and renamed into place, so it is either complete
or absent; its name is unique (time + content), never derived from counting files. Covers
are keyed by content hash: a cover is "done" when a complete shard holds its hash, which
is all that resuming needs. Build (:mod:`stylegen.index.build`) reads shards, never rewrites them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stylegen.config import EmbedConfig
from stylegen.util.persist import clean_temporary, write_folder

SHARDS = "shards"
SHARD_JSON = "shard.json"
RUN_COLUMNS = ("_run", "_order")  # which ingest run wrote a row, and its position in that run's source


def ingest_id(config: EmbedConfig, weights_id: str, precision: str, preprocess: dict[str, Any]) -> str:
    """Identifies how raw features are made; shards with the same id can share an index.

    Compression and part weights are left out: they act after the raw features, so they
    can change at a refit without embedding again. Precision is in (bf16 and fp32 raw
    features differ), and so is the preprocessing spec.
    """
    bb, ft = config.backbone, config.features
    blob = {
        "backbone": {"name": bb.name, "taps": list(bb.taps) if bb.taps else None, "image_size": bb.image_size},
        "weights_id": weights_id,
        "features": {"parts": list(ft.parts), "signed_sqrt": ft.signed_sqrt, "flip": ft.flip,
                     "max_gram_channels": ft.max_gram_channels},
        "precision": precision,
        "preprocess": preprocess,
    }
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def describe(config: EmbedConfig, backbone: Any, precision: str) -> dict[str, Any]:
    """The ``shard.json`` fields that say how a shard's raw features were made (enough for a
    build to write the index manifest without loading the model)."""
    pre = backbone.preprocess.to_dict()
    return {
        "ingest_id": ingest_id(config, backbone.weights_id, precision, pre),
        "config": config.to_dict(),
        "backbone": {"name": backbone.name, "weights_id": backbone.weights_id, "taps": list(backbone.taps),
                     "tap_channels": [int(c) for c in backbone.tap_channels],  # what explain needs
                     "image_size": backbone.image_size, "mean": list(backbone.mean), "std": list(backbone.std)},
        "preprocess": pre,
        "precision": precision,
    }


@dataclass(frozen=True)
class Shard:
    """One complete shard on disk."""

    path: Path
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ingest_id(self) -> str:
        return self.info["ingest_id"]

    @property
    def count(self) -> int:
        return int(self.info["count"])

    def metadata(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        return pd.read_parquet(self.path / "metadata.parquet", columns=list(columns) if columns else None)

    def hashes(self) -> list[str]:
        return self.metadata(["content_hash"])["content_hash"].tolist()

    def raw(self, mmap: bool = True) -> dict[str, np.ndarray]:
        """Raw part vectors (float16; memory-mapped unless ``mmap`` is False)."""
        return {p: np.load(self.path / f"raw_{p}.npy", mmap_mode="r" if mmap else None)
                for p in self.info["parts"]}


def shards_dir(index_dir: Path) -> Path:
    return Path(index_dir) / SHARDS


def list_shards(index_dir: Path) -> list[Shard]:
    """The complete shards of an index folder, oldest first (a partial one is never listed)."""
    found = []
    for d in sorted(shards_dir(index_dir).glob("shard-*")):
        try:
            info = json.loads((d / SHARD_JSON).read_text())
        except (OSError, ValueError):
            continue  # cannot happen for a renamed shard; tolerate a hand-damaged one
        found.append(Shard(d, info))
    return sorted(found, key=lambda s: (s.info.get("created_ns", 0), s.name))


def write_shard(
    index_dir: Path, raw: dict[str, np.ndarray], metadata: pd.DataFrame, info: dict[str, Any]
) -> Shard:
    """Write one shard atomically: a temporary folder, renamed when complete.

    ``metadata`` has one row per raw vector, with at least ``content_hash``; ``info`` holds
    at least ``ingest_id`` (and whatever the build needs to describe the features).
    """
    if metadata["content_hash"].isna().any():
        raise ValueError("every shard row needs a content hash")
    n = len(metadata)
    if any(len(v) != n for v in raw.values()):
        raise ValueError("raw parts and metadata differ in length")
    root = shards_dir(index_dir)
    root.mkdir(parents=True, exist_ok=True)
    created = time.time_ns()
    digest = hashlib.sha1("\n".join(metadata["content_hash"]).encode()).hexdigest()[:12]
    name = f"shard-{created:020d}-{digest}"
    full = {**info, "parts": list(raw), "count": n, "created_ns": created}

    def fill(tmp: Path) -> None:
        for part, x in raw.items():
            np.save(tmp / f"raw_{part}.npy", np.asarray(x, dtype=np.float16))
        metadata.reset_index(drop=True).to_parquet(tmp / "metadata.parquet", index=False)
        (tmp / SHARD_JSON).write_text(json.dumps(full, indent=1, sort_keys=True))

    return Shard(write_folder(root, name, fill), full)


def clean_partial(index_dir: Path) -> None:
    """Remove half-written shards left by a killed run (call with the index lock held)."""
    clean_temporary(shards_dir(index_dir))
