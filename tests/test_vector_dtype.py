"""float16 searchable vectors (``vector_dtype``): what is on disk, what FAISS holds, appends."""

import sys

import numpy as np
import pytest

import stylegen
from stylegen.apps.cli import main
from stylegen.config import CompressionConfig, EmbedConfig
from stylegen.errors import IndexMismatchError
from tests.conftest import make_image

SMALL = EmbedConfig(compression=CompressionConfig(dims={"style": 4, "content": 4}))


def _embed(src, idx, **kw):
    return stylegen.embed(src, idx, SMALL, workers=0, progress=False, precision="fp32", **kw)


def test_a_float16_index_keeps_the_float32_index_vectors_rounded_and_searches_exactly_those(tmp_path):
    """Same covers, same settings: the float16 index's vectors.npy is the float32 index's
    vectors rounded to float16 (same compressor, same feature_id), and its FAISS index holds
    those rounded values, so a cover's similarity to itself is the dot product of its stored
    row (a FAISS index fed the unrounded float32 values would differ from the re-rank)."""
    src = tmp_path / "src"
    for i in range(8):
        make_image(src / f"a{i}.png", kind=i, seed=i)
    _embed(src, tmp_path / "f32")
    _embed(src, tmp_path / "f16", vectors_dtype="float16")
    f32 = stylegen.Index.open(tmp_path / "f32", use_gpu=False)
    f16 = stylegen.Index.open(tmp_path / "f16", use_gpu=False)
    assert "vector_dtype" not in f32.manifest and f16.manifest["vector_dtype"] == "float16"
    assert f32.vectors.dtype == np.float32 and f16.vectors.dtype == np.float16
    assert f16.feature_id == f32.feature_id
    np.testing.assert_array_equal(np.asarray(f16.vectors), np.asarray(f32.vectors).astype(np.float16))
    stored = np.asarray(f16.vectors, np.float32)
    sims, ids = f16.search(stored, k=1)
    assert list(ids[:, 0]) == list(range(8))
    np.testing.assert_allclose(sims[:, 0], np.einsum("ij,ij->i", stored, stored), rtol=0, atol=1e-6)


def test_appending_to_a_float16_index_keeps_old_rows_bit_identical_and_refuses_another_dtype(tmp_path):
    src, idx = tmp_path / "src", tmp_path / "idx"
    for i in range(6):
        make_image(src / f"a{i}.png", kind=i, seed=i)
    _embed(src, idx, vectors_dtype="float16")
    before = np.array(stylegen.Index.open(idx, use_gpu=False).vectors)
    with pytest.raises(IndexMismatchError, match="float16"):
        _embed(src, idx, vectors_dtype="float32")
    for i in range(6, 9):
        make_image(src / f"b{i}.png", kind=i, seed=i)
    assert _embed(src, idx).added == 3  # no dtype asked: the index's own
    after = stylegen.Index.open(idx, use_gpu=False)
    assert after.vectors.dtype == np.float16 and len(after) == 9
    assert np.array_equal(np.asarray(after.vectors[:6]), before)
    _, ids = after.search(np.asarray(after.vectors, np.float32), k=1)
    assert list(ids[:, 0]) == list(range(9))


def test_cli_refuses_an_unknown_vector_dtype_in_one_line(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    make_image(src / "a.png", kind=0)
    monkeypatch.setattr(sys, "argv", ["stylegen", "embed", str(src), "--index", str(tmp_path / "idx"),
                                      "--vectors-dtype", "int8", "--no-progress"])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code != 0 and err.strip().splitlines() == [
        "error: vector dtype must be one of float32, float16, got 'int8'"]
    assert not (tmp_path / "idx" / "CURRENT").exists()
