import fcntl

import numpy as np
import pytest

from stylegen.errors import IndexNotFoundError, StylegenError
from stylegen.store import Index, build_faiss, choose_index_key


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
        with pytest.raises(StylegenError, match="another stylegen embed"):
            stylegen.embed(genre_folder, idx, workers=0, progress=False)
