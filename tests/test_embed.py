from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stylegen
import stylegen.featurize.features
from stylegen.config import CompressionConfig, EmbedConfig
from tests.conftest import COVERS_CSV, add_bad_files, make_image, needs_real_data

SMALL = EmbedConfig(compression=CompressionConfig(dims={"style": 4, "content": 4}))


def run(source, index, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("precision", "fp32")
    return stylegen.embed(source, index, kw.pop("config", SMALL), **kw)


def test_folder_labels_come_from_subfolders(genre_folder, tmp_path):
    report = run(genre_folder, tmp_path / "idx")
    assert report.added == 6 and report.count == 6 and not report.bad
    index = stylegen.Index.open(tmp_path / "idx")
    assert sorted(index.metadata["genre"]) == ["jazz"] * 3 + ["metal"] * 3
    assert index.vectors.shape == (6, index.manifest["dim"])
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, rtol=1e-5)


def test_stored_vectors_are_the_query_paths_vectors_of_the_same_pictures(genre_folder, tmp_path):
    """Each row's stored vector is what the query side computes for that row's picture (a
    decoded image is embedded afresh, not looked up): ingest and query decode, featurize and
    compress alike, and vectors and metadata rows are not shuffled against each other."""
    from PIL import Image

    from stylegen.query.engine import Engine

    run(genre_folder, tmp_path / "idx")
    engine = Engine.open(tmp_path / "idx", device="cpu")
    stored = np.asarray(engine.index.vectors)
    for row, path in enumerate(engine.index.metadata["path"]):
        with Image.open(path) as img:
            fresh = engine.query(img.convert("RGB"), k=2, classify=False)
        assert fresh.row is None  # embedded, not answered from the stored vector
        np.testing.assert_allclose(fresh.vector, stored[row], atol=2e-3)  # shards keep raw as fp16
        assert fresh.neighbours[0]["id"] == row


def test_rerun_adds_only_new_images(genre_folder, tmp_path):
    run(genre_folder, tmp_path / "idx")
    again = run(genre_folder, tmp_path / "idx")
    assert again.added == 0 and again.already_indexed == 6
    make_image(genre_folder / "jazz" / "new.jpg", kind=0, seed=99)
    more = run(genre_folder, tmp_path / "idx")
    assert more.added == 1 and more.already_indexed == 6 and more.count == 7
    index = stylegen.Index.open(tmp_path / "idx")
    assert index.metadata["content_hash"].is_unique and len(index.metadata) == 7


def test_mixed_good_and_bad_files_index_the_good_and_report_the_bad(genre_folder, tmp_path):
    expected = add_bad_files(genre_folder)
    report = run(genre_folder, tmp_path / "idx")
    assert report.added == 6
    reasons = {Path(b["image"]).name: b["reason"] for b in report.bad}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    listed = pd.read_csv(tmp_path / "idx" / "bad_files.csv")
    assert len(listed) == len(expected)


def test_manifest_with_missing_path_is_reported_not_fatal(genre_folder, tmp_path):
    csv = tmp_path / "m.csv"
    pd.DataFrame({"image": ["covers/jazz/jazz0.jpg", "covers/nope.jpg"], "genre": ["jazz", "rock"],
                  "artist": ["A", "B"]}).to_csv(csv, index=False)
    report = run(csv, tmp_path / "idx")
    assert report.added == 1 and report.bad == [{"image": "covers/nope.jpg", "reason": "file not found"}]
    meta = stylegen.Index.open(tmp_path / "idx").metadata
    assert meta.loc[0, "artist"] == "A"


def test_interrupted_write_leaves_previous_index_intact(genre_folder, tmp_path, monkeypatch):
    run(genre_folder, tmp_path / "idx")
    make_image(genre_folder / "jazz" / "new.jpg", kind=0, seed=99)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("stylegen.index.store.faiss.write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        run(genre_folder, tmp_path / "idx")
    monkeypatch.undo()
    assert len(stylegen.Index.open(tmp_path / "idx")) == 6
    assert not list((tmp_path / "idx").glob(".tmp-*"))


def test_interrupted_embedding_resumes_from_checkpoints(genre_folder, tmp_path, monkeypatch):
    from stylegen.featurize.runtime import GraphFeaturizer

    calls = {"n": 0}

    def flaky(original):
        def call(self, pixels):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return original(self, pixels)

        return call

    for featurizer in (stylegen.featurize.features.Featurizer, GraphFeaturizer):  # whichever runtime runs
        monkeypatch.setattr(featurizer, "__call__", flaky(featurizer.__call__))
    with pytest.raises(KeyboardInterrupt):
        run(genre_folder, tmp_path / "idx", batch_size=2, checkpoint_every=2)
    assert not (tmp_path / "idx" / "CURRENT").exists()
    report = run(genre_folder, tmp_path / "idx", batch_size=2, checkpoint_every=2)
    assert report.resumed == 4 and report.added == 6 and report.count == 6


def test_other_settings_are_refused(genre_folder, tmp_path):
    run(genre_folder, tmp_path / "idx")
    other = EmbedConfig(compression=CompressionConfig(dims={"style": 8, "content": 4}))
    with pytest.raises(stylegen.errors.IndexMismatchError, match="compression.dims.style"):
        run(genre_folder, tmp_path / "idx", config=other)
    with pytest.raises(stylegen.errors.IndexMismatchError):
        stylegen.Index.open(tmp_path / "idx").check_compatible(other)


def test_a_bf16_index_grows_at_bf16_with_default_options(genre_folder, tmp_path, monkeypatch):
    """An index made at bf16 (the default on AMX CPUs) takes new covers without options: the
    exported graphs compute fp32 here, so ``auto`` picks a runtime that computes bf16."""
    from stylegen.featurize import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)  # any CI CPU: torch computes bf16
    idx = tmp_path / "idx"
    run(genre_folder, idx, precision="bf16", runtime="torch")
    make_image(genre_folder / "jazz" / "new.jpg", kind=2, seed=99)
    with pytest.raises(stylegen.errors.StylegenError, match="cannot compute bf16"):
        run(genre_folder, idx, precision="auto", runtime="onnx")
    report = run(genre_folder, idx, precision="auto")
    manifest = stylegen.Index.open(idx).manifest
    assert report.added == 1 and report.count == 7
    assert (manifest["precision"], manifest["runtime"]) == ("bf16", "torch")


@needs_real_data()
@pytest.mark.realdata
def test_real_covers_embed_with_their_metadata(tmp_path):
    rows = pd.read_csv(COVERS_CSV).head(24)
    rows["image"] = [str(COVERS_CSV.parent / p) for p in rows["image"]]  # absolute paths work too
    csv = tmp_path / "covers.csv"
    rows.to_csv(csv, index=False)
    report = run(csv, tmp_path / "idx", precision="auto", workers=1)
    assert report.added == 24 and not report.bad
    index = stylegen.Index.open(tmp_path / "idx")
    assert set(rows.columns) <= set(index.metadata.columns)
    # a near-duplicate (downscaled, re-encoded: other bytes, so embedded afresh) finds its
    # original first and far closer than a made-up picture comes to any real cover
    import io

    from PIL import Image

    from stylegen.query.engine import Engine

    engine = Engine.open(tmp_path / "idx", device="cpu")
    near = []
    for row in range(5):
        with Image.open(rows["image"][row]) as img:
            buf = io.BytesIO()
            img.convert("RGB").resize((img.width * 9 // 10, img.height * 9 // 10)).save(buf, "JPEG", quality=70)
        hit = engine.query(buf.getvalue(), k=1, classify=False)
        assert hit.row is None and hit.neighbours[0]["id"] == row
        near.append(hit.neighbours[0]["similarity"])
    stranger = engine.query(make_image(tmp_path / "stranger.png", kind=1), k=1, classify=False)
    assert stranger.neighbours[0]["similarity"] < min(near) - 0.05


def test_decode_worker_processes_give_the_inline_vectors_and_bad_files(genre_folder, tmp_path, monkeypatch):
    """workers > 0 decodes in torch DataLoader processes: the same rows, vectors and bad-file
    reasons as decoding in this process."""
    import torch.utils.data

    expected = add_bad_files(genre_folder)
    loaders = []

    class CountingLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            loaders.append(kwargs.get("num_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountingLoader)
    inline = run(genre_folder, tmp_path / "inline", workers=0, batch_size=4)
    assert loaders == []
    pooled = run(genre_folder, tmp_path / "pooled", workers=2, batch_size=4)
    assert loaders == [2]  # the worker path ran
    assert inline.added == pooled.added == 6
    reasons = {Path(b["image"]).name: b["reason"] for b in pooled.bad}
    assert reasons == {Path(b["image"]).name: b["reason"] for b in inline.bad} and set(reasons) == set(expected)
    a, b = stylegen.Index.open(tmp_path / "inline"), stylegen.Index.open(tmp_path / "pooled")
    assert list(a.metadata["content_hash"]) == list(b.metadata["content_hash"])
    np.testing.assert_allclose(np.asarray(b.vectors), np.asarray(a.vectors), atol=1e-6)
