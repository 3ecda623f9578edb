"""Ingest: SOURCE -> reader (decode workers) -> featurizer -> shard writer, then build.

``embed`` is the one-command path: hash the source's files, skip covers the index or an
earlier (interrupted) run's shards already hold, write the rest to shards
(:mod:`stylegen.index.shards`), then bring the index up to date (:mod:`stylegen.index.build`). The
stages are small callables, so the same reader and featurizer run in this process
(:func:`ingest_local`) or on Ray Data (:mod:`stylegen.index.ingest_ray`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stylegen.config import EmbedConfig, Preprocess, default_config
from stylegen.errors import IndexMismatchError, StylegenError
from stylegen.featurize.features import Featurizer
from stylegen.featurize.runtime import resolve_device, resolve_precision  # noqa: F401  (re-exported)
from stylegen.index.build import (
    DEFAULT_MAX_SAMPLE,
    DEFAULT_RAW_RETENTION,
    BuildResult,
    check_raw_retention,
    check_vectors_dtype,
    current_manifest,
    index_ingest_id,
    open_current,
    rows_without_raw,
    update_index,
)
from stylegen.index.bundle import Model, open_model
from stylegen.index.retention import RawRetention
from stylegen.index.shards import RUN_COLUMNS, clean_partial, describe, list_shards, write_shard
from stylegen.index.store import Index, config_diff, exclusive
from stylegen.sources import images
from stylegen.util.persist import atomic_write, atomic_write_text
from stylegen.util.tables import safe_frame

ENGINES = ("local", "ray")
REREAD_RATE = 90.0  # img/s assumed for re-reading images when no embed run recorded its rate


@dataclass
class EmbedReport:
    """What one run did; also written to ``DIR/embed_report.json`` (+ ``bad_files.csv``)."""

    total: int = 0
    added: int = 0
    already_indexed: int = 0
    resumed: int = 0  # covers an interrupted run had already ingested
    embedded: int = 0  # covers this run sent through the featurizer (bad ones included)
    duplicates: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    build_seconds: float = 0.0
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
) -> Any:
    """The featurizer ``config`` describes, on ``runtime`` (see :mod:`stylegen.featurize.runtime`)."""
    from stylegen.featurize import runtime as runtimes

    return runtimes.load_featurizer(config, device, precision, channels_last, runtime)


class _Reader:
    """The covers of a run as a map-style dataset (``len`` and ``[i]``) for torch's DataLoader."""

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
    """Decode images in ``workers`` processes, yielding (rows, uint8 batch, failures).

    ``workers=0`` decodes in this process without importing torch (the CPU default, where
    an exported runtime may serve the featurizer without it)."""
    reader = _Reader(rows, paths, spec, max_pixels)
    if workers == 0:
        for start in range(0, len(reader), batch_size):
            yield _collate([reader[i] for i in range(start, min(start + batch_size, len(reader)))])
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(
        reader, batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, prefetch_factor=4,
    )
    yield from loader


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
    checkpoint_every: int = 1024,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    runtime: str = "auto",
    weights: str | None = None,
    model: str | Path | None = None,
    vectors_dtype: str | None = None,
    raw_retention: RawRetention | None = None,
) -> EmbedReport:
    """Embed every new image of ``source`` into the index at ``index_dir``: ingest, then build.

    Ingest writes the new covers' raw features to shards of ``checkpoint_every`` covers
    (:mod:`stylegen.index.shards`); a killed run loses at most the shard it was filling. Build then
    fits the compression (new index) or appends with the frozen one (existing index; old
    vectors and trained heads stay valid): :func:`stylegen.index.build.update_index`.

    ``config`` defaults to the existing index's settings (or the defaults for a new index);
    settings that differ from an existing index are refused. ``weights`` names the backbone
    weights to add covers to an existing index made with other than the packaged ones
    (:meth:`~stylegen.index.store.Index.query_config`: an index's own record is never loaded).
    ``model`` (a bundle's name or path, :mod:`stylegen.index.bundle`) makes a new index in the
    model's vector space: its settings and frozen compressor, so the model's heads answer on
    the index without training and similar search and genres share one space. ``precision="auto"`` on an
    existing index means the index's precision. ``workers`` decode processes and
    ``batch_size`` forward batch default by device (:func:`default_workers`,
    :func:`default_batch_size`). ``engine="ray"`` runs read/decode as Ray tasks and the
    featurizer in Ray actors (``address``: an existing cluster; None starts a local one).
    ``runtime`` runs the featurizer on ``torch``, ``onnx`` (ONNX Runtime) or ``openvino``
    (``auto``: the fastest installed for the device, :func:`stylegen.featurize.runtime.resolve_runtime`);
    they compute the same function, so shards from any runtime mix in one index.
    ``vectors_dtype`` (``float32`` or ``float16``) is how a new index keeps its searchable
    vectors on disk; an existing index keeps its own (another is refused before any work).
    ``raw_retention`` (:mod:`stylegen.index.retention`): which covers of a new index keep raw
    features after the build (default :data:`~stylegen.index.build.DEFAULT_RAW_RETENTION`); an
    existing index keeps its own policy, another is refused before any work.
    """
    if engine not in ENGINES:
        raise StylegenError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    items = images.list_source(source)
    bundle = open_model(model) if model is not None else None
    with exclusive(index_dir):
        clean_partial(index_dir)
        existing = open_current(index_dir)
        if existing is not None and config is not None:
            existing.check_compatible(config)
        check_vectors_dtype(existing, vectors_dtype)
        check_raw_retention(existing, raw_retention)
        if bundle is not None:
            config = _model_config(bundle, existing, config)
        config = config or (existing.config if existing is not None else default_config())
        report, todo = _plan(items, existing)
        built = set(existing.manifest.get("shards", [])) if existing is not None else set()
        unbuilt = [s for s in list_shards(index_dir) if s.name not in built]
        if len(todo) or unbuilt:
            if existing is not None and precision == "auto":
                precision = existing.manifest.get("precision", "auto")
            load_config = existing.query_config(weights) if existing is not None else config
            featurizer = load_featurizer(load_config, device, precision, channels_last, runtime)
            info = {**describe(config, featurizer.backbone, featurizer.precision),
                    "runtime": getattr(featurizer, "runtime", "torch")}
            _check_same_features(existing, info)
            for stale in (s for s in unbuilt if s.ingest_id != info["ingest_id"]):
                shutil.rmtree(stale.path, ignore_errors=True)  # another backbone/precision: unusable
            ingested = {h for s in unbuilt if s.ingest_id == info["ingest_id"] for h in s.hashes()}
            resumed = todo["content_hash"].isin(ingested)
            report.resumed = int(resumed.sum())
            run = todo[~resumed]
            t1 = time.perf_counter()
            if engine == "ray":
                from stylegen.index.ingest_ray import ingest_ray

                report.bad += ingest_ray(run, index_dir, load_config, info, device=device, batch_size=batch_size,
                                         shard_size=checkpoint_every, max_pixels=max_pixels, address=address,
                                         runtime=runtime)
            else:
                report.bad += ingest_local(featurizer, run, index_dir, info, batch_size=batch_size,
                                           workers=workers, shard_size=checkpoint_every,
                                           max_pixels=max_pixels, progress=progress)
            report.embed_seconds = time.perf_counter() - t1
            report.embedded = len(run)
            if list_shards(index_dir):
                built_now = update_index(index_dir, config if existing is None else None,
                                         model=bundle if existing is None else None, vectors_dtype=vectors_dtype,
                                         raw_retention=raw_retention)
                report.added, report.build_seconds = built_now.added, built_now.seconds
        final = open_current(index_dir)
        report.count = len(final) if final is not None else 0
        report.seconds = time.perf_counter() - t0
        _write_report(index_dir, report)
    return report


def _model_config(bundle: Model, existing: Index | None, asked: EmbedConfig | None) -> EmbedConfig:
    """The settings of an index made with ``bundle``: the model's own (others are refused)."""
    if existing is not None:
        if existing.feature_id != bundle.feature_id:
            raise IndexMismatchError(f"index {existing.root} was not made with model {bundle.name}; "
                                     "a model's index is made new (`--model` on a new --index)")
        return existing.config
    ours = bundle.index.config
    if asked is not None and (diffs := config_diff(ours.to_dict(), asked.to_dict())):
        raise StylegenError(f"an index made with model {bundle.name} takes the model's settings: {diffs[0]}")
    return ours


def requested_config(index_dir: str | Path, **options: Any) -> EmbedConfig | None:
    """The settings the ``embed`` command's options ask for (None: whatever the index has).

    ``options`` are the command's feature settings (``backbone``, ``weights``, ``taps``,
    ``image_size``, ``parts``, ``style_weight``, ``content_weight``, ``compression``, ``dim``,
    ``whiten``, ``flip``), None when not given. On an existing index the given ones replace the index's
    own, so any that differ are refused by name; a new index takes defaults for the rest.
    On an existing index ``weights`` is not a setting but the file to load (see ``embed``).
    """
    import dataclasses

    manifest = current_manifest(index_dir)
    given = {k: v for k, v in options.items() if v is not None and not (k == "weights" and manifest is not None)}
    if manifest is not None and not given:
        return None
    base = EmbedConfig.from_dict(manifest["config"]) if manifest is not None else default_config()
    bb, ft, cp = base.backbone, base.features, base.compression
    if given.keys() & {"backbone", "weights", "taps", "image_size"}:
        # another backbone reads its own native size unless one is asked for
        size = given.get("image_size", None if given.get("backbone", bb.name) != bb.name else bb.image_size)
        bb = dataclasses.replace(bb, name=given.get("backbone", bb.name), weights=given.get("weights", bb.weights),
                                 taps=given.get("taps", bb.taps), image_size=size)
    weights = dict(ft.weights)
    for part in ("style", "content"):
        if f"{part}_weight" in given:
            weights[part] = float(given[f"{part}_weight"])
    ft = dataclasses.replace(ft, parts=given.get("parts", ft.parts), weights=weights, flip=given.get("flip", ft.flip))
    dims = {p: int(given["dim"]) for p in cp.dims} if "dim" in given else dict(cp.dims)
    cp = dataclasses.replace(cp, method=given.get("compression", cp.method), dims=dims,
                             whiten=given.get("whiten", cp.whiten))
    return EmbedConfig(backbone=bb, features=ft, compression=cp)


def requested_retention(policy: str | None = None, sample_size: int | None = None) -> RawRetention | None:
    """The raw retention the ``embed`` command's options ask for (None: the index's own, or the
    default for a new index); a sample size alone means ``sample``."""
    if policy is None and sample_size is None:
        return None
    if sample_size is not None and policy not in (None, "sample"):
        raise StylegenError(f"--raw-sample sizes a sample: it goes with --raw-retention sample, not {policy}")
    if policy in (None, "sample"):
        return RawRetention("sample", sample_size or DEFAULT_RAW_RETENTION.sample_size, DEFAULT_RAW_RETENTION.seed)
    return RawRetention(policy)


def _plan(items: pd.DataFrame, existing: Index | None) -> tuple[EmbedReport, pd.DataFrame]:
    """Hash the source's files; return the report so far and the rows not yet in the index
    (one per content hash), numbered by their position in the source for a stable order."""
    report = EmbedReport(total=len(items))
    hashed = images.hash_files(items["path"].tolist())
    items["content_hash"] = [h for h, _ in hashed]
    items[RUN_COLUMNS[0]] = time.time_ns()
    items[RUN_COLUMNS[1]] = np.arange(len(items))
    report.bad += [{"image": items["image"][i], "reason": why} for i, (_, why) in enumerate(hashed) if why]
    ok = items["content_hash"].notna()
    dup = ok & items["content_hash"].duplicated()
    report.duplicates = int(dup.sum())
    known = set(existing.metadata["content_hash"]) if existing is not None else set()
    in_index = ok & ~dup & items["content_hash"].isin(known)
    report.already_indexed = int(in_index.sum())
    return report, items[ok & ~dup & ~in_index]


def _check_same_features(existing: Index | None, info: dict[str, Any]) -> None:
    """Refuse to add raw features made otherwise than the index's (weights, precision, decoding)."""
    if existing is None:
        return
    m = existing.manifest
    if m["backbone"]["weights_id"] != info["backbone"]["weights_id"]:
        raise IndexMismatchError(f"index {existing.root} was built with other backbone weights")
    if m.get("precision", info["precision"]) != info["precision"]:
        raise IndexMismatchError(f"index {existing.root} was embedded at precision {m['precision']}, "
                                 f"asked for {info['precision']}")
    if index_ingest_id(existing) != info["ingest_id"]:
        raise IndexMismatchError(f"index {existing.root} was embedded with other preprocessing "
                                 "(decode spec); rebuild it or use the stylegen version that made it")


def ingest_local(
    featurizer: Featurizer, run: pd.DataFrame, index_dir: Path, info: dict[str, Any], *,
    batch_size: int | None = None, workers: int | None = None, shard_size: int = 1024,
    max_pixels: int = images.DEFAULT_MAX_PIXELS, progress: bool = True,
) -> list[dict[str, str]]:
    """Reader -> featurizer -> shard writer in this process (decode in ``workers`` processes).

    Writes a shard every ``shard_size`` covers and at the end; returns the bad files."""
    from stylegen.util.progress import embed_progress

    if workers is None:
        workers = default_workers(featurizer.device.type)
    if batch_size is None:
        batch_size = default_batch_size(featurizer.device.type)
    run = run.reset_index(drop=True)
    bad: list[dict[str, str]] = []
    rows: list[int] = []
    raw: dict[str, list[np.ndarray]] = {}
    batches = read_batches(list(range(len(run))), run["path"].tolist(), featurizer.backbone.preprocess,
                           batch_size, workers, max_pixels)
    with embed_progress(len(run), enabled=progress) as advance:
        for got, pixels, failed in batches:
            bad += [{"image": run["image"][d.row], "reason": d.error or "unreadable"} for d in failed]
            if pixels is not None:
                for p, v in featurizer(pixels).items():
                    raw.setdefault(p, []).append(v)
                rows += got
            if len(rows) >= shard_size:
                _flush(index_dir, run, rows, raw, info)
            advance(len(got) + len(failed))
    if rows:
        _flush(index_dir, run, rows, raw, info)
    return bad


def _flush(index_dir: Path, run: pd.DataFrame, rows: list[int], raw: dict[str, list[np.ndarray]],
           info: dict[str, Any]) -> None:
    write_shard(index_dir, {p: np.concatenate(v) for p, v in raw.items()}, run.iloc[rows], info)
    rows.clear()
    raw.clear()


def build(
    index_dir: str | Path, *, refit: bool = False, max_sample: int = DEFAULT_MAX_SAMPLE,
    notify: Callable[[str], None] | None = None, device: str = "auto", runtime: str = "auto",
    weights: str | None = None, progress: bool = False,
) -> BuildResult:
    """``stylegen index DIR``: append the ingested covers the index lacks, or refit it.

    A refit transforms every cover, so the covers whose raw features the index's raw retention
    dropped are embedded again from their source images (metadata ``path``) with the index's
    own settings, after ``notify`` is told how many and about how long; a source image that is
    gone or changed stops the refit first, with nothing changed. ``device``, ``runtime``,
    ``weights``, ``progress``: as for :func:`embed`, for that re-read.
    """
    index_dir = Path(index_dir)
    with exclusive(index_dir):
        clean_partial(index_dir)
        if refit:
            _reread_pruned(index_dir, notify, device=device, runtime=runtime, weights=weights, progress=progress)
        return update_index(index_dir, refit=refit, max_sample=max_sample)


def _reread_pruned(index_dir: Path, notify: Callable[[str], None] | None, *, device: str, runtime: str,
                   weights: str | None, progress: bool) -> int:
    """Ingest again the covers of the index that keep no raw features; returns how many."""
    existing = open_current(index_dir)
    rows = rows_without_raw(existing) if existing is not None else np.zeros(0, np.int64)
    if existing is None or not len(rows):
        return 0
    run = existing.rows(rows).reset_index(drop=True)
    paths = run["path"].tolist() if "path" in run.columns else [""] * len(run)
    hashed = images.hash_files(paths)
    gone = [p or image for p, image, (h, _), want in zip(paths, run["image"], hashed, run["content_hash"], strict=True)
            if h != want]
    if gone:
        raise StylegenError(f"cannot refit: the source images of {len(gone)} covers without kept raw features are "
                            f"missing or changed (first: {gone[0]}); nothing was changed")
    rate, source = _embed_rate(index_dir)
    minutes = len(run) / rate / 60
    took = f"about {minutes:,.0f} min" if minutes >= 1 else "under a minute"
    if notify is not None:
        notify(f"re-reading {len(run)} source images to refit ({took} at {rate:.0f} img/s, {source})")
    run[RUN_COLUMNS[0]], run[RUN_COLUMNS[1]] = time.time_ns(), np.arange(len(run))
    featurizer = load_featurizer(existing.query_config(weights), device, existing.manifest.get("precision", "auto"),
                                 True, runtime)
    info = {**describe(existing.config, featurizer.backbone, featurizer.precision),
            "runtime": getattr(featurizer, "runtime", "torch")}
    _check_same_features(existing, info)
    bad = ingest_local(featurizer, run, index_dir, info, progress=progress)
    if bad:
        raise StylegenError(f"cannot refit: {len(bad)} source images could not be read again "
                            f"(first: {bad[0]['image']}: {bad[0]['reason']})")
    return len(run)


def _embed_rate(index_dir: Path) -> tuple[float, str]:
    """Images per second of the last embed run (``embed_report.json``), or :data:`REREAD_RATE`."""
    try:
        report = json.loads((index_dir / "embed_report.json").read_text())
        rate = float(report["embedded"]) / float(report["embed_seconds"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        rate = 0.0
    if rate > 0:
        return rate, "the rate of the last embed run"
    return REREAD_RATE, "an assumed rate: no embed run recorded one"


def _write_report(index_dir: Path, report: EmbedReport) -> None:
    if not index_dir.is_dir():
        return
    data = {k: v for k, v in report.__dict__.items() if k != "bad"}
    data["bad_files"] = len(report.bad)
    atomic_write_text(index_dir / "embed_report.json", json.dumps(data, indent=2))
    bad = safe_frame(pd.DataFrame(report.bad, columns=["image", "reason"]))
    atomic_write(index_dir / "bad_files.csv", lambda tmp: bad.to_csv(tmp, index=False))
