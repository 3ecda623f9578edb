"""Approximate nearest-neighbour index: chosen by size and memory, built from shards, tuned, merged.

The choice is a pure function of the vector count, the dimension and a memory budget, in the
spirit of autofaiss (``get_optimal_index_keys_v2``):

- fewer than ``FLAT_LIMIT`` vectors and the raw vectors fit: ``Flat`` (exact, nothing to tune);
- fewer than ``HNSW_LIMIT`` and the graph fits: ``HNSW32`` (tune ``efSearch``);
- otherwise ``OPQ{m}_{d},IVF{k}_HNSW32,PQ{m}`` with the largest code ``m`` that fits the budget
  (tune ``nprobe``; the coarse HNSW's ``efSearch`` follows it).

Building trains on a sample, adds in batches read from (memory-mapped) shard arrays, then tunes
the search parameter to a recall@k target against exact search on held-out rows. The tuned
parameters go into the manifest (``manifest_entry``) and are applied again on open
(``read_index``). IVF indexes open memory-mapped. Shards indexed on several machines from one
trained index are merged with ``faiss.contrib.ondisk.merge_ondisk`` (``merge_shards``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from stylegen.errors import StylegenError

FLAT_LIMIT = 100_000  # below this many vectors exact search is fast enough (and best)
HNSW_LIMIT = 2_000_000  # above it an HNSW graph takes too long to build on a few cores
DEFAULT_MAX_MEMORY = 16 * 2**30  # autofaiss's default budget
HNSW_M = 32
PQ_CODES = (64, 32, 16, 8)  # bytes per vector, the largest that fits is chosen
MIN_SUBVECTOR = 8  # dims per PQ sub-quantizer: smaller ones train 10-40x slower (docs/scale.md)
USE_OPQ = False  # OPQ training costs minutes here and was not measured to pay off (docs/scale.md)
MIN_PQ_VECTORS = 1_000  # PQ needs a few hundred points per sub-quantizer centroid set
TRAIN_PER_LIST = 40  # k-means points per IVF list (faiss warns below 39)
MIN_TRAIN = 65_536  # PQ: 256 centroids x 256 points
KMEANS_ITER = 10
# IVF training cost cap: k-means costs 2·iter·(TRAIN_PER_LIST·k)·k·d flop, quadratic in the
# list count k. 2e13 flop is ~3-4 min on 2 CPU cores (faiss k-means ran 100 GFLOP/s here);
# at 10M x 512 it caps 4·sqrt(n) = 16,384 lists (1.1e14 flop, ~18 min) to 4,096 (docs/scale.md)
KMEANS_FLOP_BUDGET = 2e13
EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE_GRID = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
ID_BYTES = 8  # an IVF list stores one int64 id per vector


@dataclass(frozen=True)
class IndexPlan:
    """What to build: the factory string and what it costs."""

    key: str  # faiss.index_factory string
    kind: str  # "flat" | "hnsw" | "ivfpq"
    train_size: int  # vectors to train on (0: nothing to train)
    tune: str  # search parameter to tune ("" | "efSearch" | "nprobe")
    memory_bytes: int  # estimated RAM of the whole index when loaded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuildResult:
    index: faiss.Index
    plan: IndexPlan
    params: dict[str, int]  # tuned search parameters (empty for Flat)
    recall: float  # recall@k of the tuned index against exact search on held-out rows
    k: int
    timings: dict[str, float] = field(default_factory=dict)

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest stores next to ``index_key`` (and ``read_index`` applies)."""
        return {"index_key": self.plan.key, "search_params": dict(self.params),
                "search_recall": {f"recall@{self.k}": round(self.recall, 4)},
                "index_plan": self.plan.to_dict()}


# ---------------------------------------------------------------- choice (pure)

def nlist_for(n: int, dim: int = 512, flop_budget: float = KMEANS_FLOP_BUDGET) -> int:
    """IVF lists: the power of two nearest 4·sqrt(n), with >= TRAIN_PER_LIST points each and a
    k-means training cost within ``flop_budget`` (a GPU, or more cores, affords a larger one)."""
    k = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    while k > 1 and (k * TRAIN_PER_LIST > n or kmeans_flops(k, dim) > flop_budget):
        k //= 2
    return int(min(k, 65_536))


def kmeans_flops(nlist: int, dim: int) -> float:
    """Multiply-adds x 2 of training ``nlist`` IVF lists on TRAIN_PER_LIST points each."""
    return 2.0 * KMEANS_ITER * TRAIN_PER_LIST * nlist * nlist * dim


def flat_memory(n: int, dim: int) -> int:
    return 4 * n * dim


def hnsw_memory(n: int, dim: int, m: int = HNSW_M) -> int:
    # vectors + level-0 links (2m int32) + upper levels (1/m of the nodes, m links) + offsets
    return int(n * (4 * dim + 8 * m + 16))


def ivfpq_memory(n: int, dim: int, m: int, nlist: int, opq: bool = USE_OPQ) -> int:
    codes = n * (m + ID_BYTES)
    coarse = hnsw_memory(nlist, dim)  # centroids held by the HNSW quantizer
    rotation = 4 * dim * dim if opq else 0
    tables = 4 * dim * 256  # PQ centroids
    return int(codes + coarse + rotation + tables + 16 * nlist)


def plan_index(n: int, dim: int, max_memory_bytes: int | None = None, kind: str | None = None,
               train_flop_budget: float = KMEANS_FLOP_BUDGET) -> IndexPlan:
    """The index for ``n`` vectors of ``dim`` within ``max_memory_bytes`` (default 16 GiB).

    ``kind`` forces a family ("flat", "hnsw", "ivfpq"), e.g. for benchmarks.
    ``train_flop_budget`` caps the IVF k-means (:func:`nlist_for`): the default suits a few CPU
    cores; a GPU node building 10^8 vectors affords ~5e14 (autofaiss's 32,768 lists)."""
    budget = DEFAULT_MAX_MEMORY if max_memory_bytes is None else int(max_memory_bytes)
    if kind not in (None, "flat", "hnsw", "ivfpq"):
        raise StylegenError(f"unknown index kind {kind!r} (flat, hnsw, ivfpq)")
    if kind == "flat" or (kind is None and n < FLAT_LIMIT and flat_memory(n, dim) <= budget):
        return IndexPlan("Flat", "flat", 0, "", flat_memory(n, dim))
    if kind == "hnsw" or (kind is None and n < HNSW_LIMIT and hnsw_memory(n, dim) <= budget):
        return IndexPlan(f"HNSW{HNSW_M}", "hnsw", 0, "efSearch", hnsw_memory(n, dim))
    if n < MIN_PQ_VECTORS:
        raise StylegenError(f"{n} vectors of {dim} floats need {flat_memory(n, dim)} bytes, "
                            f"more than the {budget}-byte index memory budget")
    nlist = nlist_for(n, dim, train_flop_budget)
    codes = [m for m in PQ_CODES if dim % m == 0 and m * MIN_SUBVECTOR <= dim] or [1]
    fits = [m for m in codes if ivfpq_memory(n, dim, m, nlist) <= budget]
    if not fits and kind is None:
        need = ivfpq_memory(n, dim, codes[-1], nlist) if codes else flat_memory(n, dim)
        raise StylegenError(f"an index of {n} vectors needs at least {need / 2**30:.1f} GiB; "
                            f"raise --max-index-memory (now {budget / 2**30:.1f} GiB)")
    m = (fits or codes)[0]
    coarse = f"IVF{nlist}_HNSW{HNSW_M}" if nlist >= 1024 else f"IVF{nlist}"
    # "np": no polysemous training (minutes per sub-quantizer, useless without Hamming search)
    key = f"OPQ{m}_{dim},{coarse},PQ{m}np" if USE_OPQ else f"{coarse},PQ{m}np"
    train = min(n, max(MIN_TRAIN, TRAIN_PER_LIST * nlist))
    return IndexPlan(key, "ivfpq", train, "nprobe", ivfpq_memory(n, dim, m, nlist))


def kind_of(key: str) -> str:
    if "IVF" in key:
        return "ivfpq"
    if "HNSW" in key:
        return "hnsw"
    return "flat"


# ---------------------------------------------------------------- shards

def as_shards(vectors: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """One array, or a list of arrays (e.g. ``np.load(f, mmap_mode="r")`` per shard)."""
    shards = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
    if not shards or any(s.ndim != 2 or s.shape[1] != shards[0].shape[1] for s in shards):
        raise StylegenError("vectors must be one or more 2-d arrays of the same width")
    return shards


def release_pages(arr: np.ndarray, start: int = 0, stop: int | None = None) -> None:
    """Drop rows ``start:stop`` of a memory-mapped array from this process's resident memory
    (``madvise(MADV_DONTNEED)``; the file's pages stay in the OS cache and are read again on
    the next access). A build that streams a file larger than RAM through a memory map would
    otherwise hold every page it read: 10M float16 rows are 10 GB. No-op for other arrays."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or mm.closed or not arr.flags.c_contiguous or not len(arr):
        return
    import mmap

    stop = len(arr) if stop is None else min(stop, len(arr))
    origin = np.frombuffer(mm, np.uint8).ctypes.data
    row = arr.strides[0]
    lo = arr.ctypes.data - origin + start * row
    hi = arr.ctypes.data - origin + stop * row
    page = mmap.PAGESIZE
    lo, hi = -(-lo // page) * page, (hi // page) * page  # whole pages inside the rows only
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def iter_batches(shards: Sequence[np.ndarray], batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 batch) over all shards in order, reading ``batch_size`` rows at a
    time; rows read from a memory map leave resident memory once copied (:func:`release_pages`)."""
    start = 0
    for s in shards:
        for a in range(0, len(s), batch_size):
            batch = np.ascontiguousarray(s[a:a + batch_size], dtype=np.float32)
            release_pages(s, a, a + batch_size)
            yield start + a, batch
        start += len(s)


def read_rows(arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``arr[rows]`` for sorted ``rows``; from a memory-mapped .npy file they are read with
    ``os.pread``, not through the map: random rows touched through a map stay in this
    process's resident memory together with whatever the kernel maps around them (20,000
    random rows of a 10 GB float16 file left 7.5 GB resident here)."""
    import mmap
    import os

    if not isinstance(arr, np.memmap) or not isinstance(arr.base, mmap.mmap) or not arr.flags.c_contiguous:
        return np.asarray(arr[rows])
    width = arr.strides[0]
    out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(arr.filename, os.O_RDONLY)
    try:  # straight into the output (2 µs a row here; pread's bytes objects cost 3x that)
        for j, r in enumerate(rows):
            os.preadv(fd, [view[j * width:(j + 1) * width]], arr.offset + int(r) * width)
    finally:
        os.close(fd)
    return out


def take_rows(shards: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows by global number (any order), reading only those rows of each shard (:func:`read_rows`)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), shards[0].shape[1]), dtype=np.float32)
    start = 0
    for s in shards:
        mask = (rows >= start) & (rows < start + len(s))
        if mask.any():
            local = rows[mask] - start
            order = np.argsort(local)
            out[np.flatnonzero(mask)[order]] = read_rows(s, np.sort(local))
        start += len(s)
    return out


def exact_knn(shards: Sequence[np.ndarray], queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
              batch_size: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` (similarities, row numbers) over all shards, batch by batch,
    never returning the rows in ``exclude``."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_d = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    skip = np.asarray(exclude if exclude is not None else [], dtype=np.int64)
    for start, batch in iter_batches(shards, batch_size):
        d = q @ batch.T
        inside = skip[(skip >= start) & (skip < start + len(batch))] - start
        d[:, inside] = -np.inf
        kk = min(k, d.shape[1])
        top = np.argpartition(-d, kk - 1, axis=1)[:, :kk]
        cand_d = np.concatenate([best_d, np.take_along_axis(d, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-cand_d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(cand_d, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_d, best_i


# ---------------------------------------------------------------- build

def train_index(sample: np.ndarray, key: str, dim: int, use_gpu: bool | None = None) -> faiss.Index:
    """An empty index of ``key``, trained on ``sample`` (IVF k-means on the GPU when present)."""
    index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITER
        if _want_gpu(use_gpu):
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    if ivf is not None:
        ivf.clustering_index = None
    return index


def add_vectors(index: faiss.Index, shards: Sequence[np.ndarray], batch_size: int = 65_536,
                first_id: int | None = None) -> faiss.Index:
    """Add all rows batch by batch; with ``first_id`` the ids are ``first_id + row`` (IVF only)."""
    for start, batch in iter_batches(shards, batch_size):
        if first_id is None:
            index.add(batch)
        else:
            index.add_with_ids(batch, np.arange(first_id + start, first_id + start + len(batch), dtype=np.int64))
    return index


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the exact top-``k`` that the index returned in its top-``k``."""
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)]))


def params_string(params: dict[str, int]) -> str:
    return ",".join(f"{name}={value}" for name, value in params.items())


def apply_params(index: faiss.Index, params: dict[str, int] | None) -> faiss.Index:
    """Set stored search parameters (``nprobe``, ``efSearch``, ``quantizer_efSearch``; the
    re-rank depth ``refine`` is ours, read by :func:`refine_factor`)."""
    params = {k: v for k, v in (params or {}).items() if k != REFINE_PARAM}
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params_string(params))
    return index


def candidate_params(key: str) -> list[dict[str, int]]:
    """Search settings from cheapest to most thorough."""
    kind = kind_of(key)
    if kind == "hnsw":
        return [{"efSearch": ef} for ef in EF_SEARCH_GRID]
    if kind == "ivfpq":
        nlist = int(re.match(r"\d+", key.split("IVF")[1]).group())
        probes = [p for p in NPROBE_GRID if p <= nlist] or [nlist]
        if "_HNSW" in key:
            return [{"nprobe": p, "quantizer_efSearch": max(2 * p, 16)} for p in probes]
        return [{"nprobe": p} for p in probes]
    return []


def tune(index: faiss.Index, key: str, queries: np.ndarray, truth: np.ndarray, k: int = 10,
         target: float = 0.95, vectors: np.ndarray | list[np.ndarray] | None = None) -> tuple[dict[str, int], float]:
    """The fastest search setting whose recall@k reaches ``target``; when none does, the
    cheapest within 0.5% of the best recall seen. Returns (params, recall) and leaves them set.
    With ``vectors``, recall is measured the way ``Index.search`` answers: PQ candidates
    re-ranked exactly (:func:`refine_search`), and each re-rank depth is tried: more lists
    (``nprobe``) until they stop helping or reach the target, then deeper. Of the settings
    that reach the target, the one whose tuning queries ran fastest wins (at 10M vectors a
    shallow re-rank with more lists can beat a deep one with few, or the other way round)."""
    tried: list[tuple[dict[str, int], float, float]] = []
    depths = REFINE_FACTORS if vectors is not None and kind_of(key) == "ivfpq" else (1,)
    for factor in depths:
        last = -1.0
        for params in candidate_params(key):
            full = {**params, REFINE_PARAM: factor} if factor > 1 else params
            apply_params(index, params)
            t = time.perf_counter()
            r = recall_at(refine_search(index, queries, k, vectors, factor)[1], truth, k)
            tried.append((full, r, time.perf_counter() - t))
            if r >= target:
                break  # more lists at this depth only cost more
            if len(depths) > 1 and r < last + 0.002:
                break  # a plateau: more lists do not help at this depth, more candidates may
            last = r
    if not tried:
        return {}, recall_at(index.search(queries, k)[1], truth, k)
    reached = [(p, r, s) for p, r, s in tried if r >= target]
    if reached:
        params, r, _ = min(reached, key=lambda x: x[2])
    else:
        best = max(r for _, r, _ in tried)
        params, r, _ = next(x for x in tried if x[1] >= best - 0.005)
    apply_params(index, params)
    return params, r


def build(vectors: np.ndarray | Sequence[np.ndarray], key: str | None = None, *,
          max_memory_bytes: int | None = None, target_recall: float = 0.95, k: int = 10,
          n_queries: int = 500, batch_size: int = 65_536, seed: int = 0,
          use_gpu: bool | None = None) -> BuildResult:
    """Choose (unless ``key`` is given), train on a sample, add in batches, tune on held-out rows.

    ``vectors``: normalised float32/float16 rows, one array or a list of (memory-mapped) shards.
    Tuning queries: ``n_queries`` random rows (at most a tenth), kept out of the training sample
    and added to the index only after tuning. Row ``i`` of the input is id ``i`` of the index."""
    shards = as_shards(vectors)
    n, dim = sum(len(s) for s in shards), shards[0].shape[1]
    plan = plan_index(n, dim, max_memory_bytes) if key is None else _plan_for_key(key, n, dim)
    rng = np.random.default_rng(seed)
    timings: dict[str, float] = {}
    n_held = min(n_queries, n // 10) if plan.tune else 0
    held = np.sort(rng.choice(n, size=n_held, replace=False))
    t = time.perf_counter()
    sample = np.zeros((0, dim), np.float32)
    if plan.train_size:
        pool = np.setdiff1d(np.arange(n), held)
        sample = take_rows(shards, np.sort(rng.choice(pool, size=min(plan.train_size, len(pool)), replace=False)))
    index = train_index(sample, plan.key, dim, use_gpu)
    del sample
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if not n_held:
        add_vectors(index, shards, batch_size)
        timings["add_s"] = time.perf_counter() - t
        return BuildResult(index, plan, {}, 1.0, k, timings)
    # the tuning queries are held out of the index until tuned: fresh queries, not self-matches
    if plan.kind == "hnsw":
        index = faiss.IndexIDMap(index)  # HNSW numbers rows in add order; the map keeps row ids
    is_held = np.zeros(n, bool)
    is_held[held] = True
    for start, batch in iter_batches(shards, batch_size):
        keep = ~is_held[start:start + len(batch)]
        index.add_with_ids(batch[keep], np.flatnonzero(keep).astype(np.int64) + start)
    timings["add_s"] = time.perf_counter() - t
    t = time.perf_counter()
    queries = take_rows(shards, held)
    _, truth = exact_knn(shards, queries, k, exclude=held)
    params, recall = tune(index, plan.key, queries, truth, k, target_recall, vectors=shards)
    timings["tune_s"] = time.perf_counter() - t
    t = time.perf_counter()
    index.add_with_ids(queries, held)
    timings["add_s"] += time.perf_counter() - t
    return BuildResult(index, plan, params, recall, k, timings)


def _plan_for_key(key: str, n: int, dim: int) -> IndexPlan:
    kind = kind_of(key)
    if kind == "flat":
        return IndexPlan(key, kind, 0, "", flat_memory(n, dim))
    if kind == "hnsw":
        return IndexPlan(key, kind, 0, "efSearch", hnsw_memory(n, dim))
    nlist = int(re.match(r"\d+", key.split("IVF")[1]).group())
    m = int(re.match(r"\d+", key.rsplit("PQ", 1)[1]).group()) if ",PQ" in key else dim * 4
    train = min(n, max(MIN_TRAIN, TRAIN_PER_LIST * nlist))
    return IndexPlan(key, kind, train, "nprobe", ivfpq_memory(n, dim, m, nlist, key.startswith("OPQ")))


def write_index(result: BuildResult, path: str | Path) -> dict[str, Any]:
    """Write the built index; returns the manifest entry (key, tuned params, recall, plan)."""
    faiss.write_index(result.index, str(path))
    return result.manifest_entry()


# ---------------------------------------------------------------- open

def read_index(path: str | Path, key: str = "", params: dict[str, int] | None = None,
               mmap: bool = True) -> faiss.Index:
    """Open an index file; IVF memory-mapped (its lists stay on disk, the OS caches what is
    read), on-disk lists looked up next to the file; stored search parameters applied."""
    flags = 0
    if Path(path).with_suffix(".ivfdata").is_file():  # merged: lists already on disk, next to it
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR  # (adding IO_FLAG_MMAP here crashes faiss 1.15)
    elif mmap and kind_of(key) == "ivfpq":
        flags = faiss.IO_FLAG_MMAP
    return apply_params(faiss.read_index(str(path), flags), params)


def to_gpu(index: faiss.Index, key: str, use_gpu: bool | None = None) -> faiss.Index:
    """Copy an exact index to the GPUs when present (graph and on-disk IVF indexes stay)."""
    if _want_gpu(use_gpu) and kind_of(key) == "flat":
        return faiss.index_cpu_to_all_gpus(index)
    return index


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _want_gpu(use_gpu: bool | None) -> bool:
    has = _gpu_count() > 0
    return has if use_gpu is None else (use_gpu and has)


# ---------------------------------------------------------------- shards built apart

def add_shard(trained_path: str | Path, vectors: np.ndarray | Sequence[np.ndarray], first_id: int,
              out_path: str | Path, batch_size: int = 65_536) -> Path:
    """On one machine: add its vectors (global ids from ``first_id``) to a copy of the trained
    (empty) IVF index and write the shard index."""
    index = faiss.read_index(str(trained_path))
    if faiss.try_extract_index_ivf(index) is None:
        raise StylegenError("only IVF indexes can be built in shards and merged")
    add_vectors(index, as_shards(vectors), batch_size, first_id=first_id)
    faiss.write_index(index, str(out_path))
    return Path(out_path)


def merge_shards(trained_path: str | Path, shard_paths: Sequence[str | Path], out_dir: str | Path,
                 name: str = "index") -> Path:
    """Merge shard indexes into ``out_dir/{name}.faiss`` whose lists live in
    ``out_dir/{name}.ivfdata`` (``merge_ondisk``); open it with ``read_index``."""
    from faiss.contrib.ondisk import merge_ondisk

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = faiss.read_index(str(trained_path))
    if faiss.try_extract_index_ivf(index) is None or index.ntotal:
        raise StylegenError("merging needs the trained, empty IVF index the shards were built from")
    merge_ondisk(index, [str(p) for p in shard_paths], str(out_dir / f"{name}.ivfdata"))
    out = out_dir / f"{name}.faiss"
    faiss.write_index(index, str(out))
    return out


# ---------------------------------------------------------------- exact re-ranking

REFINE_FACTOR = 10  # compressed (PQ) indexes fetch this many times k candidates, then re-rank
# the depths the tuner tries, cheapest first: at 10M realistic vectors the true top-10 was in
# the PQ top-100 for 0.71 of them, top-300 0.91, top-1000 0.99 (docs/scale.md)
REFINE_FACTORS = (10, 30, 50, 100)
REFINE_PARAM = "refine"  # the tuned depth, stored with the search parameters


def refine_factor(key: str, params: dict[str, int] | None = None) -> int:
    """Candidates per result a compressed index fetches before exact re-ranking (1: none):
    the tuned ``refine`` of its search parameters (indexes tuned before it: REFINE_FACTOR)."""
    if kind_of(key) != "ivfpq":
        return 1
    return int((params or {}).get(REFINE_PARAM, REFINE_FACTOR))


def refine_search(index: faiss.Index, queries: np.ndarray, k: int, vectors: np.ndarray,
                  factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Search ``k * factor`` candidates with ``index``, then re-rank them by exact inner
    product against ``vectors`` (the float vectors, typically memory-mapped ``vectors.npy``:
    only the candidates' rows are read). PQ codes order near neighbours poorly; the exact
    re-rank restores recall at the cost of reading ``k * factor`` rows per query."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if factor <= 1:
        return index.search(queries, k)
    _, cand = index.search(queries, k * factor)
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for i, row in enumerate(cand):
        row = row[row >= 0]
        if not len(row):
            continue
        order = np.argsort(row)  # sorted reads
        rows = row[order]
        picked = take_rows(vectors if isinstance(vectors, list) else [vectors], rows)
        exact = picked @ queries[i]
        best = np.argsort(-exact, kind="stable")[:k]
        sims[i, : len(best)], ids[i, : len(best)] = exact[best], row[order][best]
    return sims, ids
