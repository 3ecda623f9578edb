"""stylegen: judge an album by its cover.

Style (Gram-matrix) and content features from a frozen backbone, indexed with FAISS,
for genre classification and similar-cover search.
"""

from __future__ import annotations

__version__ = "0.1.0"

from stylegen.config import BackboneConfig, CompressionConfig, EmbedConfig, FeatureConfig
from stylegen.embed import EmbedReport, embed
from stylegen.store import Index

__all__ = [
    "BackboneConfig",
    "CompressionConfig",
    "EmbedConfig",
    "EmbedReport",
    "FeatureConfig",
    "Index",
    "__version__",
    "embed",
]
