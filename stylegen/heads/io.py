"""Save and load fitted heads: plain arrays a query can load without running anyone's code.

A head set stores each head as its compiled form ``NAME.npz`` (:mod:`stylegen.heads.compiled`:
plain arrays and a JSON layout, read with ``allow_pickle=False``) and a sidecar ``NAME.json``
naming its class, parameters, classes and the ``feature_id`` of the vectors it was fitted on.
That is all a query opens: loading an index or model someone shared never unpickles.

The fitted estimator itself (scikit-learn, for notebooks and research) is written only when
asked (``save_head(..., pickle=True)``: ``NAME.joblib``) and read only by :func:`load_head`,
which no stylegen command calls: unpickling runs code, so open only files you made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stylegen.errors import DataError, IndexMismatchError, ModelNotFoundError
from stylegen.heads.compiled import Compiled, load_compiled, save_compiled, saveable
from stylegen.util.persist import VersionedFolder, atomic_write

FORMAT = 2  # 2: NAME.npz + NAME.json, no pickle; 1: NAME.joblib (+ .joblib.predict.npz, .joblib.json)
HEADS_DIR = "heads"  # an index's head sets: DIR/heads/set-N/ named in DIR/heads/CURRENT
TRAIN_HASHES = "train_hashes.npz"  # a model's heads: content hashes of the covers they were fitted on


def head_sets(root: str | Path) -> VersionedFolder:
    """The head sets of the index at ``root``: ``DIR/heads/set-NNNNNN`` named in ``DIR/heads/CURRENT``."""
    return VersionedFolder(Path(root) / HEADS_DIR, "set-")


def sidecar_path(path: str | Path) -> Path:
    """``NAME.json`` beside the compiled head ``NAME.npz``."""
    return Path(path).with_suffix(".json")


def pickle_path(path: str | Path) -> Path:
    """``NAME.joblib`` beside the compiled head ``NAME.npz`` (research export, never opened by a query)."""
    return Path(path).with_suffix(".joblib")


def head_file(folder: str | Path, name: str) -> Path | None:
    """The compiled head ``name`` in a head set folder (None: absent). Sets written before
    format 2 hold ``NAME.joblib.predict.npz``, plain arrays too, which is read the same way;
    their ``NAME.joblib`` is never opened."""
    folder = Path(folder)
    for path in (folder / f"{name}.npz", folder / f"{name}.joblib.predict.npz"):
        if path.is_file():
            return path
    return None


def _sidecar_of(path: Path) -> Path:
    if path.name.endswith(".joblib.predict.npz"):  # format 1
        return path.with_name(path.name[: -len(".predict.npz")] + ".json")
    return sidecar_path(path)


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


def save_head(head: Any, path: str | Path, *, feature_id: str | None = None, pickle: bool = False) -> Path:
    """Write the compiled form of ``head`` to ``path`` (``NAME.npz``) and its sidecar
    ``NAME.json``; returns ``path``. ``pickle=True`` also writes the fitted estimator to
    ``NAME.joblib`` for research (no command opens it).

    A head without a compiled form (e.g. an ensemble around a plain scikit-learn pipeline)
    cannot serve queries and is refused, unless only the pickle is wanted.
    """
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"a head is saved as NAME.npz, not {path.name}")
    try:
        check_is_fitted(head)
    except NotFittedError as exc:
        raise DataError(f"cannot save an unfitted {type(head).__name__}") from exc
    compiled = head.compile() if hasattr(head, "compile") else None
    if not saveable(compiled):
        raise DataError(f"{type(head).__name__} has no compiled form (plain arrays), so no query could "
                        "load it; save it with joblib yourself for research")
    info = {
        "format": FORMAT,
        "head": type(head).__name__,
        "module": type(head).__module__,
        "params": _params(head),
        "classes": [str(c) for c in head.classes_],
        "feature_id": feature_id,
    }
    atomic_write(path, lambda tmp: save_compiled(compiled, tmp))
    if pickle:
        import joblib

        atomic_write(pickle_path(path), lambda tmp: joblib.dump(head, tmp))
    text = json.dumps(info, indent=2)
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_head_info(path: str | Path) -> dict[str, Any]:
    """The sidecar of the head saved at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no head at {path}")
    sidecar = _sidecar_of(path)
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"head {path.name} has no sidecar {sidecar.name}") from exc
    except ValueError as exc:
        raise DataError(f"sidecar of head {path.name} is not valid JSON: {exc}") from exc


def _checked_info(path: Path, expect_feature_id: str | None) -> dict[str, Any]:
    info = read_head_info(path)
    if expect_feature_id is not None and info.get("feature_id") != expect_feature_id:
        raise IndexMismatchError(f"head {path.name} was fitted on features {info.get('feature_id')!r}, "
                                 f"not {expect_feature_id!r}")
    return info


def load_predictor(path: str | Path, *, expect_feature_id: str | None = None) -> Compiled:
    """What the query path predicts with: the compiled head at ``path`` (plain arrays; no
    scikit-learn, no torch, never an unpickle)."""
    path = Path(path)
    info = _checked_info(path, expect_feature_id)
    head = load_compiled(path)
    if [str(c) for c in head.classes_] != info.get("classes"):
        raise DataError(f"head {path.name} does not match its sidecar (saved by another run?)")
    return head


def load_head(path: str | Path, *, expect_feature_id: str | None = None) -> Any:
    """Unpickle the fitted estimator exported with ``save_head(..., pickle=True)``.

    Research only: unpickling runs whatever code the file names, so load only files you
    made. No stylegen command calls this. ``path`` is the head's ``NAME.npz``; with
    ``expect_feature_id``, a head fitted on other vectors raises IndexMismatchError before
    anything is unpickled.
    """
    import joblib

    path = Path(path)
    info = _checked_info(path, expect_feature_id)
    if not pickle_path(path).is_file():
        raise ModelNotFoundError(f"head {path.name} was saved without its estimator (save_head(..., pickle=True))")
    try:
        head = joblib.load(pickle_path(path))
    except Exception as exc:  # a truncated or foreign file: report it in one line
        raise DataError(f"cannot read head {pickle_path(path).name}: {type(exc).__name__}: {exc}") from exc
    classes = [str(c) for c in getattr(head, "classes_", [])]
    if type(head).__name__ != info.get("head") or classes != info.get("classes"):
        raise DataError(f"head {path.name} does not match its sidecar (saved by another run?)")
    return head


def trained_hashes(folder: str | Path) -> frozenset[str]:
    """Content hashes of the covers a model's heads were fitted on (empty: none recorded)."""
    path = Path(folder) / TRAIN_HASHES
    if not path.is_file():
        return frozenset()
    with np.load(path, allow_pickle=False) as z:
        return frozenset(h.decode() for h in z["hashes"].tolist())


def has_head_set(root: str | Path) -> bool:
    """Whether the index at ``root`` has trained heads of its own."""
    base = Path(root) / HEADS_DIR
    return (base / "CURRENT").is_file() or (base / "heads.json").is_file()


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
            save_head(head, tmp / f"{head_name}.npz", feature_id=feature_id)
        (tmp / "heads.json").write_text(json.dumps(config, indent=1))

    sets = head_sets(root)
    legacy = _flat_legacy_files(sets.base)
    final = sets.commit(fill)
    for old in legacy:
        old.unlink(missing_ok=True)
    return final


def _flat_legacy_files(base: Path) -> list[Path]:
    """The files of heads saved flat in ``DIR/heads`` before head sets existed, by the names
    their ``heads.json`` lists (nothing else in the folder is touched)."""
    listing = base / "heads.json"
    try:
        names = json.loads(listing.read_text()).get("heads", []) if listing.is_file() else []
    except (OSError, ValueError, AttributeError):
        return []
    files = [base / f"{n}{ext}" for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
             for ext in (".joblib", ".joblib.json", ".joblib.predict.npz")]
    return [f for f in [*files, listing] if f.is_file()]
