"""Build paths that a plain embed never takes: migrating an index written before shards, and
an append that crosses the size where another FAISS index kind is chosen."""

from pathlib import Path

import faiss
import numpy as np
import pandas as pd

import stylegen
from stylegen.config import CompressionConfig, EmbedConfig
from stylegen.index import ann
from stylegen.index.build import RawFeatures, index_ingest_id
from stylegen.index.compress import combine
from stylegen.index.ingest import build
from stylegen.index.shards import list_shards, write_shard
from tests.conftest import make_image, write_index

SMALL = EmbedConfig(compression=CompressionConfig(dims={"style": 4, "content": 4}))


def _meta(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image": [f"{n}.png" for n in names], "content_hash": [f"hash-{n}" for n in names]})


def test_first_append_to_a_pre_shard_index_moves_its_raw_features_into_a_shard(tmp_path, rng):
    """An index written before shards kept raw_<part>.npy in its snapshot. The first build
    moves them into a (legacy) shard once: old vectors and feature_id stay, the new snapshot
    keeps no raw copy, and the old covers' raw features are then found in the shard (a refit
    can use them)."""
    idx = tmp_path / "idx"
    old_raw = {p: rng.normal(size=(12, 16)).astype(np.float32) for p in ("style", "content")}
    write_index(idx, old_raw, _meta([f"old{i}" for i in range(12)]), dims=4)
    legacy = stylegen.Index.open(idx, use_gpu=False)
    assert sorted(p.name for p in legacy.snapshot.glob("raw_*.npy")) == ["raw_content.npy", "raw_style.npy"]
    assert "shards" not in legacy.manifest and not list_shards(idx)
    old_vectors, old_id = np.array(legacy.vectors), legacy.feature_id

    new_raw = {p: rng.normal(size=(3, 16)).astype(np.float32) for p in old_raw}
    info = {"ingest_id": index_ingest_id(legacy), "config": legacy.manifest["config"],
            "backbone": legacy.manifest["backbone"], "preprocess": legacy.preprocess.to_dict(), "precision": "fp32"}
    added = write_shard(idx, new_raw, _meta([f"new{i}" for i in range(3)]), info)
    result = build(idx)

    after = stylegen.Index.open(idx, use_gpu=False)
    assert (result.added, result.count, result.refit, result.vectors_changed) == (3, 15, False, False)
    assert after.feature_id == old_id and np.array_equal(np.asarray(after.vectors[:12]), old_vectors)
    assert list(after.metadata["content_hash"]) == [f"hash-old{i}" for i in range(12)] + [f"hash-new{i}" for i in range(3)]
    new_vectors = combine(legacy.compressor.transform({p: x.astype(np.float16).astype(np.float32)
                                                       for p, x in new_raw.items()}),
                          legacy.config.features.weights)[0]
    np.testing.assert_allclose(np.asarray(after.vectors[12:]), new_vectors, atol=1e-5)  # the frozen compressor

    shards = list_shards(idx)
    moved = [s for s in shards if s.info.get("legacy")]
    assert len(moved) == 1 and moved[0].hashes() == [f"hash-old{i}" for i in range(12)]
    for part, x in old_raw.items():  # kept as float16, as the snapshot had them
        np.testing.assert_array_equal(moved[0].raw()[part], x.astype(np.float16))
    assert sorted(after.manifest["shards"]) == sorted([moved[0].name, added.name])
    assert not list(after.snapshot.glob("raw_*.npy"))  # read from the shard from now on
    got = RawFeatures(after).rows([0, 11, 13])
    np.testing.assert_array_equal(got["style"][:2], old_raw["style"][[0, 11]].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["style"][2], new_raw["style"][1].astype(np.float16).astype(np.float32))

    assert build(idx).added == 0 and len(list_shards(idx)) == len(shards)  # moved once only
    refit = build(idx, refit=True)  # needs every cover's raw features: the old ones are in the shard
    assert refit.count == 15 and stylegen.Index.open(idx, use_gpu=False).manifest["compression_fit"]["rows"] == 15


def _embed(source: Path, idx: Path):
    return stylegen.embed(source, idx, SMALL, workers=0, progress=False, precision="fp32")


def test_append_past_the_flat_limit_rebuilds_as_hnsw_and_keeps_row_ids(tmp_path, monkeypatch):
    """Appending crosses FLAT_LIMIT: the index is rebuilt as HNSW (recorded in the manifest with
    its tuned search parameter), old rows keep their ids, and every cover is found under its
    own id; a further append extends the HNSW index in place."""
    src, idx = tmp_path / "src", tmp_path / "idx"
    monkeypatch.setattr(ann, "FLAT_LIMIT", 9)
    for i in range(6):
        make_image(src / f"a{i}.png", kind=i, seed=i)
    _embed(src, idx)
    flat = stylegen.Index.open(idx, use_gpu=False)
    assert flat.manifest["index_key"] == "Flat"
    old_meta, old_vectors = flat.metadata[["image", "content_hash"]].copy(), np.array(flat.vectors)

    for i in range(6, 11):
        make_image(src / f"b{i}.png", kind=i, seed=i)
    report = _embed(src, idx)
    grown = stylegen.Index.open(idx, use_gpu=False)
    assert report.added == 5 and len(grown) == 11
    m = grown.manifest
    assert m["index_key"] == f"HNSW{ann.HNSW_M}" and m["index_plan"]["kind"] == "hnsw"
    assert set(m["search_params"]) == {"efSearch"} and m["count"] == 11
    assert isinstance(grown.faiss_index, faiss.IndexIDMap)  # HNSW numbers rows in add order
    pd.testing.assert_frame_equal(grown.metadata[["image", "content_hash"]].iloc[:6], old_meta)
    assert np.array_equal(np.asarray(grown.vectors[:6]), old_vectors)
    _, ids = grown.search(np.asarray(grown.vectors), k=1)
    assert list(ids[:, 0]) == list(range(11))

    for i in range(11, 14):
        make_image(src / f"c{i}.png", kind=i, seed=i)
    _embed(src, idx)
    again = stylegen.Index.open(idx, use_gpu=False)
    assert again.manifest["index_key"] == m["index_key"] and again.faiss_index.ntotal == 14
    _, ids = again.search(np.asarray(again.vectors), k=1)
    assert list(ids[:, 0]) == list(range(14))
    by_image = dict(zip(again.metadata["image"], range(14), strict=True))
    assert [by_image[f"a{i}.png"] for i in range(6)] == list(range(6))

