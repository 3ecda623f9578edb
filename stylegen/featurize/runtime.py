"""Run the featurizer: eager torch, or an exported graph on ONNX Runtime or OpenVINO.

Every runtime computes one function, uint8 (B, S, S, 3) pixels -> raw part vectors
(``style``: normalised Gram upper triangles of the tap layers; ``content``: the pooled,
normalised final embedding), so vectors from one runtime are interchangeable with another's
and an index built with one is queried with any.

* ``torch``: :class:`stylegen.featurize.features.Featurizer`, eager PyTorch (CUDA, or CPU with
  bf16 autocast where the CPU has AMX/AVX-512 bf16).
* ``onnx`` / ``openvino``: the EfficientNet-Lite backbone up to its content embedding with
  the input normalisation, the tap Gram matrices and the pooling inside the graph (measured
  faster than returning the tap activations and computing the Gram matrices in numpy:
  docs/benchmarks.md). The graph is traced from the same torch code as the eager path, once,
  and cached in :func:`cache_dir` under a key of everything that decides it (weights hash,
  taps, image size, feature settings, opset, exporter version); a change of any of them
  makes a new export. Serving a query from the cache imports neither torch nor scikit-learn.

``auto`` picks torch on a GPU and the fastest installed exported runtime on a CPU
(:data:`CPU_PREFERENCE`, measured on an AVX2-only AMD EPYC) that computes the precision asked
for (:func:`graph_precision`: an index made at bf16 stays at bf16), else torch.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stylegen.config import EmbedConfig, FeatureConfig
from stylegen.errors import StylegenError
from stylegen.featurize import backbones
from stylegen.featurize.backbones import BackboneInfo
from stylegen.util.persist import atomic_write, atomic_write_text
from stylegen.util.versions import package_version

if TYPE_CHECKING:
    from stylegen.featurize.features import Featurizer

RUNTIMES = ("auto", "torch", "onnx", "openvino")
EXPORTED = ("onnx", "openvino")
# The package each exported runtime needs.
RUNTIME_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}
# auto on a CPU: the first installed of these (measured order, docs/benchmarks.md).
CPU_PREFERENCE = ("onnx", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXPORT_FORMAT = 1  # bump when the graph's definition changes
OPSET = 17
INPUT = "pixels"


# ---- choices ------------------------------------------------------------------------
def installed(runtime: str) -> bool:
    """Whether an exported runtime's package can be imported (found, not imported)."""
    return importlib.util.find_spec(RUNTIME_PACKAGES[runtime]) is not None


def _may_have_cuda() -> bool:
    """A cheap test for an NVIDIA driver, so a CPU-only machine never imports torch to ask."""
    if sys.platform.startswith("linux"):
        return Path("/proc/driver/nvidia/version").exists()
    if sys.platform == "win32":
        return ctypes.util.find_library("nvcuda") is not None
    return False


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA GPU, else ``cpu``; others are checked."""
    if device == "auto":
        if not _may_have_cuda():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise StylegenError("--device cuda asked for, but no CUDA GPU is available")
    elif device != "cpu":
        raise StylegenError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on GPUs (fp16 where bf16 is missing) and on CPUs with AVX-512 bf16/AMX,
    else fp32."""
    if precision not in PRECISIONS:
        raise StylegenError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def graph_precision(runtime: str, precision: str) -> str | None:
    """What an exported ``runtime`` computes when ``precision`` is asked for (None: it cannot).

    ONNX Runtime computes fp32; OpenVINO computes bf16 where the CPU has it. ``auto`` means
    the runtime's own best: fp32, or bf16 on OpenVINO on a bf16 CPU."""
    if precision not in PRECISIONS:
        raise StylegenError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bf16 = runtime == "openvino" and cpu_has_bf16()
    if precision == "auto":
        return "bf16" if bf16 else "fp32"
    if precision == "fp32" or (precision == "bf16" and bf16):
        return precision
    return None


def resolve_runtime(runtime: str, device: str, config: EmbedConfig, precision: str = "auto") -> str:
    """The runtime that will run ``config``'s featurizer on ``device`` at ``precision`` (see
    module doc). ``auto`` leaves out an exported runtime that cannot compute an asked-for
    precision (e.g. adding to a bf16 index made on an AMX CPU: torch computes bf16 there)."""
    if runtime not in RUNTIMES:
        raise StylegenError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    on_cpu = device == "cpu"
    exportable = backbones.exportable(config.backbone)
    if runtime == "auto":
        if not (on_cpu and exportable):
            return "torch"
        return next((r for r in CPU_PREFERENCE if installed(r) and graph_precision(r, precision)), "torch")
    if runtime in EXPORTED:
        if not on_cpu:
            raise StylegenError(f"--runtime {runtime} runs on the CPU; use --device cpu or --runtime torch")
        if not installed(runtime):
            raise StylegenError(f"--runtime {runtime} needs its package: pip install {RUNTIME_PACKAGES[runtime]}")
        if not exportable:
            raise StylegenError(f"{config.backbone.name} runs on torch only; use --runtime torch")
        if graph_precision(runtime, precision) is None:
            raise StylegenError(f"--runtime {runtime} cannot compute {precision} on this CPU"
                                f" (it computes {graph_precision(runtime, 'auto')}); use --runtime torch")
    return runtime


# ---- the user's cache ---------------------------------------------------------------
def cache_dir() -> Path:
    """``$STYLEGEN_CACHE``, else ``$XDG_CACHE_HOME/stylegen``, else ``~/.cache/stylegen``."""
    if os.environ.get("STYLEGEN_CACHE"):
        return Path(os.environ["STYLEGEN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stylegen"


def cached_sha256(path: str | Path) -> str:
    """:func:`backbones.file_sha256`, remembered in the cache per (path, size, mtime)."""
    st = Path(path).stat()
    key = hashlib.sha1(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / "hashes" / key
    with contextlib.suppress(OSError):
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    digest = backbones.file_sha256(path)
    with contextlib.suppress(OSError):  # a read-only cache is fine
        atomic_write_text(memo, digest)
    return digest


def export_spec(info: BackboneInfo, features: FeatureConfig) -> dict[str, Any]:
    """Everything that decides the exported graph (its cache key is a hash of this)."""
    return {
        "format": EXPORT_FORMAT,
        "opset": OPSET,
        "exporter": {"torch": package_version("torch"),
                     "efficientnet-lite-pytorch": package_version("efficientnet-lite-pytorch")},
        "backbone": {"name": info.name, "weights_id": info.weights_id, "taps": list(info.taps),
                     "preprocess": info.preprocess.to_dict()},
        "features": {"parts": list(features.parts), "signed_sqrt": features.signed_sqrt,
                     "max_gram_channels": features.max_gram_channels},
    }


def export_path(spec: dict[str, Any]) -> Path:
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "exports" / f"{spec['backbone']['name']}-{key}.onnx"


# ---- export -------------------------------------------------------------------------
def export_onnx(config: EmbedConfig, path: Path) -> Path:
    """Trace the featurizer of ``config`` (normalisation, backbone, Gram matrices, pooling)
    into an ONNX graph at ``path``: input ``pixels`` uint8 (B, S, S, 3), one output per part.

    Needs torch (and the ``onnx`` package); written atomically.
    """
    from stylegen.featurize.features import part_vectors

    features = config.features

    def outputs(acts: dict, content: Any, projections: dict) -> tuple:
        return tuple(part_vectors(acts, content, features, projections).values())

    return export_graph(backbones.build(config.backbone), features.max_gram_channels, outputs,
                        list(features.parts), path)


def export_graph(bb: Any, max_channels: int | None, outputs: Callable[[dict, Any, dict], tuple],
                 names: list[str], path: Path) -> Path:
    """Trace ``outputs(tap activations, content, projections)`` over backbone ``bb`` into an ONNX
    graph at ``path``: input ``pixels`` uint8 (B, S, S, 3) normalised in the graph, the outputs
    named ``names``, batch size dynamic. ``projections`` maps the channel count of each tap wider
    than ``max_channels`` to its fixed :func:`features.channel_projection`, kept as a constant.
    Written atomically.
    """
    import torch

    from stylegen.featurize.features import channel_projection

    size = bb.image_size
    with torch.no_grad():  # the taps' widths, and the projections of the wide ones
        acts, _ = bb.forward(torch.zeros(1, 3, size, size))
    wide = {int(a.shape[1]) for a in acts.values() if max_channels and a.shape[1] > max_channels}

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = bb.model  # registered, so its weights become the graph's constants
            self.register_buffer("mean", torch.tensor(bb.mean).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(bb.std).view(1, 3, 1, 1) * 255)
            for c in wide:
                self.register_buffer(f"projection{c}", channel_projection(c, max_channels))

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
            acts, content = bb.forward(x)
            return outputs(acts, content, {c: getattr(self, f"projection{c}") for c in wide})

    def export(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints: shapes are static
            torch.onnx.export(
                Graph().eval(), (torch.zeros(2, size, size, 3, dtype=torch.uint8),), str(tmp),
                input_names=[INPUT], output_names=names, opset_version=OPSET, dynamo=False,
                dynamic_axes={INPUT: {0: "batch"}, **{n: {0: "batch"} for n in names}},
            )

    return atomic_write(path, export)


def ensure_export(config: EmbedConfig, info: BackboneInfo) -> Path:
    """The cached ONNX graph for ``config``, exported first when missing or stale."""
    spec = export_spec(info, config.features)
    path = export_path(spec)
    if not path.is_file():
        export_onnx(config, path)
        atomic_write_text(path.with_suffix(".json"), json.dumps(spec, indent=2, sort_keys=True))
    return path


def graph_for(config: EmbedConfig) -> Path:
    """The exported graph of ``config`` (exported now when not cached), e.g. to ship with a model."""
    return ensure_export(config, backbones.describe(config.backbone, weights_id=cached_sha256))


# ---- exported runtimes --------------------------------------------------------------
@dataclass(frozen=True)
class CPU:
    """The device of an exported runtime (``.type`` like ``torch.device``)."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


def _onnx_session(path: Path, threads: int | None) -> Callable[[np.ndarray], list[np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    # idle pool threads must not spin between calls: they would steal the cores from
    # decoding, numpy and the heads (as torch's did from numpy's BLAS, docs/benchmarks.md)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda px: session.run(None, {INPUT: px})


def _openvino_session(path: Path, threads: int | None, precision: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    import openvino as ov

    core = ov.Core()
    props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                             "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                             "CACHE_DIR": str(cache_dir() / "openvino")}
    if threads:
        props["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(str(path), "CPU", props)
    request = compiled.create_infer_request()

    def run(px: np.ndarray) -> list[np.ndarray]:
        out = request.infer({0: px})
        return [np.array(out[o]) for o in compiled.outputs]  # copies: the request reuses its buffers

    return run


@dataclass
class GraphFeaturizer:
    """The exported featurizer: same inputs and outputs as :class:`features.Featurizer`.

    ``backbone`` describes the network (name, taps, preprocessing, weights hash);
    ``runtime`` is ``onnx`` or ``openvino``; ``precision`` what the graph computes in.
    """

    backbone: BackboneInfo
    config: FeatureConfig
    runtime: str
    precision: str
    run: Callable[[np.ndarray], list[np.ndarray]]
    device: CPU = CPU()
    channels_last: bool = False

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Raw part vectors (float32) for a batch of uint8 HWC images."""
        px = np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8))
        n = len(px)
        if self.config.flip:  # the image and its mirror image in one batch, averaged
            px = np.concatenate([px, np.ascontiguousarray(px[:, :, ::-1])])
        out = dict(zip(self.config.parts, self.run(px), strict=True))
        if self.config.flip:
            out = {k: (v[:n] + v[n:]) / 2 for k, v in out.items()}
        return {k: np.asarray(v, np.float32) for k, v in out.items()}


def shipped_graph_fits(graph: Path, spec: dict[str, Any]) -> bool:
    """Whether an exported graph shipped with a model (``graph`` plus its ``.json`` spec)
    computes the function ``spec`` describes: the same weights, taps, preprocessing and
    features (which torch exported it does not matter)."""
    try:
        shipped = json.loads(graph.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    wanted = json.loads(json.dumps(spec))  # as the spec file holds it (lists, not tuples)
    return {k: v for k, v in shipped.items() if k != "exporter"} == {k: v for k, v in wanted.items() if k != "exporter"}


def load_graph_featurizer(config: EmbedConfig, runtime: str, precision: str = "auto",
                          threads: int | None = None, graph: Path | None = None) -> GraphFeaturizer:
    """The exported featurizer of ``config`` on ``runtime``: ``graph`` (shipped with a model)
    when it computes the same function, else the cached export (made on first use)."""
    prec = graph_precision(runtime, precision)
    if prec is None:
        raise StylegenError(f"{runtime} cannot compute {precision} on this CPU; use the torch runtime")
    info = backbones.describe(config.backbone, weights_id=cached_sha256)
    spec = export_spec(info, config.features)
    path = graph if graph is not None and shipped_graph_fits(graph, spec) else ensure_export(config, info)
    run = _onnx_session(path, threads) if runtime == "onnx" else _openvino_session(path, threads, prec)
    return GraphFeaturizer(backbone=info, config=config.features, runtime=runtime, precision=prec, run=run)


def load_featurizer(config: EmbedConfig, device: str = "auto", precision: str = "auto",
                    channels_last: bool = True, runtime: str = "auto",
                    graph: Path | None = None) -> Featurizer | GraphFeaturizer:
    """The featurizer ``config`` describes, on the runtime chosen by :func:`resolve_runtime`.

    Both kinds are called alike (uint8 batch in, raw part vectors out) and expose
    ``runtime``, ``precision``, ``device.type`` and ``backbone`` (name, taps, preprocess,
    weights_id).
    """
    dev = resolve_device(device)
    chosen = resolve_runtime(runtime, dev, config, precision)
    if chosen in EXPORTED:
        try:
            return load_graph_featurizer(config, chosen, precision, graph=graph)
        except ImportError as exc:  # the exporter's ``onnx`` package is missing
            if runtime != "auto":
                raise StylegenError(f"cannot export the featurizer for {chosen}: {exc}") from None
            warnings.warn(f"falling back to torch: cannot export the featurizer ({exc})", stacklevel=2)
    import torch

    from stylegen.featurize.features import Featurizer

    return Featurizer(backbone=backbones.build(config.backbone), config=config.features,
                      device=torch.device(dev), precision=resolve_precision(precision, dev),
                      channels_last=channels_last, runtime="torch")
