"""The batch runner: SOURCE -> reader (decode workers) -> featurizer -> writer -> index.

Resumable and incremental: files are identified by the hash of their bytes, images
already in the index are skipped, and raw features are checkpointed to
``DIR/pending`` so an interrupted run picks up where it stopped. The live index is
only replaced, atomically, when a run completes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from stylegen import backbones, images
from stylegen.compress import Compressor, combine
from stylegen.config import EmbedConfig, Preprocess
from stylegen.errors import IndexMismatchError, StylegenError
from stylegen.features import Featurizer
from stylegen.runtime import GraphFeaturizer
from stylegen.runtime import load_featurizer as load_runtime_featurizer
from stylegen.store import FORMAT_VERSION, Index, choose_index_key, load_raw, write_snapshot

PENDING = "pending"


@dataclass
class EmbedReport:
    """What one run did; also written to ``DIR/embed_report.json`` (+ ``bad_files.csv``)."""

    total: int = 0
    added: int = 0
    already_indexed: int = 0
    resumed: int = 0
    duplicates: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    count: int = 0

    @property
    def images_per_second(self) -> float:
        return self.added / self.embed_seconds if self.embed_seconds else 0.0

    def summary(self) -> str:
        return (
            f"{self.added} added, {self.already_indexed} already indexed, {len(self.bad)} skipped"
            f" (bad), {self.duplicates} duplicates; index holds {self.count} covers"
            f" [{self.seconds:.1f} s, {self.images_per_second:.1f} img/s]"
        )


def load_featurizer(
    config: EmbedConfig, device: str = "auto", precision: str = "auto", channels_last: bool = True,
    runtime: str = "auto",
) -> Featurizer | GraphFeaturizer:
    """Build the feature extractor that ``config`` describes (see :func:`runtime.load_featurizer`)."""
    return load_runtime_featurizer(config, device, precision, channels_last, runtime)


class _Reader(Dataset):
    def __init__(self, rows: list[int], paths: list[str], spec: Preprocess, max_pixels: int) -> None:
        self.rows, self.paths, self.spec, self.max_pixels = rows, paths, spec, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> images.Decoded:
        return images.decode(self.rows[i], self.paths[i], self.spec, self.max_pixels)


def _collate(items: list[images.Decoded]) -> tuple[list[int], np.ndarray | None, list[images.Decoded]]:
    good = [d for d in items if d.pixels is not None]
    bad = [d for d in items if d.pixels is None]
    pixels = np.stack([d.pixels for d in good]) if good else None
    return [d.row for d in good], pixels, bad


def read_batches(
    rows: list[int], paths: list[str], spec: Preprocess, batch_size: int, workers: int, max_pixels: int
) -> Iterator[tuple[list[int], np.ndarray | None, list[images.Decoded]]]:
    """Decode images in ``workers`` processes, yielding (rows, uint8 batch, failures)."""
    loader = DataLoader(
        _Reader(rows, paths, spec, max_pixels), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, prefetch_factor=4 if workers else None,
    )
    yield from loader


def _config_id(config: EmbedConfig, weights_id: str) -> str:
    blob = json.dumps({"config": config.to_dict(), "weights": weights_id}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _save_chunk(pending: Path, hashes: list[str], raw: dict[str, list[np.ndarray]]) -> None:
    n = len(list(pending.glob("chunk-*.npz")))
    arrays = {f"raw_{p}": np.concatenate(v).astype(np.float16) for p, v in raw.items()}
    buf = io.BytesIO()
    np.savez(buf, hashes=np.array(hashes), **arrays)
    tmp = pending / f".chunk-{n:06d}.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.rename(pending / f"chunk-{n:06d}.npz")


def _load_pending(pending: Path, config_id: str) -> tuple[list[str], dict[str, list[np.ndarray]]]:
    marker = pending / "config_id"
    if not marker.is_file() or marker.read_text().strip() != config_id:
        shutil.rmtree(pending, ignore_errors=True)
        return [], {}
    hashes: list[str] = []
    raw: dict[str, list[np.ndarray]] = {}
    for f in sorted(pending.glob("chunk-*.npz")):
        try:
            with np.load(f, allow_pickle=False) as z:
                hashes += [str(h) for h in z["hashes"]]
                for key in z.files:
                    if key.startswith("raw_"):
                        raw.setdefault(key[4:], []).append(z[key].astype(np.float32))
        except (OSError, ValueError, KeyError):
            f.unlink(missing_ok=True)  # a chunk cut short by a crash: re-embed those images
    return hashes, raw


def _open_existing(index_dir: Path, config: EmbedConfig | None) -> tuple[Index | None, EmbedConfig]:
    if not (index_dir / "CURRENT").is_file():
        return None, config or EmbedConfig()
    existing = Index.open(index_dir, use_gpu=False)
    if config is not None:
        existing.check_compatible(config)
    return existing, existing.config


def embed(
    source: str | Path,
    index_dir: str | Path,
    config: EmbedConfig | None = None,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    precision: str = "auto",
    channels_last: bool = True,
    runtime: str = "auto",
    checkpoint_every: int = 1024,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> EmbedReport:
    """Embed every new image of ``source`` into the index at ``index_dir``.

    ``config`` defaults to the existing index's settings (or the defaults for a new
    index); settings that differ from an existing index are refused. ``workers`` is the
    number of decode processes and ``batch_size`` the forward batch (None: chosen for the
    device by :func:`default_workers` and :func:`default_batch_size`).
    """
    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    items = images.list_source(source)
    with _exclusive(index_dir):
        return _embed_locked(items, index_dir, config, t0, device=device, batch_size=batch_size,
                             workers=workers, precision=precision, channels_last=channels_last,
                             runtime=runtime, checkpoint_every=checkpoint_every, max_pixels=max_pixels, progress=progress)


def default_workers(device_type: str, cpus: int | None = None) -> int:
    """Decode processes for a device: on a GPU decoding is the bottleneck, so most cores
    decode; on a CPU the cores are busy with the forward pass and decode workers only
    compete with it (on 2 cores, decoding inline was fastest: docs/benchmarks.md)."""
    if cpus is None:  # the cores this process may use (sched_getaffinity is Linux-only)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device_type == "cuda":
        return max(1, min(8, cpus - 1))
    return cpus // 4


def default_batch_size(device_type: str) -> int:
    """Forward batch per device: small batches stay in a CPU's caches (16 was fastest here,
    8-64 measured in docs/benchmarks.md); a GPU wants larger ones."""
    return 64 if device_type == "cuda" else 16


@contextlib.contextmanager
def _exclusive(index_dir: Path) -> Iterator[None]:
    """Hold ``DIR/.lock`` so two runs never write one index at the same time."""
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StylegenError(f"another stylegen embed is writing {index_dir}; wait for it to finish") from None
        for stale in index_dir.glob(".tmp-*"):  # left by a run that was killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        yield


def _embed_locked(
    items: pd.DataFrame, index_dir: Path, config: EmbedConfig | None, t0: float, *, device: str,
    batch_size: int | None, workers: int | None, precision: str, channels_last: bool, runtime: str,
    checkpoint_every: int,
    max_pixels: int, progress: bool,
) -> EmbedReport:
    existing, config = _open_existing(index_dir, config)
    report = EmbedReport(total=len(items))

    hashed = images.hash_files(items["path"].tolist())
    items["content_hash"] = [h for h, _ in hashed]
    report.bad += [{"image": items["image"][i], "reason": why} for i, (_, why) in enumerate(hashed) if why]
    ok = items["content_hash"].notna()
    dup = ok & items["content_hash"].duplicated()
    report.duplicates = int(dup.sum())
    known = set(existing.metadata["content_hash"]) if existing is not None else set()
    in_index = ok & ~dup & items["content_hash"].isin(known)
    report.already_indexed = int(in_index.sum())
    todo = items[ok & ~dup & ~in_index]

    featurizer = None
    pending = index_dir / PENDING
    if len(todo):
        featurizer = load_featurizer(config, device, precision, channels_last, runtime)
        cid = _config_id(config, featurizer.backbone.weights_id)
        if existing is not None and existing.manifest["backbone"]["weights_id"] != featurizer.backbone.weights_id:
            raise IndexMismatchError(f"index {index_dir} was built with other backbone weights")
        done_hashes, raw_chunks = _load_pending(pending, cid)
        pending.mkdir(parents=True, exist_ok=True)
        (pending / "config_id").write_text(cid)
        done = set(done_hashes)
        report.resumed = int(todo["content_hash"].isin(done).sum())
        run = todo[~todo["content_hash"].isin(done)]
        t1 = time.perf_counter()
        if workers is None:
            workers = default_workers(featurizer.device.type)
        if batch_size is None:
            batch_size = default_batch_size(featurizer.device.type)
        new_hashes, new_raw, bad = _run(featurizer, run, pending, batch_size, workers,
                                         checkpoint_every, max_pixels, progress)
        report.embed_seconds = time.perf_counter() - t1
        report.bad += bad
        for p, v in new_raw.items():
            raw_chunks.setdefault(p, []).extend(v)
        done_hashes += new_hashes
        if done_hashes:
            _commit(index_dir, config, featurizer, existing, items, done_hashes, raw_chunks)
        shutil.rmtree(pending, ignore_errors=True)
        report.added = len(done_hashes)

    final = Index.open(index_dir, use_gpu=False) if (index_dir / "CURRENT").is_file() else None
    report.count = len(final) if final is not None else 0
    report.seconds = time.perf_counter() - t0
    _write_report(index_dir, report)
    return report


def _run(
    featurizer: Featurizer | GraphFeaturizer, run: pd.DataFrame, pending: Path, batch_size: int, workers: int,
    checkpoint_every: int, max_pixels: int, progress: bool,
) -> tuple[list[str], dict[str, list[np.ndarray]], list[dict[str, str]]]:
    """Embed ``run``'s images, checkpointing every ``checkpoint_every``; return hashes, raw, bad."""
    from stylegen.progress import embed_progress

    hashes: list[str] = []
    raw: dict[str, list[np.ndarray]] = {}
    chunk_hashes: list[str] = []
    chunk_raw: dict[str, list[np.ndarray]] = {}
    bad: list[dict[str, str]] = []
    row_hash = run["content_hash"].tolist()
    row_image = run["image"].tolist()
    batches = read_batches(list(range(len(run))), run["path"].tolist(), featurizer.backbone.preprocess,
                           batch_size, workers, max_pixels)
    with embed_progress(len(run), enabled=progress) as advance:
        for rows, pixels, failed in batches:
            bad += [{"image": row_image[d.row], "reason": d.error or "unreadable"} for d in failed]
            if pixels is not None:
                for p, v in featurizer(pixels).items():
                    chunk_raw.setdefault(p, []).append(v)
                chunk_hashes += [row_hash[r] for r in rows]
            if len(chunk_hashes) >= checkpoint_every:
                _flush(pending, chunk_hashes, chunk_raw, hashes, raw)
            advance(len(rows) + len(failed))
    if chunk_hashes:
        _flush(pending, chunk_hashes, chunk_raw, hashes, raw)
    return hashes, raw, bad


def _flush(pending: Path, chunk_hashes: list[str], chunk_raw: dict[str, list[np.ndarray]],
           hashes: list[str], raw: dict[str, list[np.ndarray]]) -> None:
    _save_chunk(pending, chunk_hashes, chunk_raw)
    hashes += chunk_hashes
    for p, v in chunk_raw.items():
        raw.setdefault(p, []).append(np.concatenate(v))
    chunk_hashes.clear()
    chunk_raw.clear()


def _commit(
    index_dir: Path, config: EmbedConfig, featurizer: Featurizer | GraphFeaturizer, existing: Index | None,
    items: pd.DataFrame, new_hashes: list[str], new_raw: dict[str, list[np.ndarray]],
) -> None:
    """Refit compression on the whole collection and write a new snapshot."""
    by_hash = items.drop_duplicates("content_hash").set_index("content_hash", drop=False)
    new_meta = by_hash.loc[new_hashes].reset_index(drop=True)
    raw = {p: np.concatenate(v) for p, v in new_raw.items()}
    meta = new_meta
    if existing is not None:
        old_raw = load_raw(existing)
        if old_raw is None:
            raise StylegenError("this index keeps no raw features (random projection); rebuild it")
        raw = {p: np.concatenate([old_raw[p], raw[p]]) for p in raw}
        meta = pd.concat([existing.metadata, new_meta], ignore_index=True)
    compressor = Compressor.fit(raw, config.compression)
    vectors, slices = combine(compressor.transform(raw), config.features.weights)
    keep_raw = config.compression.method == "pca"
    manifest = _manifest(config, featurizer, compressor, vectors, slices)
    write_snapshot(index_dir, manifest, vectors, meta, compressor, raw if keep_raw else None)


def _manifest(config: EmbedConfig, featurizer: Featurizer | GraphFeaturizer, compressor: Compressor,
              vectors: np.ndarray, slices: dict[str, tuple[int, int]]) -> dict[str, Any]:
    import faiss
    import sklearn

    import stylegen

    bb = featurizer.backbone
    buf = io.BytesIO()
    np.savez(buf, *[a for p in compressor.parts.values() for a in (p.mean, p.components, p.scale)])
    feature_id = hashlib.sha1(
        (_config_id(config, bb.weights_id)).encode() + hashlib.sha1(buf.getvalue()).digest()
    ).hexdigest()[:16]
    return {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "backbone": {"name": bb.name, "weights_id": bb.weights_id, "taps": list(bb.taps),
                     "image_size": bb.image_size, "mean": list(bb.mean), "std": list(bb.std)},
        "preprocess": bb.preprocess.to_dict(),
        "parts": list(slices),
        "slices": {p: list(s) for p, s in slices.items()},
        "dims": compressor.dims,
        "dim": int(vectors.shape[1]),
        "count": int(vectors.shape[0]),
        "index_key": choose_index_key(*vectors.shape),
        "metric": "inner_product",
        "precision": featurizer.precision,
        "runtime": featurizer.runtime,
        "feature_id": feature_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"stylegen": stylegen.__version__, "torch": torch.__version__,
                     "faiss": faiss.__version__, "numpy": np.__version__,
                     "scikit-learn": sklearn.__version__, "pandas": pd.__version__},
    }


def _write_report(index_dir: Path, report: EmbedReport) -> None:
    if not index_dir.is_dir():
        return
    data = {k: v for k, v in report.__dict__.items() if k != "bad"}
    data["bad_files"] = len(report.bad)
    (index_dir / "embed_report.json").write_text(json.dumps(data, indent=2))
    pd.DataFrame(report.bad, columns=["image", "reason"]).to_csv(index_dir / "bad_files.csv", index=False)
