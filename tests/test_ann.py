import json
import shutil
from pathlib import Path

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
    # 4·sqrt(4M) = 8,192 lists would cost 2.7e13 flop of k-means, over the training budget: 4,096
    assert big.kind == "ivfpq" and "IVF4096_HNSW32" in big.key and big.tune == "nprobe"
    assert ann.kmeans_flops(4096, 512) <= ann.KMEANS_FLOP_BUDGET < ann.kmeans_flops(8192, 512)
    assert ann.nlist_for(4_000_000, 512, flop_budget=1e14) == 8192  # a GPU's budget: autofaiss's rule
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
        found = ann.refine_search(r.index, q, 10, x, ann.refine_factor(key, r.params))[1]
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
    expected = ann.refine_search(r.index, x[:20], 10, x, ann.refine_factor("IVF64,PQ8np", r.params))
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


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status RssFile on this system")


def test_streaming_a_memory_mapped_file_does_not_keep_its_pages_resident(tmp_path):
    """A build reads its input through a memory map; 10M float16 rows are 10 GB, so every page
    read must leave this process's resident memory once copied (without release_pages, the
    whole 100 MB file below stays resident after one pass)."""
    path = tmp_path / "x.npy"
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(100_000, 512))
    values = (np.arange(100_000) % 2048).astype(np.float16)  # exact in float16
    x[:] = values[:, None]
    x.flush()
    del x
    mapped = np.load(path, mmap_mode="r")
    before = _rss_file_mb()
    total = 0.0
    for start, batch in ann.iter_batches([mapped], 8192):
        assert batch.dtype == np.float32 and batch[0, 0] == values[start]
        total += float(batch[:, 0].sum())
    assert total == float(values.astype(np.float64).sum())
    assert _rss_file_mb() - before < 20  # not the 100 MB read
    rows = ann.take_rows([mapped], np.arange(0, 100_000, 7))  # a training sample's many rows
    assert rows.shape == (len(range(0, 100_000, 7)), 512) and rows[1, 0] == values[7]
    assert _rss_file_mb() - before < 20


def test_the_tuner_deepens_the_re_rank_when_more_lists_stop_helping(rng, tmp_path):
    """Tight groups of near-duplicates: 4-byte codes cannot order a group, so the true top-10
    is rarely in the top-100 candidates whatever nprobe is; the tuner must try deeper re-ranks
    (stored as ``refine`` in the search parameters, which Index.search reads) rather than stop
    at the plateau. Rows are read from a memory-mapped file, as vectors.npy is."""
    x = clustered(rng, 6300, centres=6)
    np.save(tmp_path / "x.npy", x[:6000])
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    q = x[6000:]
    _, truth = ann.exact_knn([mapped], q, 10)
    r = ann.build(mapped, "IVF16,PQ4np", target_recall=0.9, n_queries=300)
    depth = ann.refine_factor("IVF16,PQ4np", r.params)
    assert depth > ann.REFINE_FACTOR and r.recall >= 0.9, (r.params, r.recall)
    shallow = ann.recall_at(ann.refine_search(r.index, q, 10, mapped, ann.REFINE_FACTOR)[1], truth, 10)
    deep = ann.recall_at(ann.refine_search(r.index, q, 10, mapped, depth)[1], truth, 10)
    assert deep >= 0.85 and deep > shallow + 0.1, (shallow, deep)
    rows = np.array([3, 17, 5999])
    np.testing.assert_array_equal(ann.read_rows(mapped, rows), x[:6000][rows])  # pread, not the map
    # an opened index re-ranks as deep as its manifest says (not the default depth)
    entry = json.loads(json.dumps(ann.write_index(r, tmp_path / "built.faiss")))
    assert entry["search_params"]["refine"] == depth
    write_snapshot_by_hand(tmp_path / "idx", tmp_path / "built.faiss", entry, x[:6000].astype(np.float16))
    opened = Index.open(tmp_path / "idx", use_gpu=False)
    assert opened.vectors.dtype == np.float16  # memory-mapped float16 rows, as vector_dtype float16 keeps them
    _, ids = opened.search(q, k=10)
    assert ann.recall_at(ids, truth, 10) > shallow + 0.1
