import json
import shutil

import faiss
import numpy as np
import pandas as pd
import pytest

from stylegen.errors import StylegenError
from stylegen.index import ann
from stylegen.index.compress import Compressor, Projection
from stylegen.index.store import FORMAT_VERSION, Index, choose_index_key

GiB = 2**30


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, dim: int = 32, centres: int = 50) -> np.ndarray:
    """Unit vectors around a few centres: neighbourhoods an IVF can find, not one blob."""
    c = rng.normal(size=(centres, dim))
    return unit(c[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, dim)))


def test_index_choice_follows_size_and_memory_budget():
    assert ann.plan_index(4_844, 512).key == "Flat"
    assert ann.plan_index(99_999, 512).key == "Flat"
    assert ann.plan_index(500_000, 512).key == "HNSW32"
    big = ann.plan_index(4_000_000, 512)
    assert big.kind == "ivfpq" and "IVF8192_HNSW32" in big.key and big.tune == "nprobe"
    assert big.train_size < 4_000_000 and big.memory_bytes < 4_000_000 * 512 * 4 / 10
    # HNSW of 500k x 512 needs ~1.2 GB: under a 512 MiB budget the plan falls back to IVF-PQ
    tight = ann.plan_index(500_000, 512, max_memory_bytes=512 * 2**20)
    assert tight.kind == "ivfpq" and tight.memory_bytes <= 512 * 2**20
    # a flat 50k x 512 (100 MB) over a 50 MB budget: quantized
    assert ann.plan_index(50_000, 512, max_memory_bytes=50 * 10**6).kind == "ivfpq"
    # smaller budgets choose shorter codes, never over budget
    m_of = {b: int(ann.plan_index(200_000_000, 512, b * GiB).key.rsplit("PQ", 1)[1].rstrip("np")) for b in (16, 8, 4)}
    assert m_of[16] > m_of[8] > m_of[4]
    with pytest.raises(StylegenError, match="max-index-memory"):
        ann.plan_index(200_000_000, 512, max_memory_bytes=GiB)
    assert choose_index_key(500_000, 512, 512 * 2**20) == tight.key


def test_tuned_hnsw_and_ivfpq_reach_the_recall_target_on_fresh_queries(rng):
    x, q = np.split(clustered(rng, 6200, centres=10), [6000])  # q: fresh, from the same clusters
    _, truth = ann.exact_knn([x[:2500], x[2500:]], q, 10)  # shards: the same as one array
    assert (truth == faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]).mean() > 0.99
    # PQ8 codes of 32 dims alone cap recall@10 near 0.48 here; candidates re-ranked exactly
    # against the float vectors (what Index.search does for PQ indexes) reach the target
    for key in ("HNSW32", "IVF64,PQ8np"):
        r = ann.build([x[:2500], x[2500:]], key, target_recall=0.95, n_queries=300)
        assert r.recall >= 0.95, (key, r.params, r.recall)
        found = ann.refine_search(r.index, q, 10, x, ann.refine_factor(key))[1]
        assert ann.recall_at(found, truth, 10) >= 0.9
        if key.startswith("IVF"):
            assert ann.recall_at(r.index.search(q, 10)[1], truth, 10) < 0.6  # codes alone
            ann.apply_params(r.index, {"nprobe": 1})
            assert ann.recall_at(ann.refine_search(r.index, q, 10, x, 10)[1], truth, 10) < 0.9  # tuning mattered


def write_snapshot_by_hand(root, index_file, entry, vectors):
    """A minimal snapshot (what Index.open reads), with the manifest entry of ann.build."""
    snap = root / "v000001"
    snap.mkdir(parents=True)
    shutil.copy(index_file, snap / "index.faiss")
    np.save(snap / "vectors.npy", vectors)
    pd.DataFrame({"image": [f"{i}.jpg" for i in range(len(vectors))],
                  "content_hash": [str(i) for i in range(len(vectors))]}).to_parquet(snap / "metadata.parquet")
    d = vectors.shape[1]
    Compressor({"style": Projection(np.zeros(d, np.float32), np.eye(d, dtype=np.float32),
                                    np.ones(d, np.float32))}).save(snap / "compressor.npz")
    manifest = {"format_version": FORMAT_VERSION, "slices": {"style": [0, d]}, "dim": d, **entry}
    (snap / "manifest.json").write_text(json.dumps(manifest))
    (root / "CURRENT").write_text("v000001\n")


def test_search_params_round_trip_through_the_manifest_and_ivf_opens_memory_mapped(tmp_path, rng):
    x = clustered(rng, 5000, centres=10)
    r = ann.build(x, "IVF64,PQ8np", target_recall=0.99, n_queries=200)
    entry = ann.write_index(r, tmp_path / "built.faiss")
    assert entry["search_params"] == r.params and entry["index_key"] == "IVF64,PQ8np"
    expected = ann.refine_search(r.index, x[:20], 10, x, ann.refine_factor("IVF64,PQ8np"))
    ann.apply_params(r.index, {"nprobe": 1})
    faiss.write_index(r.index, str(tmp_path / "built.faiss"))  # file says nprobe=1, manifest says more
    stored = json.loads(json.dumps(entry))  # what the manifest holds
    write_snapshot_by_hand(tmp_path / "idx", tmp_path / "built.faiss", stored, x)
    index = Index.open(tmp_path / "idx", use_gpu=False)
    ivf = faiss.extract_index_ivf(index.faiss_index)
    assert ivf.nprobe == r.params["nprobe"] > 1
    assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)  # mmap
    sims, ids = index.search(x[:20], k=10)
    assert (ids == expected[1]).all() and np.allclose(sims, expected[0], atol=1e-5)


def test_merge_ondisk_of_two_shards_equals_one_index_of_all_vectors(tmp_path, rng):
    x = clustered(rng, 4000)
    key = "IVF32,PQ8np"
    trained = ann.train_index(x[:3000], key, x.shape[1])
    faiss.write_index(trained, str(tmp_path / "trained.faiss"))
    whole = ann.add_vectors(faiss.read_index(str(tmp_path / "trained.faiss")), [x])
    s1 = ann.add_shard(tmp_path / "trained.faiss", x[:1500], 0, tmp_path / "s1.faiss")
    s2 = ann.add_shard(tmp_path / "trained.faiss", [x[1500:2800], x[2800:]], 1500, tmp_path / "s2.faiss")
    out = ann.merge_shards(tmp_path / "trained.faiss", [s1, s2], tmp_path / "built")
    shutil.move(tmp_path / "built", tmp_path / "moved")  # a snapshot is renamed after writing
    merged = ann.read_index(tmp_path / "moved" / out.name, key, {"nprobe": 8})
    assert merged.ntotal == whole.ntotal == len(x)
    ann.apply_params(whole, {"nprobe": 8})
    d1, i1 = merged.search(x[:50], 10)
    d2, i2 = whole.search(x[:50], 10)
    assert (i1 == i2).all() and np.allclose(d1, d2, atol=1e-5)
    with pytest.raises(StylegenError, match="trained, empty"):
        ann.merge_shards(s1, [s2], tmp_path / "again")
