"""Tests for stylegen.sources.tabular: joins, column selection and one-line errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stylegen.errors import DataError
from stylegen.sources.tabular import load_tabular


@pytest.fixture
def manifest():
    return pd.DataFrame(
        {"image": ["covers/a.jpg", "covers\\b.jpg", "other/c.jpg"], "year": [1970, 1985, 2001],
         "genre": ["jazz", "pop", "metal"]}
    )


def _table(**over):
    t = pd.DataFrame({"image": ["covers/b.jpg", "./covers/a.jpg", "c.jpg"],
                      "tempo": [120.0, 90.0, 150.0], "loud": [-5, -9, -3],
                      "label": ["x", "y", "z"]})
    return t.assign(**over)


def test_manifest_columns(manifest):
    X, cols = load_tabular(manifest, columns=["year"])
    assert cols == ["year"] and X.dtype == np.float32
    assert X[:, 0].tolist() == [1970, 1985, 2001]


def test_join_csv_on_key_default_numeric_columns(manifest, tmp_path):
    path = tmp_path / "t.csv"
    _table().to_csv(path, index=False)
    X, cols = load_tabular(manifest, table=path)
    assert cols == ["tempo", "loud"]  # numeric columns only, key left out
    # manifest order: a (./covers/a.jpg full match), b (backslash path), c (basename match)
    assert X.tolist() == [[90, -9], [120, -5], [150, -3]]


def test_column_selection(manifest):
    X, cols = load_tabular(manifest, columns=["loud"], table=_table())
    assert cols == ["loud"] and X.shape == (3, 1) and X[0, 0] == -9


def test_unknown_column_named(manifest):
    with pytest.raises(DataError, match=r"'bpm' not found.*'tempo'"):
        load_tabular(manifest, columns=["bpm"], table=_table())
    with pytest.raises(DataError, match=r"'bpm' not found in the manifest"):
        load_tabular(manifest, columns=["bpm"])


def test_unmatched_row_named(manifest):
    t = _table(image=["covers/b.jpg", "covers/a.jpg", "d.jpg"])
    with pytest.raises(DataError, match=r"manifest row 2 \(key 'other/c.jpg'\) has no matching"):
        load_tabular(manifest, table=t)


def test_ambiguous_basename(manifest):
    t = pd.concat([_table(), _table().iloc[[2]].assign(image="x/c.jpg")], ignore_index=True)
    with pytest.raises(DataError, match=r"manifest row 2 .* matches 2 table rows"):
        load_tabular(manifest, table=t)


def test_missing_value_named(manifest):
    with pytest.raises(DataError, match=r"missing value at manifest row 0 .*'covers/a.jpg'.*'tempo'"):
        load_tabular(manifest, table=_table(tempo=[120.0, np.nan, 150.0]))
    m = manifest.assign(year=[1970, None, 2001])
    with pytest.raises(DataError, match=r"missing value at manifest row 1 .*'year'"):
        load_tabular(m, columns=["year"])


def test_non_numeric_value_named(manifest):
    with pytest.raises(DataError, match=r"non-numeric value 'fast' at manifest row 2 .*'tempo'"):
        load_tabular(manifest, columns=["tempo"], table=_table(tempo=["120", "90", "fast"]))
    with pytest.raises(DataError, match=r"non-numeric value 'jazz' at manifest row 0 .*'genre'"):
        load_tabular(manifest, columns=["year", "genre"])


def test_numeric_strings_accepted(manifest):
    X, _ = load_tabular(manifest, columns=["tempo"], table=_table(tempo=["1.5", "2", "3e2"]))
    assert X[:, 0].tolist() == [2.0, 1.5, 300.0]


def test_missing_key_and_file(manifest, tmp_path):
    with pytest.raises(DataError, match="'image' not found in the tabular table"):
        load_tabular(manifest, table=_table().rename(columns={"image": "path"}))
    with pytest.raises(DataError, match="not found"):
        load_tabular(manifest, table=tmp_path / "nope.csv")
    with pytest.raises(DataError, match="no tabular columns"):
        load_tabular(manifest)


def test_column_range(manifest):
    t = _table().assign(bpm=[1, 2, 3])
    X, cols = load_tabular(manifest, columns=["tempo:loud", "bpm"], table=t)
    assert cols == ["tempo", "loud", "bpm"] and X.shape == (3, 3)
    with pytest.raises(DataError, match=r"range 'loud:tempo' is empty"):
        load_tabular(manifest, columns=["loud:tempo"], table=t)
    with pytest.raises(DataError, match=r"'bpm2' not found"):
        load_tabular(manifest, columns=["tempo:bpm2"], table=t)
