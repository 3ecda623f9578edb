"""Build: ingest shards -> compressed vectors -> a snapshot (FAISS index + metadata + manifest).

Two ways to move the index forward, both from the shards in ``DIR/shards``:

* **append** (the default once an index exists): the shards the live snapshot does not
  hold yet are transformed with the snapshot's frozen compressor and appended. Old rows
  keep their position and their vectors bit for bit, ``feature_id`` stays the same, so
  trained heads stay valid.
* **fit** (a new index, or ``refit=True``): the compression is fitted on a seeded sample
  of at most ``max_sample`` covers (recorded in the manifest under ``compression_fit``),
  then every cover is transformed in batches. A refit gives a new ``feature_id``: heads
  must be trained again.

Covers are keyed by content hash: a shard row whose hash the snapshot already holds is
never added twice, whatever state a killed run left behind. Once a snapshot is written, the
raw features its ``raw_retention`` does not keep are pruned from the shards it built
(:mod:`stylegen.index.retention`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from stylegen.config import EmbedConfig, Preprocess
from stylegen.errors import IndexMismatchError, IndexNotFoundError, StylegenError
from stylegen.index.bundle import Model, model_entry
from stylegen.index.compress import Compressor, combine
from stylegen.index.retention import RawRetention, prune_raw
from stylegen.index.shards import RUN_COLUMNS, Shard, ingest_id, list_shards, write_shard
from stylegen.index.store import (
    FORMAT_VERSION,
    VECTOR_DTYPES,
    Index,
    choose_index_key,
    load_raw,
    snapshots,
    stored_vectors,
    vector_dtype,
    write_snapshot,
)

DEFAULT_MAX_SAMPLE = 100_000
# Raw features a new index keeps (stylegen.index.retention): a seeded sample of the most covers a
# refit fits on. Below DEFAULT_MAX_SAMPLE covers that is every cover (nothing is lost for a small
# collection); above, raw storage stays at most 100,000 x 38.2 KB = 3.8 GB instead of growing
# by 38.2 KB a cover (3.8 TB at 10^8; docs/scale.md). Indexes from before the setting keep everything.
DEFAULT_RAW_RETENTION = RawRetention("sample", DEFAULT_MAX_SAMPLE, seed=0)
TRANSFORM_BATCH = 2048
_LOC = ("_shard", "_row")  # where a row's raw features are: shard number, row in the shard


@dataclass
class BuildResult:
    """What one build did."""

    added: int = 0
    count: int = 0
    refit: bool = False  # the compression was (re)fitted
    shards: int = 0  # shards newly built into the index
    seconds: float = 0.0
    vectors_changed: bool = False  # feature_id differs from the previous snapshot's: retrain heads


def current_manifest(index_dir: str | Path) -> dict[str, Any] | None:
    """The live snapshot's manifest, or None when there is no index (cheap: nothing else is read)."""
    snap = snapshots(index_dir).current()
    return None if snap is None else json.loads((snap / "manifest.json").read_text())


def open_current(index_dir: Path) -> Index | None:
    return Index.open(index_dir, use_gpu=False) if snapshots(index_dir).current_name() else None


def index_ingest_id(index: Index) -> str:
    """The ingest id of an index's raw features (computed for indexes from before shards)."""
    m = index.manifest
    if "ingest_id" in m:
        return m["ingest_id"]
    return ingest_id(index.config, m["backbone"]["weights_id"], m.get("precision", "fp32"),
                     index.preprocess.to_dict())


def raw_batches(index: Index, batch_size: int = 8192) -> Iterator[dict[str, np.ndarray]] | None:
    """The index's raw part vectors (float32), ``batch_size`` rows at a time in row order: from
    the ingest shards, or the snapshot of an index written before shards existed. None when
    some cover's are kept nowhere (an old random-projection index; raw retention pruned them)."""
    legacy = load_raw(index)
    if legacy is not None:
        return ({p: np.asarray(x[a:a + batch_size], np.float32) for p, x in legacy.items()}
                for a in range(0, len(index), batch_size))
    wanted = index_ingest_id(index)
    shards = [s for s in list_shards(index.root) if s.ingest_id == wanted]
    if not shards:
        return None
    try:
        loc = _locate(shards, index.table.column("content_hash").tolist())
    except StylegenError:
        return None
    return (_gather(shards, loc.iloc[a:a + batch_size]) for a in range(0, len(loc), batch_size))


@dataclass
class RawFeatures:
    """The raw part vectors of an index's covers, read a few rows at a time from where they
    are kept (the ingest shards, found by content hash; or the snapshot of an index written
    before shards existed), never recomputed. Where each cover lies is read once, from the
    shards' hash columns only."""

    index: Index
    _shards: list[Shard] = field(default_factory=list, repr=False)
    _where: dict[str, tuple[int, int]] | None = field(default=None, repr=False)

    def rows(self, rows: Sequence[int]) -> dict[str, np.ndarray] | None:
        """float32 (len(rows), width) per part, or None when some row's features are kept nowhere
        (pruned by the index's raw retention, :mod:`stylegen.index.retention`)."""
        legacy = load_raw(self.index)
        if legacy is not None:
            return {p: np.asarray(x[list(rows)], np.float32) for p, x in legacy.items()}
        hashes = self.index.rows(list(rows))["content_hash"]
        for attempt in range(2):
            if self._where is None:
                wanted = index_ingest_id(self.index)
                self._shards = [s for s in list_shards(self.index.root) if s.ingest_id == wanted]
                self._where = _raw_where(self._shards)
            loc = [self._where.get(h) for h in hashes]
            if not loc or any(x is None for x in loc):
                return None
            try:
                return _gather(self._shards, pd.DataFrame(loc, columns=list(_LOC)))
            except FileNotFoundError:  # a build pruned the shards since they were read: read again
                if attempt:
                    raise
                self._where = None
        return None


def update_index(
    index_dir: str | Path, config: EmbedConfig | None = None, *, refit: bool = False,
    max_sample: int = DEFAULT_MAX_SAMPLE, model: Model | None = None, vectors_dtype: str | None = None,
    raw_retention: RawRetention | None = None,
) -> BuildResult:
    """Bring the snapshot up to date with the shards: append, or fit when new / ``refit``.

    The caller holds the index lock (:func:`stylegen.index.store.exclusive`). ``config`` gives the
    compression and part weights of a new index (default: those the shards were ingested with).
    ``model``: a new index takes the model bundle's frozen compressor instead of fitting one,
    so it shares the model's vector space (its ``feature_id``; checked). ``vectors_dtype``:
    how a new index keeps its vectors (``float32``, the default, or ``float16``); an existing
    index keeps its own, and asking another is refused. ``raw_retention``: which covers of a new
    index keep raw features (default :data:`DEFAULT_RAW_RETENTION`; an existing index keeps its
    own policy, another is refused); after a snapshot is written, the shards it built are pruned
    to it (:func:`stylegen.index.retention.prune_raw`).
    """
    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    existing = open_current(index_dir)
    shards = list_shards(index_dir)
    if existing is not None:
        wanted = index_ingest_id(existing)
        shards = [s for s in shards if s.ingest_id == wanted]
        shards = _adopt_legacy_raw(index_dir, existing, wanted, shards)
    elif shards:
        wanted = shards[-1].ingest_id
        shards = [s for s in shards if s.ingest_id == wanted]
    if existing is None and not shards:
        raise IndexNotFoundError(f"no stylegen index or ingested covers at {index_dir}")
    dtype = check_vectors_dtype(existing, vectors_dtype)
    retention = check_raw_retention(existing, raw_retention)
    built = set(existing.manifest.get("shards", [])) if existing is not None else set()
    known = set(existing.metadata["content_hash"]) if existing is not None else set()
    fresh = [i for i, s in enumerate(shards) if s.name not in built]
    new_rows = _new_rows(shards, fresh, known)
    if existing is not None and not refit:
        if not len(new_rows):
            return BuildResult(count=len(existing), seconds=time.perf_counter() - t0)
        _append(index_dir, existing, shards, new_rows, [shards[i].name for i in fresh])
        changed = False  # the frozen compression: old vectors and heads stay valid
    else:
        if config is None:
            config = existing.config if existing is not None else EmbedConfig.from_dict(shards[-1].info["config"])
        feature_id = _fit_and_write(index_dir, existing, config, shards, new_rows, max_sample, model, dtype,
                                    retention)
        changed = existing is None or feature_id != existing.feature_id
    prune_raw(index_dir)  # the snapshot is written: drop the raw features its policy does not keep
    count = len(existing or []) + len(new_rows)
    return BuildResult(added=len(new_rows), count=count, refit=existing is None or refit, shards=len(fresh),
                       seconds=time.perf_counter() - t0, vectors_changed=changed)


def check_vectors_dtype(existing: Index | None, asked: str | None) -> str:
    """The vector dtype a build writes: an existing index's own (another is refused), else
    ``asked`` (default float32)."""
    if asked is not None and asked not in VECTOR_DTYPES:
        raise StylegenError(f"vector dtype must be one of {', '.join(VECTOR_DTYPES)}, got {asked!r}")
    if existing is None:
        return asked or "float32"
    own = vector_dtype(existing.manifest)
    if asked is not None and asked != own:
        raise IndexMismatchError(f"index {existing.root} keeps its vectors as {own}, asked for {asked}; "
                                 "the dtype is chosen when an index is made")
    return own


def check_raw_retention(existing: Index | None, asked: RawRetention | None) -> RawRetention:
    """The raw retention a build records: an existing index's own (another is refused), else
    ``asked`` (default :data:`DEFAULT_RAW_RETENTION`)."""
    if existing is None:
        return asked or DEFAULT_RAW_RETENTION
    own = RawRetention.of(existing.manifest)
    if asked is not None and not asked.same_as(own):
        raise IndexMismatchError(f"index {existing.root} keeps raw features by policy {own.describe()}, asked "
                                 f"for {asked.describe()}; the policy is chosen when an index is made")
    return own


def rows_without_raw(index: Index) -> np.ndarray:
    """The rows of ``index`` whose raw features no shard keeps (pruned by its raw retention)."""
    if load_raw(index) is not None:
        return np.zeros(0, np.int64)
    wanted = index_ingest_id(index)
    where = _raw_where([s for s in list_shards(index.root) if s.ingest_id == wanted])
    hashes = index.table.column("content_hash")
    return np.flatnonzero([h not in where for h in hashes]).astype(np.int64)


def _raw_where(shards: list[Shard]) -> dict[str, tuple[int, int]]:
    """Content hash -> (shard number, raw row) of the first shard keeping its raw features."""
    where: dict[str, tuple[int, int]] = {}
    for i, shard in enumerate(shards):
        hashes = pq.read_table(shard.path / "metadata.parquet", columns=["content_hash"]).column(0).to_pylist()
        for h, r in zip(hashes, shard.raw_map().tolist(), strict=True):
            if r >= 0:
                where.setdefault(h, (i, r))
    return where


def _new_rows(shards: list[Shard], fresh: list[int], known: set[str]) -> pd.DataFrame:
    """Metadata of the fresh shards' rows not yet in the index, one per content hash, in
    ingest order (run, then position in the run's source), with their raw-feature location."""
    frames = []
    for i in fresh:
        m = shards[i].metadata()
        m["_shard"], m["_row"] = i, shards[i].raw_map()  # a shard is pruned only once built: all rows
        if "_run" not in m.columns:
            m["_run"], m["_order"] = shards[i].info.get("created_ns", 0), np.arange(len(m))
        frames.append(m)
    if not frames:
        return pd.DataFrame(columns=["content_hash", *_LOC])
    rows = pd.concat(frames, ignore_index=True)
    rows = rows.sort_values(list(RUN_COLUMNS), kind="stable")
    rows = rows[~rows["content_hash"].isin(known) & ~rows["content_hash"].duplicated()]
    if (rows["_row"] < 0).any():
        raise StylegenError("a shard not yet built has lost raw features; remove it and embed again")
    return rows.reset_index(drop=True)


def _gather(shards: list[Shard], loc: pd.DataFrame) -> dict[str, np.ndarray]:
    """Raw part vectors (float32) of the rows at ``loc`` (columns _shard, _row), in order."""
    out: dict[str, np.ndarray] = {}
    shard_of, row_of = loc["_shard"].to_numpy(np.int64), loc["_row"].to_numpy(np.int64)
    for s in np.unique(shard_of):
        at = np.flatnonzero(shard_of == s)
        for part, x in shards[int(s)].raw().items():
            if part not in out:
                out[part] = np.empty((len(loc), x.shape[1]), np.float32)
            out[part][at] = x[row_of[at]]
    return out


def _transform(compressor: Compressor, weights: dict[str, float], shards: list[Shard],
               loc: pd.DataFrame) -> np.ndarray:
    """Compressed, combined vectors of the rows at ``loc``, in batches (raw stays on disk)."""
    out = [combine(compressor.transform(_gather(shards, loc.iloc[i : i + TRANSFORM_BATCH])), weights)[0]
           for i in range(0, len(loc), TRANSFORM_BATCH)]
    dim = sum(compressor.dims.values())
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def _public(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.drop(columns=[c for c in (*_LOC, *RUN_COLUMNS) if c in rows.columns]).reset_index(drop=True)


def _append(index_dir: Path, existing: Index, shards: list[Shard], new_rows: pd.DataFrame,
            fresh_names: list[str]) -> None:
    """Transform the new rows with the frozen compressor; old rows are copied unchanged."""
    manifest = dict(existing.manifest)
    # rounded as the index keeps them (float16 indexes): FAISS gets exactly what vectors.npy holds
    new = stored_vectors(_transform(existing.compressor, existing.config.features.weights, shards, new_rows),
                         manifest)
    vectors = np.concatenate([np.asarray(existing.vectors), new])  # old rows copied in their own dtype
    key = choose_index_key(*vectors.shape)
    index = None
    if key == manifest["index_key"]:  # extend the live index rather than rebuild it
        index = faiss.read_index(str(existing.snapshot / "index.faiss"))
        new_ids = np.arange(len(existing.vectors), len(vectors), dtype=np.int64)
        if isinstance(index, faiss.IndexIDMap):  # tuned HNSW keeps row ids explicitly
            index.add_with_ids(np.ascontiguousarray(new, dtype=np.float32), new_ids)
        else:
            index.add(np.ascontiguousarray(new, dtype=np.float32))
    manifest.update(
        count=int(vectors.shape[0]), index_key=key, ingest_id=index_ingest_id(existing),
        shards=[*manifest.get("shards", []), *fresh_names], updated=_now(),
    )
    metadata = pd.concat([existing.metadata, _public(new_rows)], ignore_index=True)
    write_snapshot(index_dir, manifest, vectors, metadata, existing.compressor, faiss_index=index)


def _fit_and_write(index_dir: Path, existing: Index | None, config: EmbedConfig, shards: list[Shard],
                   new_rows: pd.DataFrame, max_sample: int, model: Model | None = None,
                   dtype: str = "float32", retention: RawRetention = DEFAULT_RAW_RETENTION) -> str:
    """Fit the compression on a seeded sample of every cover (or take ``model``'s), transform
    all, write a snapshot; returns its ``feature_id``."""
    if existing is not None:
        old_loc = _locate(shards, existing.metadata["content_hash"].tolist())
        loc = pd.concat([old_loc, new_rows[list(_LOC)]], ignore_index=True)
        metadata = pd.concat([existing.metadata, _public(new_rows)], ignore_index=True)
    else:
        loc, metadata = new_rows[list(_LOC)], _public(new_rows)
    if not len(loc):
        raise StylegenError(f"nothing to build in {index_dir}: no covers were ingested")
    if model is not None:
        compressor, sample = model.index.compressor, np.arange(0)
    else:
        rng = np.random.default_rng(config.compression.seed)
        sample = np.sort(rng.choice(len(loc), size=min(max_sample, len(loc)), replace=False))
        # the gathered sample is a fresh array used only here: PCA centres it in place
        compressor = Compressor.fit(_gather(shards, loc.iloc[sample]), config.compression, overwrite=True)
    vectors = _transform(compressor, config.features.weights, shards, loc)
    info = shards[-1].info
    slices, start = {}, 0
    for part, d in compressor.dims.items():
        slices[part], start = (start, start + d), start + d
    fit = {"rows": len(loc), "sample": len(sample), "max_sample": max_sample, "seed": config.compression.seed}
    manifest = make_manifest(config, info, compressor, vectors, slices, fit, [s.name for s in shards],
                             retention.to_dict())
    if dtype != "float32":  # left out when float32, so indexes made before the setting read alike
        manifest["vector_dtype"] = dtype
    if model is not None:
        if manifest["feature_id"] != model.feature_id:
            raise IndexMismatchError(f"these covers were embedded otherwise than model {model.name} expects "
                                     "(other backbone weights or settings installed?)")
        manifest["model"] = model_entry(model)
        manifest["compression_fit"] = {"model": model.name}
    write_snapshot(index_dir, manifest, vectors, metadata, compressor)
    return manifest["feature_id"]


def _locate(shards: list[Shard], hashes: list[str]) -> pd.DataFrame:
    """Where each hash's raw features are (first shard keeping them)."""
    where = _raw_where(shards)
    missing = [h for h in hashes if h not in where]
    if missing:
        raise StylegenError(f"cannot refit: {len(missing)} covers of the index have no raw features (pruned by "
                            "its raw retention, or an index built with random projection before shards "
                            "existed); `stylegen index DIR --refit` re-reads their images")
    return pd.DataFrame([where[h] for h in hashes], columns=list(_LOC))


def _adopt_legacy_raw(index_dir: Path, existing: Index, wanted: str, shards: list[Shard]) -> list[Shard]:
    """An index from before shards keeps raw features in its snapshot: move them into a shard
    once, so appends and refits treat every cover alike."""
    if "shards" in existing.manifest or any(s.info.get("legacy") for s in shards):
        return shards
    raw = load_raw(existing)
    if raw is None:
        return shards
    m = existing.manifest
    info = {"ingest_id": wanted, "config": m["config"], "backbone": m["backbone"],
            "preprocess": existing.preprocess.to_dict(), "precision": m.get("precision", "fp32"), "legacy": True}
    meta = existing.metadata.copy()
    meta["_run"], meta["_order"] = 0, np.arange(len(meta))
    shard = write_shard(index_dir, raw, meta, info)
    return [shard, *shards]


def config_id(config: EmbedConfig, weights_id: str) -> str:
    blob = json.dumps({"config": config.to_dict(), "weights": weights_id}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def make_manifest(
    config: EmbedConfig, info: dict[str, Any], compressor: Compressor, vectors: np.ndarray,
    slices: dict[str, tuple[int, int]], fit: dict[str, int], shard_names: list[str],
    raw_retention: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a freshly fitted snapshot; ``info`` is a shard's description of how
    its raw features were made (:func:`stylegen.index.shards.describe`)."""
    from stylegen.featurize.runtime import RUNTIME_PACKAGES
    from stylegen.util.versions import STYLEGEN_VERSION, package_version

    runtime_package = RUNTIME_PACKAGES.get(info.get("runtime", "torch"))
    recorded = ["torch", "scikit-learn", *([runtime_package] if runtime_package else [])]
    buf = io.BytesIO()
    np.savez(buf, *[a for p in compressor.parts.values() for a in (p.mean, p.components, p.scale)])
    weights_id = info["backbone"]["weights_id"]
    feature_id = hashlib.sha1(
        config_id(config, weights_id).encode() + hashlib.sha1(buf.getvalue()).digest()
    ).hexdigest()[:16]
    return {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "backbone": info["backbone"],
        "preprocess": Preprocess.from_dict(info["preprocess"]).to_dict(),
        "parts": list(slices),
        "slices": {p: list(s) for p, s in slices.items()},
        "dims": compressor.dims,
        "dim": int(vectors.shape[1]),
        "count": int(vectors.shape[0]),
        "index_key": choose_index_key(*vectors.shape),
        "metric": "inner_product",
        "precision": info["precision"],
        "runtime": info.get("runtime", "torch"),
        "feature_id": feature_id,
        "ingest_id": info["ingest_id"],
        "shards": shard_names,
        "compression_fit": fit,
        "raw_retention": raw_retention,  # None: every cover's (stylegen.index.retention)
        "created": _now(),
        # read from the installed metadata: recording a version must not import torch
        "versions": {"stylegen": STYLEGEN_VERSION, "faiss": faiss.__version__, "numpy": np.__version__,
                     "pandas": pd.__version__, **{p: package_version(p) for p in recorded}},
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
