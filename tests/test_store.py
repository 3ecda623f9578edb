import fcntl

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from stylegen.errors import IndexNotFoundError, StylegenError
from stylegen.index import store
from stylegen.index.store import Index, build_faiss, choose_index_key

from .conftest import write_index


def test_index_choice_is_exact_when_small_and_approximate_when_large():
    assert choose_index_key(4_844, 512) == "Flat"
    assert choose_index_key(99_999, 512) == "Flat"
    assert choose_index_key(500_000, 512) == "HNSW32"
    assert choose_index_key(4_000_000, 512).startswith("IVF")


def test_hnsw_index_finds_exact_neighbours_on_small_data(rng):
    v = rng.normal(size=(500, 32)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    _, exact = build_faiss(v, "Flat").search(v[:20], 5)
    _, approx = build_faiss(v, "HNSW32").search(v[:20], 5)
    assert (exact[:, 0] == np.arange(20)).all()
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, approx, strict=True)]) > 0.9


def test_opening_a_folder_without_index_is_a_clear_error(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no stylegen index"):
        Index.open(tmp_path)


def test_a_second_writer_is_refused(tmp_path, genre_folder):
    import stylegen

    idx = tmp_path / "idx"
    idx.mkdir()
    with open(idx / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StylegenError, match="another stylegen run is writing"):
            stylegen.embed(genre_folder, idx, workers=0, progress=False)


def _metadata(n: int) -> pd.DataFrame:
    hashes = [f"{i * 7919 % 1000:040x}" for i in range(n)]  # unsorted, all distinct
    hashes[5], hashes[9] = hashes[3], None  # a repeated hash (first row wins) and a missing one
    return pd.DataFrame({"image": [f"c{i}" for i in range(n)], "path": [f"/covers/c{i}.jpg" for i in range(n)],
                         "content_hash": hashes, "genres": [["rock", "pop"][i % 2] for i in range(n)],
                         "year": np.arange(n, dtype=np.int64)})


def test_query_side_reads_only_the_row_groups_of_the_rows_it_returns(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(store, "METADATA_ROW_GROUP", 64)
    meta = _metadata(1000)
    snap = write_index(tmp_path / "idx", {"style": rng.normal(size=(1000, 16)).astype(np.float32)}, meta)
    assert pq.ParquetFile(snap / "metadata.parquet").num_row_groups == 16
    index = Index.open(tmp_path / "idx")
    read: list[list[int]] = []
    real = index.table._file.read_row_groups
    monkeypatch.setattr(index.table._file, "read_row_groups", lambda g, **kw: read.append(g) or real(g, **kw))
    ids = [999, 3, 130, 3, 64, 63]
    got = index.rows(ids)
    assert read == [[0, 1, 2, 15]] and not index.table.loaded
    pd.testing.assert_frame_equal(got, meta.iloc[ids])
    assert index.rows([]).empty
    with pytest.raises(IndexError):
        index.rows([1000])
    pd.testing.assert_frame_equal(index.metadata, meta)  # the whole table when asked for
    pd.testing.assert_frame_equal(index.rows(ids), meta.iloc[ids])


def test_covers_are_found_by_hash_without_reading_the_metadata(tmp_path, rng):
    meta = _metadata(300)
    write_index(tmp_path / "idx", {"style": rng.normal(size=(300, 16)).astype(np.float32)}, meta)
    index = Index.open(tmp_path / "idx")
    asked = [meta.content_hash[200], meta.content_hash[3], "f" * 40, None, "", meta.content_hash[0] + "0",
             meta.content_hash[0]]
    expected = [200, 3, None, None, None, None, 0]
    assert index.lookup_hashes(asked) == expected and not index.table.loaded
    (index.snapshot / "hashes.npy").unlink()  # a snapshot written before hashes.npy existed
    assert Index.open(tmp_path / "idx").lookup_hashes(asked) == expected
