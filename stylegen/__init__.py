"""stylegen: judge an album by its cover.

Style (Gram-matrix) and content features from a frozen backbone, indexed with FAISS,
for genre classification and similar-cover search.

The names below are imported on first use (module ``__getattr__``), so ``import stylegen``
and the CLI start without loading torch, scikit-learn or faiss.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "BackboneConfig": "stylegen.config",
    "CompressionConfig": "stylegen.config",
    "EmbedConfig": "stylegen.config",
    "FeatureConfig": "stylegen.config",
    "EmbedReport": "stylegen.embed",
    "Index": "stylegen.store",
}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stylegen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """``stylegen.embed`` is the function, as when this package imported it eagerly.

    Importing the submodule ``stylegen.embed`` makes the import system bind the module to
    the package's ``embed`` attribute; this property keeps answering with the function.
    """

    @property
    def embed(self) -> Any:
        return importlib.import_module("stylegen.embed").embed

    @embed.setter
    def embed(self, _module: types.ModuleType) -> None:
        pass


sys.modules[__name__].__class__ = _Package
