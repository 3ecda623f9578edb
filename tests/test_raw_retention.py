"""Raw retention (issue 23): which covers keep raw features in the shards after a build.

Priorities are recomputed here from the definition (sha1 of "seed:hash", first 8 bytes), so a
prune that keeps other rows, or the right covers with the wrong rows, fails.
"""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import stylegen
import stylegen.index.build
from stylegen.config import BackboneConfig, CompressionConfig, EmbedConfig
from stylegen.errors import IndexMismatchError, StylegenError
from stylegen.index.build import RawFeatures, check_raw_retention, raw_batches
from stylegen.index.ingest import build
from stylegen.index.retention import RawRetention, prune_raw, raw_storage
from stylegen.index.shards import list_shards
from tests.conftest import make_image, write_index

SMALL = EmbedConfig(backbone=BackboneConfig(image_size=64), compression=CompressionConfig(dims={"style": 4, "content": 4}))


def covers(root: Path, n: int, start: int = 0) -> Path:
    for i in range(start, start + n):
        make_image(root / f"c{i:02d}.png", kind=i, seed=i)
    return root


def embed(src: Path, idx: Path, retention: RawRetention | None = None, **kw):
    return stylegen.embed(src, idx, SMALL, workers=0, progress=False, precision="fp32", runtime="torch",
                          checkpoint_every=4, batch_size=4, raw_retention=retention, **kw)


def bottom(hashes, k: int, seed: int) -> set[str]:
    prio = {h: int.from_bytes(hashlib.sha1(f"{seed}:{h}".encode()).digest()[:8], "big") for h in hashes}
    return set(sorted(prio, key=prio.get)[:k])


def kept_raw(idx: Path) -> dict[str, dict[str, np.ndarray]]:
    """Content hash -> raw part vectors, for every shard row that still has them."""
    out = {}
    for shard in list_shards(idx):
        raw, where = shard.raw(mmap=False), shard.raw_map()
        assert len(raw["style"]) == int((where >= 0).sum())  # row map and arrays agree
        for h, r in zip(shard.hashes(), where, strict=True):
            if r >= 0:
                assert h not in out  # a cover keeps its raw features once
                out[h] = {p: x[r].copy() for p, x in raw.items()}
    return out


def index_hashes(idx: Path) -> list[str]:
    return list(stylegen.Index.open(idx, use_gpu=False).metadata["content_hash"])


def snapshot_of(idx: Path) -> dict[str, bytes]:
    """Every file of the live snapshot and the shards, by path: what a failed refit must leave."""
    files = [idx / "CURRENT", *sorted((idx / "shards").rglob("*"))]
    current = idx / (idx / "CURRENT").read_text().strip()
    files += sorted(current.rglob("*"))
    return {str(f.relative_to(idx)): f.read_bytes() for f in files if f.is_file()}


def test_sample_keeps_the_bottom_k_by_hash_priority_as_the_index_grows(tmp_path, monkeypatch):
    src, idx = covers(tmp_path / "src", 12), tmp_path / "idx"
    policy = RawRetention("sample", 5, seed=3)
    monkeypatch.setattr(stylegen.index.build, "prune_raw", lambda index_dir: 0)  # look before pruning
    embed(src, idx, policy)
    monkeypatch.undo()
    before = kept_raw(idx)
    first = index_hashes(idx)
    assert len(before) == 12 and len(list_shards(idx)) == 3

    assert prune_raw(idx) == 7
    after = kept_raw(idx)
    assert set(after) == bottom(first, 5, seed=3)
    for h, raw in after.items():  # the rows left are the very bytes written at ingest
        for p in raw:
            assert np.array_equal(raw[p], before[h][p])
    assert prune_raw(idx) == 0  # pruned once

    covers(src, 6, start=12)
    report = embed(src, idx)  # no policy asked: the index's own
    grown = index_hashes(idx)
    assert report.added == 6 and len(grown) == 18
    now = kept_raw(idx)
    assert set(now) == bottom(grown, 5, seed=3)
    left = set(after) - set(now)
    assert left, "the added covers should displace some kept ones (pick another seed)"
    assert not (set(now) & (set(first) - set(after)))  # a pruned cover never comes back
    for h in set(now) & set(after):
        assert all(np.array_equal(now[h][p], before[h][p]) for p in now[h])
    storage = raw_storage(idx)
    assert storage["policy"] == policy.to_dict() and storage["covers_with_raw"] == 5 and storage["covers"] == 18
    assert storage["bytes"] == sum(s.raw_file(p).stat().st_size for s in list_shards(idx) for p in s.info["parts"])


def test_none_keeps_no_raw_rows_and_appending_still_works(tmp_path):
    src, idx = covers(tmp_path / "src", 6), tmp_path / "idx"
    embed(src, idx, RawRetention("none"))
    index = stylegen.Index.open(idx, use_gpu=False)
    old_vectors, old_hashes = np.array(index.vectors), list(index.metadata["content_hash"])
    assert kept_raw(idx) == {} and all(len(s.raw_rows()) == 0 for s in list_shards(idx))
    assert all(len(s.hashes()) == s.count for s in list_shards(idx))  # metadata is never pruned

    covers(src, 4, start=6)
    report = embed(src, idx)
    grown = stylegen.Index.open(idx, use_gpu=False)
    assert report.added == 4 and len(grown) == 10 and grown.feature_id == index.feature_id
    assert np.array_equal(np.asarray(grown.vectors[:6]), old_vectors)
    assert list(grown.metadata["content_hash"][:6]) == old_hashes
    assert kept_raw(idx) == {} and raw_storage(idx)["covers_with_raw"] == 0
    assert embed(src, idx).added == 0  # nothing is ingested again: the shards' metadata says what is done


def test_refit_reads_pruned_covers_again_and_matches_a_refit_that_kept_all(tmp_path):
    src = covers(tmp_path / "src", 8)
    embed(src, tmp_path / "all", RawRetention("all"))
    embed(src, tmp_path / "some", RawRetention("sample", 3, seed=0))
    assert len(kept_raw(tmp_path / "all")) == 8 and len(kept_raw(tmp_path / "some")) == 3
    said: list[str] = []
    build(tmp_path / "all", refit=True, max_sample=5, notify=said.append)
    assert said == []  # nothing to read again
    result = build(tmp_path / "some", refit=True, max_sample=5, notify=said.append)
    assert result.refit and result.count == 8
    assert len(said) == 1 and said[0].startswith("re-reading 5 source images to refit (") and "img/s" in said[0]

    full, some = stylegen.Index.open(tmp_path / "all"), stylegen.Index.open(tmp_path / "some")
    assert some.manifest["compression_fit"] == full.manifest["compression_fit"]
    assert list(some.metadata["content_hash"]) == list(full.metadata["content_hash"])
    np.testing.assert_allclose(np.asarray(some.vectors), np.asarray(full.vectors), atol=1e-5)
    assert set(kept_raw(tmp_path / "some")) == bottom(list(some.metadata["content_hash"]), 3, seed=0)  # pruned again
    assert build(tmp_path / "some", refit=True, max_sample=5, notify=said.append).count == 8 and len(said) == 2


def test_refit_with_a_missing_source_image_fails_first_and_changes_nothing(tmp_path):
    src, idx = covers(tmp_path / "src", 8), tmp_path / "idx"
    embed(src, idx, RawRetention("sample", 3, seed=0))
    index = stylegen.Index.open(idx, use_gpu=False)
    pruned = [p for p, h in zip(index.metadata["path"], index.metadata["content_hash"], strict=True)
              if h not in kept_raw(idx)]
    Path(pruned[2]).unlink()
    before = snapshot_of(idx)
    said: list[str] = []
    with pytest.raises(StylegenError) as err:
        build(idx, refit=True, notify=said.append)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "1 covers" in message and pruned[2] in message
    assert said == [] and snapshot_of(idx) == before


def test_raw_features_of_a_pruned_cover_are_none_and_a_kept_one_unchanged(tmp_path, monkeypatch):
    src, idx = covers(tmp_path / "src", 10), tmp_path / "idx"
    monkeypatch.setattr(stylegen.index.build, "prune_raw", lambda index_dir: 0)
    embed(src, idx, RawRetention("sample", 4, seed=1))
    monkeypatch.undo()
    index = stylegen.Index.open(idx, use_gpu=False)
    hashes = list(index.metadata["content_hash"])
    everything = RawFeatures(index).rows(range(10))
    stale = RawFeatures(index)
    assert stale.rows([0]) is not None  # reads where the covers lie, then the shards change
    prune_raw(idx)

    kept = sorted(hashes.index(h) for h in bottom(hashes, 4, seed=1))
    gone = sorted(set(range(10)) - set(kept))
    fresh = RawFeatures(stylegen.Index.open(idx, use_gpu=False))
    for reader in (fresh, stale):
        got = reader.rows([kept[1], kept[3]])
        for p in got:
            np.testing.assert_array_equal(got[p], everything[p][[kept[1], kept[3]]])
        assert reader.rows([gone[0]]) is None and reader.rows([kept[0], gone[-1]]) is None
    assert raw_batches(stylegen.Index.open(idx, use_gpu=False)) is None  # not every cover has them


def test_manifest_records_the_policy_and_another_is_refused(tmp_path, rng):
    from stylegen.apps.cli import app

    src, idx = covers(tmp_path / "src", 3), tmp_path / "idx"
    embed(src, idx)
    manifest = stylegen.Index.open(idx, use_gpu=False).manifest
    assert manifest["raw_retention"] == {"policy": "sample", "sample_size": 100_000, "seed": 0}

    covers(src, 1, start=3)  # something to do: the refusal must come before it
    shards = [s.name for s in list_shards(idx)]
    runner = CliRunner()
    for asked in (["--raw-retention", "none"], ["--raw-sample", "7"], ["--raw-retention", "all"]):
        out = runner.invoke(app, ["embed", str(src), "--index", str(idx), "--no-progress", *asked])
        assert out.exit_code != 0 and isinstance(out.exception, IndexMismatchError), out.output
        assert len(str(out.exception).splitlines()) == 1 and "Traceback" not in out.output
        assert "raw features by policy sample of 100,000" in str(out.exception)
    assert [s.name for s in list_shards(idx)] == shards
    bad = runner.invoke(app, ["embed", str(src), "--index", str(tmp_path / "new"), "--raw-retention", "some"])
    assert bad.exit_code != 0 and "raw retention must be one of all, sample, none" in str(bad.exception)

    old = tmp_path / "old"  # an index from before the setting keeps everything
    raw = {p: rng.normal(size=(6, 16)).astype(np.float32) for p in ("style", "content")}
    write_index(old, raw, pd.DataFrame({"image": [f"{i}.png" for i in range(6)], "content_hash": list("abcdef")}), dims=4)
    legacy = stylegen.Index.open(old, use_gpu=False)
    assert "raw_retention" not in legacy.manifest
    assert check_raw_retention(legacy, RawRetention("all")).policy == "all"
    with pytest.raises(IndexMismatchError, match="policy all, asked for none"):
        check_raw_retention(legacy, RawRetention("none"))


def test_clean_partial_removes_a_killed_prunes_temporary_files_inside_shards_only(tmp_path):
    """A prune writes its new raw arrays through temporary files inside the shard folder; a run
    killed there leaves one, which the next run's clean-up removes, and nothing else."""
    from stylegen.index.shards import clean_partial, write_shard
    from stylegen.util.persist import TMP_PREFIX

    raw = {"style": np.ones((2, 4), np.float32)}
    meta = pd.DataFrame({"image": ["a.png", "b.png"], "content_hash": ["ha", "hb"]})
    shard = write_shard(tmp_path, raw, meta, {"ingest_id": "x"})
    stale = shard.path / f"{TMP_PREFIX}raw_style.g1.npy.abc"
    stale.write_bytes(b"half")
    before = sorted(p.name for p in shard.path.iterdir() if p != stale)
    clean_partial(tmp_path)
    assert not stale.exists() and sorted(p.name for p in shard.path.iterdir()) == before
    kept = shard.keep_raw([1])  # the prune itself leaves no temporary file behind
    assert not [p for p in kept.path.iterdir() if p.name.startswith(TMP_PREFIX)]
    np.testing.assert_array_equal(kept.raw()["style"], raw["style"][[1]].astype(np.float16))


def test_a_shard_that_names_raw_features_outside_its_folder_is_refused(tmp_path):
    """A shared index's shard.json could name ../../file or a link: never followed."""
    import json

    from stylegen.errors import DataError
    from stylegen.index.shards import write_shard

    outside = tmp_path / "secret.npy"
    np.save(outside, np.ones((1, 4), np.float16))
    shard = write_shard(tmp_path / "idx", {"style": np.ones((1, 4), np.float32)},
                        pd.DataFrame({"image": ["a.png"], "content_hash": ["ha"]}), {"ingest_id": "x"})
    info = json.loads((shard.path / "shard.json").read_text())
    for named in ("../../../secret.npy", str(outside)):
        (shard.path / "shard.json").write_text(json.dumps({**info, "raw_files": {"style": named}}))
        with pytest.raises(DataError, match="outside its folder"):
            list_shards(tmp_path / "idx")[0].raw()
    (shard.path / "raw_style.npy").unlink()
    (shard.path / "raw_style.npy").symlink_to(outside)
    (shard.path / "shard.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="outside its folder"):
        list_shards(tmp_path / "idx")[0].raw()
