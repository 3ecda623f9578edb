"""Installed package versions, read from their metadata (importing a package to ask its
version would load torch for a manifest line)."""

from __future__ import annotations

import importlib.metadata

STYLEGEN_VERSION = "0.1.0"  # the package's version (pyproject.toml reads it from here)


def package_version(package: str) -> str | None:
    """An installed distribution's version without importing it (None: not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
