#!/usr/bin/env python
"""Embedding throughput per featurizer runtime, forward pass alone and end to end, in one run.

    python scripts/bench_embed.py [--n 256] [--fwd-n 128] [--repeats 2] [--image-size 320]
        [--runtimes torch,onnx,openvino] [--graph-variants]

* forward: the featurizer alone (``load_featurizer(...)(pixels)``: normalisation, forward
  pass, Gram matrices, pooling) on pre-decoded uint8 batches of the CPU's default size;
* stylegen embed: ``stylegen.index.ingest`` end to end on ``--n`` real covers into a fresh index
  (hashing, decoding, featurizer, checkpoints, PCA, FAISS, writes), per runtime, in this
  process (imports already paid), and the ``stylegen embed`` command as a whole process
  (start-up, imports and featurizer load included: what a user waits for).
Runtimes alternate within each repeat, so drift of a shared machine hits all alike; the
best of ``--repeats`` is reported, with the ratio to torch. ``--graph-variants`` also times
the exported graph with the tap activations as outputs and the Gram matrices in numpy
(the alternative to computing them inside the graph). Prints the CPU model, its flags and
the load average. Reads ../shared/data/covers; exits with a message when absent.

    python scripts/bench_embed.py --stages [--n 1024] [--repeats 2]

``--stages`` (issue 24) times, in one run: the naive loop (per cover: PIL full decode and
resize, eager torch fp32 at batch 1: what one would write first), the forward pass alone
(ONNX Runtime, batch 16, pre-decoded covers), ``stylegen.embed()`` into a fresh index with
every stage timed per cover (hashing, decoding, forward pass with the Gram matrices and
pooling inside the graph, raw feature writes, reading raw features back, compression fit and
transform, FAISS and the snapshot writes), and the ``stylegen embed`` command as a whole
process; all at the same input size, with the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"
sys.path.insert(0, str(ROOT / "scripts"))

from bench_coldstart import cpu_line  # noqa: E402  (after the path above)


def config(size: int):
    from stylegen.config import BackboneConfig, EmbedConfig

    return EmbedConfig(backbone=BackboneConfig(image_size=size))


def forward(runtime: str, n: int, batch_size: int, size: int) -> tuple[float, str]:
    """Images per second of the featurizer alone, and its precision."""
    from stylegen.featurize.runtime import load_featurizer

    feat = load_featurizer(config(size), "cpu", "auto", runtime=runtime)
    pixels = np.random.default_rng(0).integers(0, 255, (batch_size, size, size, 3), dtype=np.uint8)
    for _ in range(2):  # kernels are built over the first calls
        feat(pixels)
    steps = max(1, n // batch_size)
    t = time.perf_counter()
    for _ in range(steps):
        feat(pixels)
    return steps * batch_size / (time.perf_counter() - t), feat.precision


def end_to_end(csv: Path, runtime: str, size: int) -> tuple[float, float]:
    """(whole call img/s, embedding stage img/s) of stylegen.index.ingest with defaults at ``size`` px."""
    import stylegen

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        report = stylegen.embed(csv, Path(d) / "idx", config(size), device="cpu", runtime=runtime, progress=False)
        wall = time.perf_counter() - t
    return report.added / wall, report.images_per_second


def whole_process(csv: Path, runtime: str, size: int) -> float:
    """Images per second of the ``stylegen embed`` command into a fresh index, timed from
    process start to exit: what a user waits for (start-up and imports included)."""
    with tempfile.TemporaryDirectory() as d:
        exe = Path(sys.executable).parent / "stylegen"  # the console script, not a shell shim
        cmd = [str(exe) if exe.exists() else "stylegen", "embed", str(csv), "--index", str(Path(d) / "idx"), "--runtime", runtime,
               "--device", "cpu", "--image-size", str(size), "--no-progress"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t
    return len(pd.read_csv(csv)) / wall


class StageTimer:
    """Wraps library functions in place to add up the seconds spent in each (per stage)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, stage: str) -> None:
        fn = getattr(owner, name)
        timer = self

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.seconds[stage] = timer.seconds.get(stage, 0.0) + time.perf_counter() - t

        self.undo.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, staticmethod(timed) if isinstance(owner.__dict__[name], staticmethod)
                else classmethod(lambda cls, *a, **k: timed(*a, **k)) if isinstance(owner.__dict__[name], classmethod)
                else timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)
        self.undo.clear()


STAGES = (  # (module, attribute, stage); nested ones are marked in the table
    ("stylegen.sources.images", "hash_files", "hash (read + sha1)"),
    ("stylegen.sources.images", "decode", "decode (read, JPEG draft, resize)"),
    ("stylegen.featurize.runtime", "GraphFeaturizer.__call__", "forward + Gram + pool (in the graph)"),
    ("stylegen.index.ingest", "write_shard", "raw feature writes (shards)"),
    ("stylegen.index.build", "_gather", "read raw back (float16 -> float32)"),
    ("stylegen.index.compress", "Compressor.fit", "compression fit (PCA)"),
    ("stylegen.index.build", "_transform", "compression transform (incl. its raw reads)"),
    ("stylegen.index.ann", "build", "FAISS index build + add"),
    ("stylegen.index.build", "write_snapshot", "snapshot writes (incl. FAISS build)"),
)


def embed_stages(csv: Path, size: int) -> tuple[dict[str, float], float, int]:
    """``stylegen.embed()`` into a fresh index with each stage timed: (seconds per stage,
    wall seconds, covers added)."""
    import importlib

    import stylegen

    timer = StageTimer()
    for module, attr, stage in STAGES:
        owner = importlib.import_module(module)
        for part in attr.split(".")[:-1]:
            owner = getattr(owner, part)
        timer.wrap(owner, attr.split(".")[-1], stage)
    try:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            report = stylegen.embed(csv, Path(d) / "idx", config(size), device="cpu", runtime="onnx", progress=False)
            wall = time.perf_counter() - t
    finally:
        timer.restore()
    return timer.seconds, wall, report.added


def naive(paths: list[str], size: int) -> float:
    """Images per second of the naive loop: per cover PIL full decode + resize, eager torch
    fp32 at batch 1 (the library's own torch featurizer, Gram and pooling included)."""
    import torch
    from PIL import Image

    from stylegen.featurize import backbones
    from stylegen.featurize.features import Featurizer

    cfg = config(size)
    feat = Featurizer(backbone=backbones.build(cfg.backbone), config=cfg.features, device=torch.device("cpu"),
                      precision="fp32", channels_last=False)

    def one(path: str) -> None:
        img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        feat(np.asarray(img)[None])

    one(paths[0])
    t = time.perf_counter()
    for p in paths:
        one(p)
    return len(paths) / (time.perf_counter() - t)


def decoded(paths: list[str], size: int) -> np.ndarray:
    from stylegen.config import Preprocess
    from stylegen.sources import images

    spec = Preprocess(size=size)
    return np.stack([images.prepare(p, spec) for p in paths])


def forward_on(pixels: np.ndarray, batch_size: int, size: int) -> float:
    """Images per second of the ONNX featurizer alone on real pre-decoded covers."""
    from stylegen.featurize.runtime import load_featurizer

    feat = load_featurizer(config(size), "cpu", "auto", runtime="onnx")
    feat(pixels[:batch_size])
    t = time.perf_counter()
    for a in range(0, len(pixels), batch_size):
        feat(pixels[a : a + batch_size])
    return len(pixels) / (time.perf_counter() - t)


def stages_main(args: argparse.Namespace, rows: pd.DataFrame) -> None:
    """The issue-24 table: per-stage ms per cover, forward-only, whole call, command, naive."""
    batch = 16
    paths = rows["image"].tolist()
    print(cpu_line())
    print(f"n={len(rows)} real covers, input {args.image_size} px, ONNX Runtime, batch {batch}, best of {args.repeats}")
    pixels = decoded(paths[: min(len(paths), 256)], args.image_size)
    naive_n = paths[: min(len(paths), 128)]
    best: dict[str, float] = {}
    per_stage: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        csv = Path(d) / "bench.csv"
        rows.to_csv(csv, index=False)
        embed_stages(csv, args.image_size)  # warm-up: imports (scikit-learn), export cache, page cache
        for _ in range(args.repeats):
            f = forward_on(pixels, batch, args.image_size)
            seconds, wall, added = embed_stages(csv, args.image_size)
            c = whole_process(csv, "onnx", args.image_size)
            nv = naive(naive_n, args.image_size)
            if added / wall > best.get("whole", 0):
                per_stage = {k: v / added for k, v in seconds.items()}
                best["whole_wall"] = wall / added
            for key, v in (("forward", f), ("whole", added / wall), ("command", c), ("naive", nv)):
                best[key] = max(best.get(key, 0.0), v)
    fwd_ms = 1000 / best["forward"]
    print("\n| stage (stylegen.embed(), fresh index) | ms per cover |\n|---|---:|")
    for _, _, stage in STAGES:
        if stage in per_stage:
            print(f"| {stage} | {1000 * per_stage[stage]:.2f} |")
    print(f"| **whole call, wall** | **{1000 * best['whole_wall']:.2f}** |")
    print(f"| forward pass alone (batch {batch}, pre-decoded; same run) | {fwd_ms:.2f} |")
    print("\n| measurement | img/s | ratio |\n|---|---:|---|")
    print(f"| naive loop (PIL full decode, torch fp32, batch 1) | {best['naive']:.1f} | 1.00 x naive |")
    print(f"| forward only (ONNX Runtime, batch {batch}) | {best['forward']:.1f} | {best['forward'] / best['naive']:.2f} x naive |")
    print(f"| `stylegen.embed()` whole call | {best['whole']:.1f} | **{best['whole'] / best['forward']:.0%} of forward-only** |")
    print(f"| `stylegen embed` command (whole process) | {best['command']:.1f} | **{best['command'] / best['naive']:.2f} x naive** |")
    print(cpu_line())


def graph_variants(n: int, batch_size: int) -> dict[str, float]:
    """Gram matrices inside the ONNX graph vs tap activations out + Gram in numpy (ORT)."""
    import onnxruntime as ort
    import torch

    from stylegen.config import BackboneConfig, EmbedConfig
    from stylegen.featurize import backbones
    from stylegen.featurize.features import channel_projection
    from stylegen.featurize.runtime import load_featurizer

    bb = backbones.build(BackboneConfig())

    class Taps(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = bb.model

        def forward(self, px: torch.Tensor) -> tuple[torch.Tensor, ...]:
            acts, content = bb.forward((px.permute(0, 3, 1, 2).float() - 127.5) / 127.5)
            return (*acts.values(), content)

    proj = channel_projection(192, 128).numpy()

    def numpy_parts(outs: list[np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for a in outs[:-1]:
            f = a.reshape(a.shape[0], a.shape[1], -1)
            if f.shape[1] > 128:
                f = np.matmul(proj, f)
            g = np.matmul(f, f.transpose(0, 2, 1)) / f.shape[-1]
            iu = np.triu_indices(g.shape[1])
            g = g[:, iu[0], iu[1]]
            g = np.sign(g) * np.sqrt(np.abs(g))
            parts.append(g / np.linalg.norm(g, axis=1, keepdims=True))
        c = outs[-1]
        return {"style": np.concatenate(parts, 1) / np.sqrt(len(parts)),
                "content": c / np.linalg.norm(c, axis=1, keepdims=True)}

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "taps.onnx"
        with torch.no_grad():
            torch.onnx.export(Taps().eval(), (torch.zeros(2, 224, 224, 3, dtype=torch.uint8),), str(path),
                              input_names=["px"], dynamic_axes={"px": {0: "b"}}, opset_version=17, dynamo=False)
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        in_graph = load_featurizer(EmbedConfig(), "cpu", runtime="onnx")
        out = {}
        for bs in (batch_size, 1):
            px = np.random.default_rng(0).integers(0, 255, (bs, 224, 224, 3), dtype=np.uint8)
            for name, fn in ((f"ORT, Gram in the graph, batch {bs}", lambda px=px: in_graph(px)),
                             (f"ORT, taps out + numpy Gram, batch {bs}",
                              lambda px=px: numpy_parts(sess.run(None, {"px": px})))):
                fn()
                steps = max(2, n // bs // (4 if bs == 1 else 1))
                t = time.perf_counter()
                for _ in range(steps):
                    fn()
                out[name] = steps * bs / (time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="covers for the end-to-end runs")
    ap.add_argument("--fwd-n", type=int, default=128, help="images per forward-only measurement")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per measurement")
    ap.add_argument("--runtimes", default="torch,onnx,openvino")
    ap.add_argument("--graph-variants", action="store_true")
    ap.add_argument("--stages", action="store_true", help="per-stage times per cover, naive loop, ratios (issue 24)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="input size for both measurements (default: a new index's, 320)")
    args = ap.parse_args()
    if args.image_size is None:
        from stylegen.config import DEFAULT_IMAGE_SIZE

        args.image_size = DEFAULT_IMAGE_SIZE
    if not COVERS.exists():
        sys.exit(f"skipped: real covers not found at {COVERS}")
    from stylegen.featurize.runtime import installed
    from stylegen.index.ingest import default_batch_size

    runtimes = [r for r in args.runtimes.split(",") if r == "torch" or installed(r)]
    batch = default_batch_size("cpu")
    rows = pd.read_csv(COVERS).sample(args.n, random_state=0)
    rows["image"] = [str(COVERS.parent / p) for p in rows["image"]]
    if args.stages:
        stages_main(args, rows)
        return
    print(cpu_line())
    print(f"n={args.n} (end to end), {args.fwd_n} (forward), batch={batch}, input {args.image_size} px, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, runtimes {runtimes}")
    fwd: dict[str, list[float]] = {}
    e2e: dict[str, list[tuple[float, float]]] = {}
    proc: dict[str, list[float]] = {}
    precision: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as d:
        csv = Path(d) / "bench.csv"
        rows.to_csv(csv, index=False)
        for r in runtimes:  # exports (first use) and warm-up, untimed
            forward(r, batch, batch, args.image_size)
        for _ in range(args.repeats):
            for r in runtimes:
                v, precision[r] = forward(r, args.fwd_n, batch, args.image_size)
                fwd.setdefault(r, []).append(v)
                e2e.setdefault(r, []).append(end_to_end(csv, r, args.image_size))
                proc.setdefault(r, []).append(whole_process(csv, r, args.image_size))
    base_f = max(fwd["torch"]) if "torch" in fwd else 1.0
    base_e = max(w for w, _ in e2e["torch"]) if "torch" in e2e else 1.0
    base_p = max(proc["torch"]) if "torch" in proc else 1.0
    print("\n| runtime | precision | forward img/s | x torch | stylegen.embed() img/s (whole call) "
          "| x torch | embedding stage img/s | `stylegen embed` command img/s (whole process) | x torch |"
          "\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runtimes:
        f, w, s, p = max(fwd[r]), max(x for x, _ in e2e[r]), max(y for _, y in e2e[r]), max(proc[r])
        print(f"| {r} | {precision[r]} | {f:.1f} | {f / base_f:.2f} | {w:.1f} | {w / base_e:.2f} | {s:.1f} "
              f"| {p:.1f} | {p / base_p:.2f} |")
    if args.graph_variants:
        print("\n| exported graph variant (224 px) | img/s |\n|---|---:|")
        for name, v in graph_variants(args.fwd_n, batch).items():
            print(f"| {name} | {v:.1f} |")
    print(cpu_line())


if __name__ == "__main__":
    main()
