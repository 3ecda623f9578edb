"""The Ray Data engine makes the same index as the local one (local Ray, 2 CPUs, real covers)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stylegen
from stylegen.config import CompressionConfig, EmbedConfig
from tests.conftest import COVERS_CSV, needs_real_data

pytest.importorskip("ray.data", reason="the ray extra is not installed (pip install -e '.[ray]')")


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@needs_real_data()
@pytest.mark.realdata
@pytest.mark.slow
def test_ray_engine_embeds_real_covers_like_the_local_engine(tmp_path, local_ray):
    rows = pd.read_csv(COVERS_CSV, dtype=str, keep_default_na=False).head(64)
    rows["image"] = [str(COVERS_CSV.parent / p) for p in rows["image"]]
    rows.loc[len(rows)] = {**rows.iloc[0].to_dict(), "image": str(tmp_path / "missing.jpg")}  # one bad row
    rows.to_csv(tmp_path / "covers.csv", index=False)
    cfg = EmbedConfig(compression=CompressionConfig(dims={"style": 32, "content": 32}))
    common = {"progress": False, "precision": "fp32", "batch_size": 16}
    local = stylegen.embed(tmp_path / "covers.csv", tmp_path / "local", cfg, workers=0, **common)
    ray = stylegen.embed(tmp_path / "covers.csv", tmp_path / "ray", cfg, engine="ray", checkpoint_every=24, **common)
    assert local.count == ray.count == 64 and ray.bad == local.bad == [{"image": str(tmp_path / "missing.jpg"),
                                                                         "reason": "file not found"}]
    a, b = stylegen.Index.open(tmp_path / "local"), stylegen.Index.open(tmp_path / "ray")
    assert len(list(Path(tmp_path / "ray" / "shards").glob("shard-*"))) == 3  # 24 + 24 + 16
    pd.testing.assert_frame_equal(a.metadata, b.metadata)
    assert np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)).max() <= 1e-4
    assert a.manifest["ingest_id"] == b.manifest["ingest_id"] and a.manifest["count"] == b.manifest["count"]



@pytest.mark.parametrize("asked", ["torch", "onnx"])
def test_an_actor_runs_the_runtime_asked_for(asked):
    """The driver's ``--runtime`` reaches the actors (they used to choose ``auto`` on their own)."""
    from stylegen import runtime
    from stylegen.ingest_ray import FeaturizerActor
    from stylegen.shards import describe

    if asked == "onnx" and not runtime.installed("onnx"):
        pytest.skip("onnxruntime not installed")
    cfg = EmbedConfig()
    made = runtime.load_featurizer(cfg, "cpu", "fp32", runtime=asked)
    ingest_id = describe(cfg, made.backbone, made.precision)["ingest_id"]
    actor = FeaturizerActor(cfg.to_dict(), "fp32", "cpu", ingest_id, threads=1, runtime=asked)
    assert actor.featurizer.runtime == asked
