"""The ingest stages on Ray Data: read + decode as Ray tasks, the featurizer in an actor pool.

Same reader (:func:`stylegen.sources.images.decode`), same :class:`~stylegen.featurize.features.Featurizer`,
same shard format as the local engine, so an index can mix shards from both and the build
does not know which wrote them. Shards are written by the driver as feature batches arrive
(the index folder lives on the driver's disk; no shared filesystem is needed).

Resources are pinned so the actor pool never takes every CPU (on a 2-core machine an actor
pool that does starves the read tasks, ray-project/ray#44687): each actor gets one GPU where
the cluster has GPUs, else one actor per node with one CPU less than the smallest node has,
and the read tasks the rest (:func:`plan_resources`). Needs the ``ray`` extra
(``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stylegen.config import EmbedConfig, Preprocess
from stylegen.errors import StylegenError
from stylegen.index.shards import write_shard
from stylegen.sources import images


def _decode_batch(batch: dict[str, np.ndarray], spec: dict[str, Any], max_pixels: int) -> dict[str, np.ndarray]:
    """Ray task: decode a batch of paths into uint8 pixels (zeros + an error for bad files)."""
    pre = Preprocess.from_dict(spec)
    decoded = [images.decode(int(i), str(p), pre, max_pixels) for i, p in zip(batch["i"], batch["path"], strict=True)]
    blank = np.zeros((pre.size, pre.size, 3), np.uint8)
    return {
        "i": np.asarray(batch["i"], np.int64),
        "pixels": np.stack([d.pixels if d.pixels is not None else blank for d in decoded]),
        "error": np.asarray([d.error or "" for d in decoded], dtype=object),
    }


class FeaturizerActor:
    """Ray actor: loads the backbone once, turns pixel batches into raw part vectors."""

    def __init__(self, config: dict[str, Any], precision: str, device: str, ingest_id: str, threads: int,
                 runtime: str = "auto") -> None:
        from stylegen.featurize.runtime import load_featurizer
        from stylegen.index.shards import describe

        cfg = EmbedConfig.from_dict(config)
        # the runtime the user asked for (auto: chosen on this worker's own device and CPU).
        # torch's threads follow the actor's CPUs; ONNX Runtime keeps its default (the cores):
        # pinning it to the actor's 1 CPU on 2 cores measured no different (56 vs 51 img/s,
        # 160 covers; docs/scale.md)
        self.featurizer = load_featurizer(cfg, device, precision, runtime=runtime)
        if self.featurizer.runtime == "torch":
            import torch

            torch.set_num_threads(max(1, threads))
        got = describe(cfg, self.featurizer.backbone, self.featurizer.precision)["ingest_id"]
        if got != ingest_id:  # another weights file or version on this node: refuse, never mix
            raise StylegenError(f"this Ray worker makes other features than the driver ({got} != {ingest_id})")
        self.parts = list(cfg.features.parts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([not e for e in batch["error"]], bool)
        out = {"i": batch["i"], "error": batch["error"]}
        raw = self.featurizer(batch["pixels"][ok]) if ok.any() else {}
        for part in self.parts:
            dim = raw[part].shape[1] if part in raw else 0
            full = np.zeros((len(ok), dim), np.float16)
            if part in raw:
                full[ok] = raw[part].astype(np.float16)
            out[f"raw_{part}"] = full
        return out


def plan_resources(node_cpus: list[int], gpus: int) -> dict[str, Any]:
    """Actor pool and task resources for a cluster whose nodes have ``node_cpus`` CPUs and
    ``gpus`` GPUs in all.

    GPUs: one actor per GPU (1 GPU + 1 CPU each), the other CPUs decode. CPUs only: one actor
    per node, spread over the nodes, each asking for one CPU less than the smallest node has
    (an actor must fit on one node: the cluster's total fits on none), so every node keeps at
    least one CPU for reading and decoding.
    """
    if gpus:
        return {"actors": gpus, "actor_cpus": 1, "actor_gpus": 1, "device": "cuda", "spread": False}
    cpus = [int(c) for c in node_cpus if c >= 1] or [1]
    return {"actors": len(cpus), "actor_cpus": max(1, min(cpus) - 1), "actor_gpus": 0, "device": "cpu",
            "spread": len(cpus) > 1}


def ingest_ray(
    run: pd.DataFrame, index_dir: Path, config: EmbedConfig, info: dict[str, Any], *,
    device: str = "auto", batch_size: int | None = None, shard_size: int = 1024,
    max_pixels: int = images.DEFAULT_MAX_PIXELS, address: str | None = None, num_cpus: int | None = None,
    runtime: str = "auto",
) -> list[dict[str, str]]:
    """Embed ``run``'s rows on Ray Data and write them as shards; returns the bad files.

    ``address``: an existing Ray cluster (``ray start --head`` / ``ray://...``); None starts
    a local Ray with ``num_cpus`` (default: this machine's cores). ``runtime``: the
    featurizer runtime the actors use, as asked (:func:`stylegen.featurize.runtime.resolve_runtime`).
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise StylegenError("--engine ray needs Ray Data: pip install -e '.[ray]'") from None
    run = run.reset_index(drop=True)
    if not len(run):
        return []
    started = not ray.is_initialized()
    if started:
        cpus = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray; a cluster sets its own
        ray.init(address=address, num_cpus=None if address else cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        res = ray.cluster_resources()
        nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        plan = plan_resources(nodes, int(res.get("GPU", 0)) if device != "cpu" else 0)
        batch_size = batch_size or (64 if plan["device"] == "cuda" else 16)
        rows = pd.DataFrame({"i": np.arange(len(run)), "path": run["path"].astype(str)})
        ds = ray.data.from_pandas([rows.iloc[i : i + batch_size] for i in range(0, len(rows), batch_size)])
        # read tasks ask for less than an actor, so Ray neither fuses them into the actor nor
        # lets the actor pool take the CPUs they need
        ds = ds.map_batches(_decode_batch, batch_size=batch_size, num_cpus=0.5, batch_format="numpy",
                            fn_kwargs={"spec": info["preprocess"], "max_pixels": max_pixels})
        ds = ds.map_batches(
            FeaturizerActor, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            num_cpus=plan["actor_cpus"], num_gpus=plan["actor_gpus"],
            **({"scheduling_strategy": "SPREAD"} if plan["spread"] else {}),
            fn_constructor_kwargs={"config": config.to_dict(), "precision": info["precision"],
                                   "device": plan["device"], "ingest_id": info["ingest_id"],
                                   "threads": plan["actor_cpus"], "runtime": runtime},
        )
        return _write_shards(ds.iter_batches(batch_size=shard_size, batch_format="numpy"), run, index_dir, info)
    finally:
        if started:
            ray.shutdown()


def _write_shards(batches: Any, run: pd.DataFrame, index_dir: Path, info: dict[str, Any]) -> list[dict[str, str]]:
    bad: list[dict[str, str]] = []
    for batch in batches:
        ok = np.asarray([not e for e in batch["error"]], bool)
        rows = np.asarray(batch["i"], np.int64)
        bad += [{"image": str(run["image"][r]), "reason": str(e)} for r, e in zip(rows[~ok], batch["error"][~ok], strict=True)]
        if ok.any():
            raw = {k[4:]: v[ok] for k, v in batch.items() if k.startswith("raw_")}
            write_shard(index_dir, raw, run.iloc[rows[ok]], info)
    return bad
