"""Per-item numeric features (the tabular half of the hybrid image + tabular model).

Values come either from columns of the manifest itself or from an external table joined on
``key`` (by default the ``image`` column). Join rule: a key is normalised (surrounding blanks
stripped, ``\\`` turned into ``/``, ``.``/``..``/double slashes collapsed) and matched
against the table's normalised keys; when that finds nothing, the key's file name
(basename) is matched against the table's file names. Either way exactly one table row must
match, otherwise :class:`~stylegen.errors.DataError` is raised. Rows are numbered from 0 in
manifest order in every message.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stylegen.errors import DataError


def _norm_key(value: object) -> str:
    s = str(value).strip().replace("\\", "/")
    return posixpath.normpath(s) if s else s


def _missing_column(name: str, available: Sequence[str], where: str) -> DataError:
    shown = ", ".join(repr(str(c)) for c in list(available)[:8])
    more = ", ..." if len(available) > 8 else ""
    return DataError(f"column {name!r} not found in {where} (available: {shown}{more})")


def _read_table(table: Path | str | pd.DataFrame) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    path = Path(table)
    if not path.is_file():
        raise DataError(f"tabular file not found: {path}")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read tabular file {path}: {str(exc).splitlines()[0]}") from exc


def match_rows(keys: Sequence[object], table_keys: Sequence[object]) -> np.ndarray:
    """Position in ``table_keys`` of the one row matching each key (rule in module docstring)."""
    full: dict[str, list[int]] = {}
    base: dict[str, list[int]] = {}
    for j, k in enumerate(table_keys):
        if pd.isna(k):
            continue
        nk = _norm_key(k)
        full.setdefault(nk, []).append(j)
        base.setdefault(posixpath.basename(nk), []).append(j)
    out = np.empty(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        if pd.isna(k) or not str(k).strip():
            raise DataError(f"manifest row {i} has no key")
        nk = _norm_key(k)
        hits = full.get(nk) or base.get(posixpath.basename(nk), [])
        if not hits:
            raise DataError(f"manifest row {i} (key {str(k)!r}) has no matching row in the table")
        if len(hits) > 1:
            raise DataError(
                f"manifest row {i} (key {str(k)!r}) matches {len(hits)} table rows "
                f"(table rows {hits[:5]})"
            )
        out[i] = hits[0]
    return out


def _to_float(values: pd.DataFrame, keys: Sequence[object], key: str) -> np.ndarray:
    """Columns as float32, or a DataError naming the first bad cell in row order."""
    raw = values.reset_index(drop=True)
    num = raw.apply(pd.to_numeric, errors="coerce").astype(np.float64)
    arr = num.to_numpy()
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    bad = np.argwhere(~np.isfinite(out))  # row-major, so the first bad row comes first
    if len(bad):
        i, j = bad[0]
        col, orig = raw.columns[j], raw.iat[i, j]
        where = f"manifest row {i} ({key} {str(keys[i])!r}), column {col!r}"
        if pd.isna(orig):
            raise DataError(f"missing value at {where}")
        if np.isnan(arr[i, j]):
            raise DataError(f"non-numeric value {orig!r} at {where}")
        raise DataError(f"non-finite or too large value {orig!r} at {where}")
    return out


def expand_columns(columns: Sequence[str], available: Sequence[str], where: str) -> list[str]:
    """Column names, with ``FIRST:LAST`` standing for that inclusive run of ``available``.

    A name that exists as given (even one containing ``:``) is taken literally; so
    ``chroma_stft_mean:mfcc20_var`` selects the 57 features of the GTZAN table in its order.
    """
    available = [str(c) for c in available]
    out: list[str] = []
    for c in (str(c).strip() for c in columns):
        if c in available or ":" not in c:
            out.append(c)
            continue
        first, last = (s.strip() for s in c.split(":", 1))
        for end in (first, last):
            if end not in available:
                raise _missing_column(end, available, where)
        i, j = available.index(first), available.index(last)
        if i > j:
            raise DataError(f"column range {c!r} is empty: {last!r} comes before {first!r} in {where}")
        out += available[i:j + 1]
    return out


def load_tabular(
    manifest: pd.DataFrame,
    columns: Sequence[str] | None = None,
    table: Path | str | pd.DataFrame | None = None,
    key: str = "image",
) -> tuple[np.ndarray, list[str]]:
    """Numeric features per manifest row: ``(float32 array (n_rows, n_cols), column names)``.

    Without ``table`` the ``columns`` are read from the manifest. With ``table`` (a CSV path
    or a DataFrame) its rows are joined to the manifest on ``key``; ``columns=None`` then
    means every numeric column of the table except ``key``. A column ``"FIRST:LAST"``
    stands for the columns from FIRST to LAST in the source's order (:func:`expand_columns`).
    """
    if isinstance(columns, str):
        columns = [columns]
    if table is None:
        if not columns:
            raise DataError("no tabular columns given: pass columns=... or a table")
        source, where = manifest, "the manifest"
        keys = manifest[key].tolist() if key in manifest.columns else list(range(len(manifest)))
    else:
        source, where = _read_table(table), "the tabular table"
        if key not in source.columns:
            raise _missing_column(key, list(source.columns), where)
        if key not in manifest.columns:
            raise _missing_column(key, list(manifest.columns), "the manifest")
        if columns is None:
            columns = [c for c in source.select_dtypes("number").columns if c != key]
            if not columns:
                raise DataError(f"the tabular table has no numeric columns besides {key!r}")
        keys = manifest[key].tolist()
    columns = expand_columns(columns, [c for c in source.columns if c != key], where)
    for c in columns:
        if c not in source.columns:
            raise _missing_column(c, [x for x in source.columns if x != key], where)
    if table is not None:
        source = source.iloc[match_rows(keys, source[key].tolist())]
    return _to_float(source[columns], keys, key), columns
