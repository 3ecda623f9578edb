"""Style (Gram) and content vectors from backbone activations.

For each tap layer with feature map F (C x HW): G = F Fᵀ / (H·W), keep the upper
triangle, apply the signed square root and L2-normalise. The style part is the
concatenation of the layers' vectors, each scaled by 1/sqrt(#layers) so the part
has unit norm. The content part is the L2-normalised pooled final embedding.

These functions are written once, in torch, and serve both runtimes: the eager
:class:`Featurizer` calls them, and :mod:`stylegen.featurize.runtime` traces them into the exported
graph (so ONNX Runtime / OpenVINO compute the same function). Shapes other than the batch
are read as Python ints so that a traced graph keeps a dynamic batch. torch is imported
inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stylegen.config import FeatureConfig
from stylegen.featurize.backbones import Backbone

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor


def gram_upper(acts: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C(C+1)/2): upper triangle of F Fᵀ / (H·W), in float32."""
    import torch

    c = int(acts.shape[1])
    f = acts.flatten(2).float()
    g = torch.matmul(f, f.transpose(1, 2)) / int(f.shape[-1])
    iu = torch.triu_indices(c, c, device=g.device)
    return g.flatten(1)[:, iu[0] * c + iu[1]]


def signed_sqrt(x: Tensor) -> Tensor:
    import torch

    return torch.sign(x) * torch.sqrt(torch.abs(x))


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def channel_projection(channels: int, out: int, seed: int = 0) -> Tensor:
    """A fixed (out x channels) matrix with orthonormal rows, reproducible from the seed.

    Wide layers (e.g. 1024 channels: 524k Gram entries) are first projected to ``out``
    channels; P F (P F)ᵀ = P G Pᵀ is a sketch of the full Gram matrix.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + channels)
    q, _ = torch.linalg.qr(torch.randn(channels, out, generator=gen))
    return q.T.contiguous()


def style_vector(
    acts: dict[str, Tensor], use_signed_sqrt: bool = True, max_channels: int | None = None,
    projections: Mapping[int, Tensor] | None = None,
) -> Tensor:
    """Concatenate per-layer normalised Gram vectors into one unit-norm style vector.

    ``projections`` maps a channel count to its :func:`channel_projection` when the caller
    holds them already (a traced graph keeps them as constants).
    """
    import torch

    parts = []
    for a in acts.values():
        channels = int(a.shape[1])
        if max_channels and channels > max_channels:
            p = (projections or {}).get(channels)
            if p is None:
                p = channel_projection(channels, max_channels)
            p = p.to(a.device)
            a = torch.einsum("oc,bchw->bohw", p, a.float())
        g = gram_upper(a)
        if use_signed_sqrt:
            g = signed_sqrt(g)
        parts.append(l2_normalize(g))
    return torch.cat(parts, dim=1) / len(parts) ** 0.5


def part_vectors(acts: dict[str, Tensor], content: Tensor, config: FeatureConfig,
                 projections: Mapping[int, Tensor] | None = None) -> dict[str, Tensor]:
    """The raw part vectors (float32) from one forward pass's tap activations and content."""
    out: dict[str, Tensor] = {}
    if "style" in config.parts:
        out["style"] = style_vector(acts, config.signed_sqrt, config.max_gram_channels, projections)
    if "content" in config.parts:
        out["content"] = l2_normalize(content.float())
    return out


@dataclass
class Featurizer:
    """Backbone + feature settings: normalised uint8 batches in, raw part vectors out.

    ``precision`` is ``fp32`` or ``bf16``/``fp16`` (autocast; Gram matrices are
    always accumulated in float32).
    """

    backbone: Backbone
    config: FeatureConfig
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    runtime: str = "torch"

    def __post_init__(self) -> None:
        import torch

        self.backbone.to(self.device, channels_last=self.channels_last)
        self._mean = torch.tensor(self.backbone.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(self.backbone.std, device=self.device).view(1, 3, 1, 1) * 255

    def prepare(self, pixels: np.ndarray | Tensor) -> Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W) on the device."""
        import torch

        x = torch.as_tensor(pixels).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def __call__(self, pixels: np.ndarray | Tensor) -> dict[str, np.ndarray]:
        """Raw part vectors (float32 numpy) for a batch of uint8 HWC images."""
        import torch

        with torch.inference_mode():
            x = self.prepare(pixels)
            out = self._parts(x)
            if self.config.flip:
                flipped = self._parts(torch.flip(x, dims=[3]))
                out = {k: (v + flipped[k]) / 2 for k, v in out.items()}
            return {k: v.float().cpu().numpy() for k, v in out.items()}

    def _parts(self, x: Tensor) -> dict[str, Tensor]:
        with self._autocast():
            acts, content = self.backbone.forward(x)
        return part_vectors(acts, content, self.config)
