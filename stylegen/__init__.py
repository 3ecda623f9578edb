"""stylegen: judge an album by its cover.

Style (Gram-matrix) and content features from a frozen backbone, indexed with FAISS,
for genre classification and similar-cover search.

The names below are imported on first use (module ``__getattr__``), so ``import stylegen``
and the CLI start without loading torch, scikit-learn or faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stylegen.util.versions import STYLEGEN_VERSION as __version__

# public name -> module that defines it
_LAZY = {
    "BackboneConfig": "stylegen.config",
    "CompressionConfig": "stylegen.config",
    "EmbedConfig": "stylegen.config",
    "FeatureConfig": "stylegen.config",
    "EmbedReport": "stylegen.index.ingest",
    "embed": "stylegen.index.ingest",
    "Index": "stylegen.index.store",
    "Engine": "stylegen.query.engine",
    "QueryResult": "stylegen.query.engine",
}

if TYPE_CHECKING:
    from stylegen.config import BackboneConfig, CompressionConfig, EmbedConfig, FeatureConfig
    from stylegen.index.ingest import EmbedReport, embed
    from stylegen.index.store import Index
    from stylegen.query.engine import Engine, QueryResult

__all__ = [
    "BackboneConfig",
    "CompressionConfig",
    "EmbedConfig",
    "EmbedReport",
    "Engine",
    "FeatureConfig",
    "Index",
    "QueryResult",
    "__version__",
    "embed",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stylegen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
