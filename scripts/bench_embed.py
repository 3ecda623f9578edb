#!/usr/bin/env python
"""Embedding throughput: stylegen embed vs a naive baseline vs forward-only, in one run.

    python scripts/bench_embed.py [--n 1024] [--batch-size 16] [--sweep]

* naive: per image PIL open + resize (no draft mode), fp32 forward at batch 1,
  Gram matrices per image in numpy;
* forward-only: the backbone alone on pre-decoded, pre-normalised batches, with the
  same batch size and precision as stylegen embed;
* stylegen: ``stylegen.embed`` end to end on the same images into a fresh index
  (hashing, decoding in worker processes, forward, Gram, checkpoints, PCA, FAISS, writes).
Prints img/s and the ratios. Reads ../shared/data/covers; exits with a message when absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"


def naive(paths: list[str]) -> float:
    from stylegen import backbones
    from stylegen.config import BackboneConfig

    bb = backbones.build(BackboneConfig())
    mean, std = np.array(bb.mean) * 255, np.array(bb.std) * 255
    t = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB").resize((bb.image_size, bb.image_size), Image.BILINEAR)
        x = torch.from_numpy(((np.asarray(img, np.float32) - mean) / std).transpose(2, 0, 1).copy())
        acts, _ = bb.forward(x[None].float())
        for a in acts.values():
            f = a[0].reshape(a.shape[1], -1).numpy()
            g = f @ f.T / f.shape[1]
            g = g[np.triu_indices(g.shape[0])]
            g = np.sign(g) * np.sqrt(np.abs(g))
            _ = g / np.linalg.norm(g)
    return len(paths) / (time.perf_counter() - t)


def forward_only(n: int, batch_size: int, precision: str, channels_last: bool, featurize: bool = False) -> float:
    from stylegen.config import EmbedConfig
    from stylegen.embed import load_featurizer

    feat = load_featurizer(EmbedConfig(), "cpu", precision, channels_last)
    pixels = np.random.default_rng(0).integers(0, 255, (batch_size, 224, 224, 3), dtype=np.uint8)
    x = feat.prepare(pixels)
    run = (lambda: feat(pixels)) if featurize else (lambda: _fwd(feat, x))
    for _ in range(3):  # oneDNN builds its kernels for each new shape over the first calls
        run()
    steps = max(1, n // batch_size)
    t = time.perf_counter()
    for _ in range(steps):
        run()
    return steps * batch_size / (time.perf_counter() - t)


def _fwd(feat, x):
    with feat._autocast():
        feat.backbone.forward(x)


def end_to_end(csv: Path, batch_size: int, workers: int, precision: str) -> tuple[float, float]:
    import stylegen

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        report = stylegen.embed(csv, Path(d) / "idx", batch_size=batch_size, workers=workers,
                                precision=precision, progress=False)
        wall = time.perf_counter() - t
    return report.added / wall, report.images_per_second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=None, help="default: stylegen's for the CPU")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: stylegen's choice)")
    ap.add_argument("--naive-n", type=int, default=96, help="images for the (slow) naive baseline")
    ap.add_argument("--sweep", action="store_true", help="also sweep precision, layout, batch, workers")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per measurement")
    args = ap.parse_args()
    if not COVERS.exists():
        sys.exit(f"skipped: real covers not found at {COVERS}")
    torch.manual_seed(0)
    if args.batch_size is None:
        from stylegen.embed import default_batch_size

        args.batch_size = default_batch_size("cpu")
    rows = pd.read_csv(COVERS).sample(args.n, random_state=0)
    rows["image"] = [str(COVERS.parent / p) for p in rows["image"]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n={args.n}, batch={args.batch_size}")
    with tempfile.TemporaryDirectory() as d:
        csv = Path(d) / "bench.csv"
        rows.to_csv(csv, index=False)
        forward_only(args.n // 4, args.batch_size, "bf16", True)  # warm the machine and oneDNN up
        results = {"naive (PIL, fp32, batch 1, numpy Gram)": naive(rows["image"].tolist()[: args.naive_n])}
        # forward-only and stylegen embed alternate, so drift of a shared machine hits both alike
        fwd, runs = [], []
        for _ in range(args.repeats):
            fwd.append(forward_only(args.n, args.batch_size, "bf16", True))
            runs.append(end_to_end(csv, args.batch_size, args.workers, "auto"))
        results["forward-only (bf16, channels-last)"] = max(fwd)
        results["stylegen embed, whole call"] = max(r[0] for r in runs)
        results["stylegen embed, embedding stage"] = max(r[1] for r in runs)
        paired = [r[0] / f for r, f in zip(runs, fwd, strict=True)]
        print(f"whole call / forward-only per repeat: {', '.join(f'{p:.0%}' for p in paired)}")
        if args.sweep:
            for prec in ("fp32", "bf16"):
                for cl in (False, True):
                    results[f"featurizer {prec} channels_last={cl}"] = forward_only(
                        args.n // 2, args.batch_size, prec, cl, featurize=True)
            for bs in sorted({8, 16, 32, 64} - {args.batch_size}):
                results[f"forward-only bf16 cl batch={bs}"] = forward_only(args.n // 2, bs, "bf16", True)
                results[f"featurizer bf16 cl batch={bs}"] = forward_only(args.n // 2, bs, "bf16", True, True)
                results[f"stylegen embed batch={bs}, whole call"] = end_to_end(csv, bs, args.workers, "auto")[0]
            for w in (0, 1, 2):
                results[f"stylegen embed workers={w}, whole call"] = end_to_end(csv, args.batch_size, w, "auto")[0]
    base, fwd = results["naive (PIL, fp32, batch 1, numpy Gram)"], results["forward-only (bf16, channels-last)"]
    print("\n| setting | img/s | x naive | / forward-only |\n|---|---:|---:|---:|")
    for name, v in results.items():
        print(f"| {name} | {v:.1f} | {v / base:.2f} | {v / fwd:.0%} |")


if __name__ == "__main__":
    main()
