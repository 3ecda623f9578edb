"""Frozen settings for each stage, with a JSON round-trip.

The manifest of an index stores these, so a query is always embedded exactly like
the collection it is compared with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PARTS = ("style", "content")
RESIZE_FILTERS = ("bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes the backbone's input; it belongs to the backbone and is
    stored in the index's manifest, so the collection and every query are decoded alike.

    JPEGs are decoded in draft mode at the smallest scale whose shorter side is at least
    ``size`` (when ``draft``), the shorter side is resized to ``size`` with ``resize_filter``,
    the centre ``size`` x ``size`` square is cropped, and channels are normalised with
    ``(x / 255 - mean) / std``. ``trim_border``: uniform frames and letterbox bars are cut
    off first (:func:`stylegen.sources.images.trim_border`); written to the manifest only
    when on, so indexes made before it existed keep their decoding (and their ids).
    """

    size: int = 224
    resize_filter: str = "bilinear"
    draft: bool = True
    crop: str = "center"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    trim_border: bool = False

    def __post_init__(self) -> None:
        if self.resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"resize_filter must be one of {RESIZE_FILTERS}, got {self.resize_filter!r}")
        if self.crop != "center":
            raise ValueError(f"crop must be 'center', got {self.crop!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.trim_border:  # absent means off: older manifests, shard and graph ids stay valid
            del d["trim_border"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        d = dict(data)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


@dataclass(frozen=True)
class BackboneConfig:
    """Which network reads the images and where its weights come from.

    ``name`` is a registry key (``efficientnet-lite0``) or ``open_clip:ARCH``.
    ``weights`` is a local file, a pretrained tag (open_clip, needs a hub) or
    ``None`` for the packaged default (EfficientNet-Lite) / random init (open_clip).
    ``taps`` overrides the backbone's default style layers.
    """

    name: str = "efficientnet-lite0"
    weights: str | None = None
    taps: tuple[str, ...] | None = None
    image_size: int | None = None


@dataclass(frozen=True)
class FeatureConfig:
    """What goes into a cover's vector.

    ``parts``: ``style`` (Gram matrices of the tap layers) and/or ``content``
    (pooled final embedding); ``weights`` scale each part after normalisation;
    ``flip`` averages the raw features of the image and its mirror image;
    layers wider than ``max_gram_channels`` are projected to that width first.
    """

    parts: tuple[str, ...] = ("style", "content")
    weights: dict[str, float] = field(default_factory=lambda: {"style": 1.0, "content": 1.0})
    signed_sqrt: bool = True
    flip: bool = False
    max_gram_channels: int = 128

    def __post_init__(self) -> None:
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {self.parts}")


@dataclass(frozen=True)
class CompressionConfig:
    """How each part is reduced before indexing: ``pca`` (optionally whitened),
    ``rp`` (Gaussian random projection, for very large collections) or ``none``.
    ``dims`` is the output size per part (capped by the number of images)."""

    method: str = "pca"
    dims: dict[str, int] = field(default_factory=lambda: {"style": 256, "content": 256})
    whiten: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("pca", "rp", "none"):
            raise ValueError(f"compression method must be pca, rp or none, got {self.method!r}")


@dataclass(frozen=True)
class EmbedConfig:
    """Everything that decides a vector: backbone, features, compression."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedConfig:
        bb = dict(data.get("backbone", {}))
        if bb.get("taps") is not None:
            bb["taps"] = tuple(bb["taps"])
        ft = dict(data.get("features", {}))
        if "parts" in ft:
            ft["parts"] = tuple(ft["parts"])
        return cls(
            backbone=BackboneConfig(**bb),
            features=FeatureConfig(**ft),
            compression=CompressionConfig(**data.get("compression", {})),
        )


# EfficientNet-Lite0 read at 320 px instead of its native 224: +0.02 accuracy on the covers with
# the same 512-d vectors (5-fold artist-disjoint CV, docs/results.md), for ~2x the forward cost.
DEFAULT_IMAGE_SIZE = 320


def default_config() -> EmbedConfig:
    """What a new index gets when nothing is asked for: the default backbone at
    :data:`DEFAULT_IMAGE_SIZE`. (``EmbedConfig()`` keeps the backbone's native input size.)"""
    return EmbedConfig(backbone=BackboneConfig(image_size=DEFAULT_IMAGE_SIZE))
