"""Ingest shards + build: resume, append with a frozen compressor, deliberate refit.

The first four tests are the issue-9 resume bugs; each fails on the pending/-checkpoint code
that shards replaced (the scenario is driven through public entry points only).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stylegen
import stylegen.featurize.features
import stylegen.util.persist
from stylegen.config import CompressionConfig, EmbedConfig
from stylegen.index.shards import list_shards, write_shard
from tests.conftest import make_image

SMALL = EmbedConfig(compression=CompressionConfig(dims={"style": 4, "content": 4}))


def run(source, index, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("precision", "fp32")
    kw.setdefault("runtime", "torch")  # these tests interrupt and vary torch's featurizer
    return stylegen.embed(source, index, kw.pop("config", SMALL), **kw)


def folder(root: Path, n: int, seed: int = 0) -> Path:
    for i in range(n):
        make_image(root / f"c{seed}_{i}.png", kind=i, seed=seed * 1000 + i)
    return root


def die_on_call(monkeypatch, n: int) -> None:
    """The featurizer's ``n``-th call kills the run (as a SIGKILL would, mid-ingest)."""
    calls = {"n": 0}
    original = stylegen.featurize.features.Featurizer.__call__

    def flaky(self, pixels):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, pixels)

    monkeypatch.setattr(stylegen.featurize.features.Featurizer, "__call__", flaky)


def by_hash(index_dir: Path) -> dict[str, np.ndarray]:
    index = stylegen.Index.open(index_dir)
    return dict(zip(index.metadata["content_hash"], np.asarray(index.vectors), strict=True))


def test_run_killed_after_current_switched_adds_no_duplicates(tmp_path, monkeypatch):
    src = folder(tmp_path / "src", 6)
    original = stylegen.util.persist.atomic_write_text

    def die_after_switch(path, text):
        original(path, text)
        if Path(path).name == "CURRENT":
            raise KeyboardInterrupt  # dies after the switch, before any clean-up

    monkeypatch.setattr(stylegen.util.persist, "atomic_write_text", die_after_switch)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "idx", batch_size=2, checkpoint_every=2)
    monkeypatch.undo()
    make_image(src / "new.png", kind=1, seed=77)
    report = run(src, tmp_path / "idx", batch_size=2, checkpoint_every=2)
    meta = stylegen.Index.open(tmp_path / "idx").metadata
    assert report.count == 7 and len(meta) == 7 and meta["content_hash"].is_unique


def test_shards_of_another_source_are_built_not_wedged(tmp_path, monkeypatch):
    a, b = folder(tmp_path / "a", 6, seed=1), folder(tmp_path / "b", 3, seed=2)
    die_on_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(a, tmp_path / "idx", batch_size=2, checkpoint_every=2)  # 2 shards of a written
    monkeypatch.undo()
    report = run(b, tmp_path / "idx", batch_size=2, checkpoint_every=2)
    meta = stylegen.Index.open(tmp_path / "idx").metadata
    assert report.count == 7 and meta["content_hash"].is_unique
    assert sorted(meta["image"]) == sorted([f"c1_{i}.png" for i in range(4)] + [f"c2_{i}.png" for i in range(3)])


def test_a_deleted_shard_never_lets_the_next_overwrite_a_good_one(tmp_path, monkeypatch):
    src = folder(tmp_path / "src", 8)
    die_on_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "idx", batch_size=2, checkpoint_every=2)
    first, second = list_shards(tmp_path / "idx")
    kept = (second.name, second.hashes())
    import shutil

    shutil.rmtree(first.path)  # a shard lost by hand
    die_on_call(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "idx", batch_size=2, checkpoint_every=2)  # writes one more shard
    monkeypatch.undo()
    shards = list_shards(tmp_path / "idx")
    assert len(shards) == 2 and (shards[0].name, shards[0].hashes()) == kept
    assert not set(shards[1].hashes()) & set(kept[1])
    report = run(src, tmp_path / "idx", batch_size=2, checkpoint_every=2)
    assert report.resumed == 4 and report.count == 8


def test_shards_of_another_precision_are_not_resumed(tmp_path, monkeypatch):
    src = folder(tmp_path / "src", 6)
    die_on_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "idx", batch_size=2, checkpoint_every=2, precision="bf16")
    monkeypatch.undo()
    report = run(src, tmp_path / "idx", batch_size=2, checkpoint_every=2, precision="fp32")
    assert report.resumed == 0 and report.count == 6
    run(src, tmp_path / "clean", batch_size=2, checkpoint_every=2, precision="fp32")
    got, clean = by_hash(tmp_path / "idx"), by_hash(tmp_path / "clean")
    assert max(np.abs(got[h] - clean[h]).max() for h in clean) < 1e-5
    assert {s.info["precision"] for s in list_shards(tmp_path / "idx")} == {"fp32"}


def test_explicit_other_precision_on_an_index_is_refused(tmp_path):
    src = folder(tmp_path / "src", 3)
    run(src, tmp_path / "idx")
    make_image(src / "new.png", kind=1, seed=77)
    with pytest.raises(stylegen.errors.IndexMismatchError, match="precision fp32, asked for bf16"):
        run(src, tmp_path / "idx", precision="bf16")
    assert run(src, tmp_path / "idx", precision="auto").count == 4  # auto: the index's precision


def stylegen_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylegen", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_embed_refuses_other_dim_and_weights_on_an_existing_index(tmp_path):
    src = folder(tmp_path / "src", 3)
    run(src, tmp_path / "idx")
    result = stylegen_cli("embed", str(src), "--index", str(tmp_path / "idx"), "--dim", "8", "--no-progress")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "compression.dims" in lines[0], lines[0]
    from stylegen.index.ingest import requested_config

    for option, value, field in [("style_weight", 2.0, "features.weights.style"),
                                 ("content_weight", 0.5, "features.weights.content"),
                                 ("image_size", 96, "backbone.image_size")]:
        with pytest.raises(stylegen.errors.IndexMismatchError, match=field):
            run(src, tmp_path / "idx", config=requested_config(tmp_path / "idx", **{option: value}))
    assert requested_config(tmp_path / "idx") is None  # nothing asked: the index's own settings
    assert run(src, tmp_path / "idx", config=requested_config(tmp_path / "idx", dim=4)).already_indexed == 3


def test_image_size_is_the_collections_and_every_querys_input_size(tmp_path):
    from stylegen.query.engine import Engine

    src = folder(tmp_path / "src", 3)
    result = stylegen_cli("embed", str(src), "--index", str(tmp_path / "idx"), "--image-size", "96",
                          "--dim", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    engine = Engine.open(tmp_path / "idx")
    assert engine.index.preprocess.size == 96 and engine.index.config.backbone.image_size == 96
    first = min(src.rglob("*.png"))
    stranger = engine.query(Image.open(first).convert("RGB"), k=1, classify=False)  # featurized at 96
    assert stranger.row is None and np.allclose(stranger.vector, engine.index.vectors[stranger.neighbours[0]["id"]],
                                                atol=1e-4)


def test_image_size_is_the_default_for_a_new_index_and_kept_or_native_on_an_existing_one(tmp_path, rng):
    """A new index reads at DEFAULT_IMAGE_SIZE (not the backbone's native size); asking for
    another backbone reads at its native size unless a size is given; on an existing index a
    changed tap set keeps the index's size, and no options mean the index's own settings."""
    from stylegen.config import DEFAULT_IMAGE_SIZE, BackboneConfig
    from stylegen.featurize.backbones import describe
    from stylegen.index.ingest import requested_config
    from tests.conftest import write_index

    def size(config) -> int:
        return describe(config.backbone).preprocess.size  # what the decoder will produce

    lite0_native, lite1_native = (describe(BackboneConfig(name=n)).preprocess.size
                                  for n in ("efficientnet-lite0", "efficientnet-lite1"))
    assert DEFAULT_IMAGE_SIZE not in (lite0_native, lite1_native)  # else nothing below tells them apart
    assert size(requested_config(tmp_path / "new")) == DEFAULT_IMAGE_SIZE
    assert size(requested_config(tmp_path / "new", backbone="efficientnet-lite1")) == lite1_native
    assert size(requested_config(tmp_path / "new", backbone="efficientnet-lite1", image_size=288)) == 288

    raw = {p: rng.normal(size=(12, 16)).astype(np.float32) for p in ("style", "content")}
    meta = pd.DataFrame({"image": [f"{i}.png" for i in range(12)], "content_hash": [f"h{i}" for i in range(12)]})
    at_96 = EmbedConfig(backbone=BackboneConfig(image_size=96), compression=CompressionConfig(dims={"style": 4, "content": 4}))
    write_index(tmp_path / "idx", raw, meta, dims=4, config=at_96.to_dict())
    assert requested_config(tmp_path / "idx") is None
    assert size(requested_config(tmp_path / "idx", taps=("stage5",))) == 96
    assert size(requested_config(tmp_path / "idx", backbone="efficientnet-lite1")) == lite1_native


def test_adding_covers_keeps_old_vectors_feature_id_and_heads(tmp_path):
    from stylegen.heads.train import train
    from stylegen.query.engine import Engine

    rows = [{"image": f"img/{g}{i}.png", "genre": g} for g in ("jazz", "metal") for i in range(6)]
    for k, r in enumerate(rows):
        make_image(tmp_path / r["image"], kind=0 if r["genre"] == "jazz" else 1, seed=k)
    pd.DataFrame(rows[:10]).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "all.csv", index=False)
    idx = tmp_path / "idx"
    run(tmp_path / "a.csv", idx)
    train(idx, ["linear", "knn"], validate=False)
    before = stylegen.Index.open(idx)
    old_vectors, old_id = np.array(before.vectors), before.feature_id
    report = run(tmp_path / "all.csv", idx)
    after = stylegen.Index.open(idx)
    assert report.added == 2 and len(after) == 12 and after.feature_id == old_id
    assert np.array_equal(np.asarray(after.vectors[:10]), old_vectors)  # bit-identical
    assert list(after.metadata["image"]) == [r["image"] for r in rows]
    assert after.manifest["compression_fit"] == {"rows": 10, "sample": 10, "max_sample": 100_000, "seed": 0}
    _, ids = after.search(after.vectors[10:], k=1)
    assert list(ids[:, 0]) == [10, 11]  # the appended rows are in the faiss index
    engine = Engine.open(idx)  # heads trained before the add still load and predict
    proba, classes = engine.predict_proba(np.asarray(after.vectors[10:]), "head")[:2]
    assert classes == ["jazz", "metal"] and proba.shape == (2, 2)

    result = stylegen_cli("index", str(idx), "--refit", "--max-sample", "8")
    assert result.returncode == 0 and "train the heads again" in result.stdout, result.stderr
    refit = stylegen.Index.open(idx)
    assert refit.feature_id != old_id and len(refit) == 12
    assert refit.manifest["compression_fit"]["sample"] == 8
    assert list(refit.metadata["content_hash"]) == list(after.metadata["content_hash"])  # rows stay put
    with pytest.raises(stylegen.errors.IndexMismatchError, match="train"):
        Engine.open(idx).predict_proba(np.asarray(refit.vectors[:1]), "head")
    train(idx, ["linear"], validate=False)
    again = stylegen_cli("index", str(idx), "--refit", "--max-sample", "8")  # same seeded sample and fit
    assert again.returncode == 0 and "trained heads stay valid" in again.stdout, again.stderr
    assert stylegen.Index.open(idx).feature_id == refit.feature_id
    assert Engine.open(idx).predict_proba(np.asarray(refit.vectors[:1]), "head")[0].shape == (1, 2)


def test_index_command_builds_shards_written_without_a_build(tmp_path, rng):
    """Shards are the ingest format: any writer (here: by hand, as a Ray actor would) can add them."""
    src = folder(tmp_path / "src", 4)
    run(src, tmp_path / "idx")
    shard = list_shards(tmp_path / "idx")[0]
    raw = {p: np.asarray(x, np.float32) + rng.normal(0, 0.01, x.shape).astype(np.float32)
           for p, x in shard.raw().items()}
    meta = shard.metadata()
    meta["content_hash"] = [h[::-1] for h in meta["content_hash"]]  # four "new" covers
    meta["image"] = [f"extra{i}.png" for i in range(len(meta))]
    write_shard(tmp_path / "idx", raw, meta, {k: v for k, v in shard.info.items() if k not in ("count", "parts")})
    from stylegen.index.ingest import build

    result = build(tmp_path / "idx")
    assert (result.added, result.shards, result.count, result.refit) == (4, 1, 8, False)
    manifest = json.loads((tmp_path / "idx" / (tmp_path / "idx" / "CURRENT").read_text().strip()
                           / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and manifest["count"] == 8
