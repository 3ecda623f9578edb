from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stylegen
import stylegen.features
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
    sims, ids = index.search(index.vectors[:1], k=3)
    assert ids[0, 0] == 0 and sims[0, 0] == pytest.approx(1.0, abs=1e-4)


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

    monkeypatch.setattr("stylegen.store.faiss.write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        run(genre_folder, tmp_path / "idx")
    monkeypatch.undo()
    assert len(stylegen.Index.open(tmp_path / "idx")) == 6
    assert not list((tmp_path / "idx").glob(".tmp-*"))


def test_interrupted_embedding_resumes_from_checkpoints(genre_folder, tmp_path, monkeypatch):
    from stylegen.runtime import GraphFeaturizer

    calls = {"n": 0}

    def flaky(original):
        def call(self, pixels):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return original(self, pixels)

        return call

    for featurizer in (stylegen.features.Featurizer, GraphFeaturizer):  # whichever runtime runs
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
    from stylegen import runtime

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
    _, ids = index.search(index.vectors[:5], k=1)
    assert list(ids[:, 0]) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("device, cpus, workers, batch", [
    ("cpu", 2, 0, 16), ("cpu", 16, 4, 16), ("cuda", 2, 1, 64), ("cuda", 32, 8, 64)])
def test_device_defaults_for_decode_workers_and_batch(device, cpus, workers, batch):
    from stylegen.embed import default_batch_size, default_workers

    assert default_workers(device, cpus) == workers and default_batch_size(device) == batch
