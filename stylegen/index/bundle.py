"""Model bundles: everything a genre query needs, as plain arrays and JSON, and nothing else.

A bundle is a folder::

    model.json          the model card: name, version, classes, training data and its terms,
                        cross-validated metrics, calibration, precision/coverage, rebuild command
    manifest.json       how a cover is embedded: backbone and weights hash, taps, preprocessing,
                        precision, feature settings, the vector space's ``feature_id``
    compressor.npz      the frozen compressor (PCA / random projection)
    heads/heads.json    the head set: labels, classes, taxonomy, default method
    heads/NAME.npz      compiled heads, plain arrays (kNN reference vectors in float16 where
    heads/NAME.json     that moves no probability by more than 1e-3) and their sidecars
    featurizer.onnx     optional: the exported featurizer, so a fresh install need not export
    featurizer.json     it before its first answer (with the spec it was exported for)

Opening one runs no code: only these files are read, each as data (JSON, ``.npz`` with
``allow_pickle=False``, an ONNX graph), and a bundle holding anything else (a pickle, a
script) is refused in one line. A bundle opens as an index with no covers (:func:`open_model`):
its heads answer genres; similar covers need an index of the user's own covers, which
``stylegen embed SRC --index DIR --model NAME`` builds in the bundle's vector space.

Bundles are found by path, or by name among the models shipped in the package
(``stylegen/data/models``) and the user's (``$STYLEGEN_MODELS``, else
``$XDG_DATA_HOME/stylegen/models``, else ``~/.local/share/stylegen/models``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from stylegen.errors import DataError, ModelNotFoundError
from stylegen.index.compress import Compressor
from stylegen.index.store import Index, empty_table

BUNDLE_FORMAT = 1
CARD = "model.json"
DEFAULT_MODEL = "covers-9genres"  # shipped in the package: scripts/build_default_model.py
ALLOWED_SUFFIXES = (".json", ".npz", ".onnx")


@dataclass(frozen=True)
class Model:
    """An opened bundle: an index of no covers in the bundle's vector space, its heads'
    folder, its card, and the shipped featurizer graph (None: export on first use)."""

    root: Path
    card: dict[str, Any]
    index: Index
    heads_dir: Path
    graph: Path | None

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.root.name))

    @property
    def feature_id(self) -> str:
        return self.index.feature_id


def packaged_models_dir() -> Path:
    return Path(str(resources.files("stylegen").joinpath("data", "models")))


def user_models_dir() -> Path:
    if os.environ.get("STYLEGEN_MODELS"):
        return Path(os.environ["STYLEGEN_MODELS"])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "stylegen" / "models"


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / CARD).is_file() and (path / "manifest.json").is_file()


def _named(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_bundle(p)) if folder.is_dir() else []


def find_model(name_or_path: str | Path | None = None) -> Path:
    """The bundle folder named (a path, or a name among the shipped and the user's models);
    None: the shipped default."""
    wanted = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    path = Path(wanted)
    if is_bundle(path):
        return path
    if path.exists() or os.sep in wanted or wanted.startswith("."):
        raise ModelNotFoundError(f"{wanted} is not a stylegen model (no {CARD} and manifest.json)")
    for folder in (user_models_dir(), packaged_models_dir()):
        if is_bundle(folder / wanted):
            return folder / wanted
    known = ", ".join(m["name"] for m in list_models()) or "none"
    hint = (" (the default model is not built into this checkout: run scripts/build_default_model.py)"
            if name_or_path is None else "")
    raise ModelNotFoundError(f"no stylegen model named {wanted!r} (installed: {known}){hint}")


def bundle_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models() -> list[dict[str, Any]]:
    """The installed models: ``name``, ``path``, ``size_bytes``, ``default`` (the shipped default)."""
    out, seen = [], set()
    for folder, shipped in ((user_models_dir(), False), (packaged_models_dir(), True)):
        for path in _named(folder):
            if path.name in seen:
                continue
            seen.add(path.name)
            out.append({"name": path.name, "path": str(path), "size_bytes": bundle_size(path),
                        "default": shipped and path.name == DEFAULT_MODEL})
    return out


def check_files(root: Path) -> None:
    """Refuse a bundle that holds anything but JSON, ``.npz`` and ONNX files (a pickle, a
    script, a link): stylegen reads nothing else, and nothing it reads can run code."""
    for f in sorted(root.rglob("*")):
        if f.is_symlink():
            raise DataError(f"model {root.name} holds a link ({f.relative_to(root)}); a model is plain files")
        if f.is_file() and f.suffix not in ALLOWED_SUFFIXES:
            raise DataError(f"model {root.name} holds {f.relative_to(root)}, which is not part of a stylegen "
                            "model (a pickle?); stylegen opens only .json, .npz and .onnx files")


def read_card(root: Path) -> dict[str, Any]:
    try:
        card = json.loads((root / CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"model {root.name}: cannot read {CARD}: {exc}") from None
    if not isinstance(card, dict) or card.get("bundle_format") != BUNDLE_FORMAT:
        raise DataError(f"model {root.name} has bundle format {card.get('bundle_format')!r}, "
                        f"not {BUNDLE_FORMAT}")
    return card


def open_model(name_or_path: str | Path | None = None) -> Model:
    """Open a bundle (:func:`find_model`): checked file by file, read as data only."""
    root = find_model(name_or_path)
    check_files(root)
    card = read_card(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        compressor = Compressor.load(root / "compressor.npz")
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"model {root.name} is damaged: {exc}") from None
    dim = int(manifest["dim"])
    index = Index(root, root, manifest, empty_table(), np.zeros((0, dim), np.float32), compressor,
                  faiss.IndexFlatIP(dim), _hashes={})
    graph = root / "featurizer.onnx"
    return Model(root, card, index, root / "heads", graph if graph.is_file() else None)


def model_entry(model: Model) -> dict[str, str]:
    """What an index made with ``model`` records of it (``manifest["model"]``)."""
    return {"name": model.name, "feature_id": model.feature_id}
