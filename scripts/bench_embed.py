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
