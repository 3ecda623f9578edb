#!/usr/bin/env python
"""Does int8 (static quantization) pay for the ONNX Runtime featurizer on this CPU?

    python scripts/research_int8.py --index indexes/covers [--calib 200] [--n 128]

Quantizes the product's cached ONNX graph (``stylegen.featurize.runtime.ensure_export``: normalisation,
backbone, Gram matrices) with ONNX Runtime's static quantization (QDQ, per-channel int8
weights, uint8 activations), calibrated on ``--calib`` real covers; only the convolutions are
quantized, the Gram products stay in float. Then, in one run and interleaved, times the
forward pass of fp32 and int8 on ``--n`` other covers (batch 16) and compares their part
vectors (cosine per vector). int8 is worth a cross-validated accuracy check only when it is
clearly faster here; the CPU's flags (VNNI decides how fast int8 convolutions run) are printed
beside the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_coldstart import cpu_line

ROOT = Path(__file__).resolve().parents[1]
COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("indexes/covers"))
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not COVERS.is_file():
        raise SystemExit(f"real covers not found at {COVERS} (../shared/data)")

    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from stylegen.featurize import runtime
    from stylegen.featurize.backbones import describe
    from stylegen.index.store import Index
    from stylegen.sources import images

    index = Index.open(args.index, use_gpu=False)
    config = index.config
    fp32 = runtime.ensure_export(config, describe(config.backbone, weights_id=runtime.cached_sha256))
    rows = pd.read_csv(COVERS).sample(frac=1.0, random_state=0)
    paths = [str(COVERS.parent / p) for p in rows["image"]]
    calib, test = paths[:args.calib], paths[args.calib:args.calib + args.n]
    spec = index.preprocess

    def batches(ps: list[str], size: int = 16) -> list[np.ndarray]:
        return [np.stack([images.prepare(p, spec) for p in ps[i:i + size]]) for i in range(0, len(ps), size)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"pixels": b} for b in batches(calib))

        def get_next(self):
            return next(self.it, None)

    work = runtime.cache_dir() / "research"
    work.mkdir(parents=True, exist_ok=True)
    pre, int8 = work / "fp32-pre.onnx", work / "int8.onnx"
    t = time.perf_counter()
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    print(f"quantized in {time.perf_counter() - t:.0f} s ({args.calib} calibration covers)")

    def session(path: Path) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = os.cpu_count() or 1
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sessions = {"fp32": session(fp32), "int8": session(int8)}
    data = batches(test)
    outputs = {k: [s.run(None, {"pixels": b}) for b in data] for k, s in sessions.items()}  # warm-up
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.repeats):
        for k, s in sessions.items():  # interleaved: drift hits both alike
            t = time.perf_counter()
            for b in data:
                s.run(None, {"pixels": b})
            times[k].append(len(test) / (time.perf_counter() - t))
    print(cpu_line())
    for k, v in times.items():
        print(f"{k}: forward {statistics.median(v):.1f} img/s (median of {len(v)}; {', '.join(f'{x:.1f}' for x in v)})")
    print(f"int8 / fp32 speed: {statistics.median(times['int8']) / statistics.median(times['fp32']):.2f}x")
    names = [o.name for o in sessions["fp32"].get_outputs()]
    for j, name in enumerate(names):
        a = np.concatenate([o[j] for o in outputs["fp32"]])
        b = np.concatenate([o[j] for o in outputs["int8"]])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"{name}: cosine int8 vs fp32 min {cos.min():.4f}, median {np.median(cos):.4f}")
    print(f"sizes: fp32 {fp32.stat().st_size / 1e6:.1f} MB, int8 {int8.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
