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
is all that resuming needs. Build (:mod:`stylegen.index.build`) reads shards; the one
rewrite is pruning raw features an index's retention policy no longer keeps
(:mod:`stylegen.index.retention`, :meth:`Shard.keep_raw`). A pruned shard's ``shard.json`` lists
the metadata rows that still have raw features (``raw_rows``, ascending; absent: all) and
the files holding them (``raw_files``); metadata is never pruned.
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
from stylegen.errors import DataError
from stylegen.util.persist import atomic_write, atomic_write_text, clean_temporary, write_folder

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
        """Raw part vectors (float16; memory-mapped unless ``mmap`` is False), one row per
        metadata row that still has them: :meth:`raw_map` says which."""
        return {p: np.load(self.raw_file(p), mmap_mode="r" if mmap else None) for p in self.info["parts"]}

    def raw_file(self, part: str) -> Path:
        """The file of one raw part: a plain file directly in this shard's folder. A shard.json
        that names anything else (a path, a link out of the folder), e.g. in an index someone
        shared, is refused rather than followed."""
        name = str(self.info.get("raw_files", {}).get(part, f"raw_{part}.npy"))
        path = self.path / name
        if Path(name).name != name or path.is_symlink():
            raise DataError(f"shard {self.name} names raw features outside its folder ({name!r}); "
                            "remove the shard and embed again")
        return path

    def raw_rows(self) -> np.ndarray:
        """The metadata rows that have raw features, ascending (all until pruned)."""
        rows = self.info.get("raw_rows")
        return np.arange(self.count, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)

    def raw_map(self) -> np.ndarray:
        """For each metadata row, its row in :meth:`raw`'s arrays, or -1 where pruned."""
        rows = self.info.get("raw_rows")
        if rows is None:
            return np.arange(self.count, dtype=np.int64)
        out = np.full(self.count, -1, np.int64)
        out[np.asarray(rows, np.int64)] = np.arange(len(rows))
        return out

    def keep_raw(self, rows: Sequence[int]) -> Shard:
        """Keep raw features only for the metadata ``rows`` (those among them that still have
        any); returns the shard as it is now.

        Atomic: the kept rows go to new files (``raw_<part>.g<N>.npy``), then ``shard.json``,
        naming them and the new row map, replaces the old one in one ``os.replace``; a crash
        leaves either the old files and map or the new ones. The old files, recorded in the
        new ``shard.json`` as ``raw_stale``, are removed after the switch (again by the next
        prune, should a crash come first).
        """
        have = self.raw_rows()
        keep = np.intersect1d(np.asarray(rows, np.int64), have)
        if len(keep) == len(have):
            return self
        at = np.searchsorted(have, keep)
        generation = int(self.info.get("raw_generation", 0)) + 1
        files = {p: f"raw_{p}.g{generation}.npy" for p in self.info["parts"]}
        for part, x in self.raw().items():
            atomic_write(self.path / files[part], lambda tmp, kept=np.ascontiguousarray(x[at]): _save_npy(tmp, kept))
        stale = sorted({self.raw_file(p).name for p in self.info["parts"]} - set(files.values()))
        info = {**self.info, "raw_rows": keep.tolist(), "raw_files": files, "raw_generation": generation,
                "raw_stale": stale}
        atomic_write_text(self.path / SHARD_JSON, json.dumps(info, indent=1, sort_keys=True))  # the switch
        shard = Shard(self.path, info)
        shard.drop_stale()
        return shard

    def drop_stale(self) -> None:
        """Remove the raw files a finished prune replaced (named in ``raw_stale``: ours only)."""
        for name in self.info.get("raw_stale", []):
            if Path(name).name == name and name not in self.info.get("raw_files", {}).values():
                (self.path / name).unlink(missing_ok=True)


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


def _save_npy(path: Path, x: np.ndarray) -> None:
    with open(path, "wb") as fh:  # through a handle: np.save would add ".npy" to a temporary name
        np.save(fh, x)


def clean_partial(index_dir: Path) -> None:
    """Remove half-written shards left by a killed run, and the temporary files a killed prune
    left inside complete shards (call with the index lock held)."""
    clean_temporary(shards_dir(index_dir))
    for shard in shards_dir(index_dir).glob("shard-*"):
        clean_temporary(shard)
