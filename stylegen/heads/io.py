"""Save and load fitted heads: a joblib file plus a JSON sidecar naming what it was fitted on,
and the head's compiled form (``<path>.predict.npz``, :mod:`stylegen.heads.compiled`).

The sidecar ``<path>.json`` records the head's class, parameters, classes and the caller's
``feature_id`` (which vectors it was fitted on), so a head can be checked without unpickling.
:func:`load_head` unpickles the estimator (only load files you trust; it needs scikit-learn,
and torch for heads saved before the MLP kept numpy weights); :func:`load_predictor` loads
the compiled form, plain arrays, with neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stylegen.errors import DataError, IndexMismatchError, ModelNotFoundError
from stylegen.heads.compiled import Compiled, load_compiled, save_compiled, saveable
from stylegen.util.persist import VersionedFolder, atomic_write

FORMAT = 1
HEADS_DIR = "heads"  # an index's head sets: DIR/heads/set-N/ named in DIR/heads/CURRENT


def head_sets(root: str | Path) -> VersionedFolder:
    """The head sets of the index at ``root``: ``DIR/heads/set-NNNNNN`` named in ``DIR/heads/CURRENT``."""
    return VersionedFolder(Path(root) / HEADS_DIR, "set-")


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def compiled_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".predict.npz")


def _jsonable(value: Any) -> Any:
    """Parameters as JSON: plain values kept, estimators nested, anything else by type name."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "get_params"):  # an estimator
        return {"class": type(value).__name__, "params": _params(value)}
    return f"<{type(value).__name__}>"


def _params(head: Any) -> dict[str, Any]:
    return {k: _jsonable(v) for k, v in head.get_params(deep=False).items()}


def save_head(head: Any, path: str | Path, *, feature_id: str | None = None) -> Path:
    """Write ``head`` to ``path``, its compiled form to ``<path>.predict.npz`` (heads with
    ``compile``) and its sidecar to ``<path>.json``; returns ``path``."""
    import joblib
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    path = Path(path)
    try:
        check_is_fitted(head)
    except NotFittedError as exc:
        raise DataError(f"cannot save an unfitted {type(head).__name__}") from exc
    info = {
        "format": FORMAT,
        "head": type(head).__name__,
        "module": type(head).__module__,
        "params": _params(head),
        "classes": [str(c) for c in head.classes_],
        "feature_id": feature_id,
    }
    atomic_write(path, lambda tmp: joblib.dump(head, tmp))
    compiled = head.compile() if hasattr(head, "compile") else None
    if saveable(compiled):
        atomic_write(compiled_path(path), lambda tmp: save_compiled(compiled, tmp))
    else:  # e.g. an ensemble around a plain scikit-learn pipeline: the pickle serves queries
        compiled_path(path).unlink(missing_ok=True)
    text = json.dumps(info, indent=2)
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_head_info(path: str | Path) -> dict[str, Any]:
    """The sidecar of the head saved at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no head at {path}")
    try:
        return json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"head {path} has no sidecar {sidecar_path(path).name}") from exc
    except ValueError as exc:
        raise DataError(f"sidecar of head {path} is not valid JSON: {exc}") from exc


def _checked_info(path: Path, expect_feature_id: str | None) -> dict[str, Any]:
    info = read_head_info(path)
    if expect_feature_id is not None and info.get("feature_id") != expect_feature_id:
        raise IndexMismatchError(f"head {path} was fitted on features {info.get('feature_id')!r}, "
                                 f"not {expect_feature_id!r}")
    return info


def load_head(path: str | Path, *, expect_feature_id: str | None = None) -> Any:
    """Load a head saved by :func:`save_head`.

    With ``expect_feature_id``, a head fitted on other vectors raises IndexMismatchError
    before anything is unpickled.
    """
    import joblib

    path = Path(path)
    info = _checked_info(path, expect_feature_id)
    try:
        head = joblib.load(path)
    except Exception as exc:  # a truncated or foreign file: report it in one line
        raise DataError(f"cannot read head {path}: {type(exc).__name__}: {exc}") from exc
    classes = [str(c) for c in getattr(head, "classes_", [])]
    if type(head).__name__ != info.get("head") or classes != info.get("classes"):
        raise DataError(f"head {path} does not match its sidecar (saved by another run?)")
    return head


def load_predictor(path: str | Path, *, expect_feature_id: str | None = None) -> Compiled | Any:
    """What the query path predicts with: the compiled form of the head saved at ``path``
    (no scikit-learn, no torch), or the unpickled head when it has none (older head sets)."""
    path = Path(path)
    info = _checked_info(path, expect_feature_id)
    if not compiled_path(path).is_file():
        return load_head(path, expect_feature_id=expect_feature_id)
    head = load_compiled(compiled_path(path))
    if [str(c) for c in head.classes_] != info.get("classes"):
        raise DataError(f"head {path} does not match its sidecar (saved by another run?)")
    return head


def read_head_set(root: str | Path) -> dict[str, Any]:
    """``heads.json`` of the live head set, with ``"dir"``: the folder holding its files."""
    base = Path(root) / HEADS_DIR
    folder = head_sets(root).current() or base  # before sets: flat
    path = folder / "heads.json"
    if not path.is_file():
        raise ModelNotFoundError(f"no trained heads in {root} (run `stylegen train --index {root}`)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    return {**config, "dir": str(folder)}


def write_head_set(root: str | Path, heads: dict[str, Any], config: dict[str, Any], feature_id: str) -> Path:
    """Write the heads and ``heads.json`` as one set, all or nothing.

    The set is written whole under a temporary name, renamed to ``set-NNNNNN`` and only then
    named in ``DIR/heads/CURRENT`` (:class:`~stylegen.util.persist.VersionedFolder`). A run
    that dies part-way leaves the previous heads in use, unchanged.
    """
    def fill(tmp: Path) -> None:
        for head_name, head in heads.items():
            save_head(head, tmp / f"{head_name}.joblib", feature_id=feature_id)
        (tmp / "heads.json").write_text(json.dumps(config, indent=1))

    sets = head_sets(root)
    final = sets.commit(fill)
    # heads saved flat in DIR/heads by stylegen before head sets existed (their own names)
    for old in [*sets.base.glob("*.joblib"), *sets.base.glob("*.joblib.json"),
                *sets.base.glob("*.joblib.predict.npz"), sets.base / "heads.json"]:
        if old.is_file():
            old.unlink()
    return final
