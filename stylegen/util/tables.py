"""Tables written for people: CSV cells a spreadsheet will not run as formulas.

A cell that starts with ``=``, ``+``, ``-``, ``@`` (or a tab or carriage return, which some
spreadsheets skip before looking) is read by Excel, LibreOffice and Google Sheets as a
formula: an artist called ``=HYPERLINK(...)`` in a shared catalogue would become a live link
in whoever opens our CSV. Such text cells get a leading apostrophe (OWASP's advice); numbers,
including negative ones, are left as they are.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def safe_cell(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is text a spreadsheet would take for a formula."""
    if isinstance(value, str) and value.startswith(_TRIGGERS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def safe_row(values: list[Any] | tuple[Any, ...]) -> list[Any]:
    return [safe_cell(v) for v in values]


def _texty(values: pd.Series | pd.Index) -> bool:
    return values.dtype == object or pd.api.types.is_string_dtype(values)


def safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells, header and index are safe to open in a spreadsheet."""
    out = df.copy()
    out.columns = [safe_cell(c) for c in out.columns]
    for i in range(out.shape[1]):
        if _texty(out.iloc[:, i]):
            out.iloc[:, i] = out.iloc[:, i].map(safe_cell)
    if _texty(out.index):
        out.index = out.index.map(safe_cell).rename(out.index.name)
    return out
