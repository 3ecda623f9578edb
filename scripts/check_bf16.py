#!/usr/bin/env python
"""What a bf16 setting does on this CPU (issue 24): OpenVINO asked for bf16, and torch bf16
autocast (the fallback for a bf16 index where no exported runtime computes bf16), against
ONNX Runtime fp32, at 320 px, batch 16. Prints the CPU line (model, flags, load average).

    python scripts/check_bf16.py          # needs the openvino extra: pip install -e '.[openvino]'
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_coldstart import cpu_line  # noqa: E402


def main() -> None:
    import openvino as ov

    from stylegen.config import BackboneConfig, EmbedConfig
    from stylegen.featurize import runtime

    cfg = EmbedConfig(backbone=BackboneConfig(image_size=320))
    print(cpu_line())
    path = runtime.ensure_export(cfg, runtime.backbones.describe(cfg.backbone, weights_id=runtime.cached_sha256))
    core = ov.Core()
    print("OpenVINO CPU OPTIMIZATION_CAPABILITIES:", core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    px = np.random.default_rng(0).integers(0, 255, (16, 320, 320, 3), dtype=np.uint8)
    outs = {}
    for hint in ("f32", "bf16"):
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        request.infer({0: px})
        t = time.perf_counter()
        for _ in range(4):
            out = request.infer({0: px})
        rate = 64 / (time.perf_counter() - t)
        outs[hint] = [np.array(out[o]) for o in compiled.outputs]
        print(f"OpenVINO asked for {hint}: compiled at {compiled.get_property('INFERENCE_PRECISION_HINT')}, {rate:.1f} img/s")
    for part, a, b in zip(cfg.features.parts, outs["f32"], outs["bf16"], strict=True):
        print(f"  {part}: max |bf16 - f32| = {np.abs(a - b).max():.3g}")
    for name, feat in (("torch bf16 autocast", runtime.load_featurizer(cfg, "cpu", "bf16", runtime="torch")),
                       ("ONNX Runtime fp32", runtime.load_featurizer(cfg, "cpu", "fp32", runtime="onnx"))):
        feat(px)
        t = time.perf_counter()
        for _ in range(2):
            feat(px)
        print(f"{name} ({feat.precision}): {32 / (time.perf_counter() - t):.1f} img/s")
    print(cpu_line())


if __name__ == "__main__":
    main()
