"""The Ray Data engine makes the same index as the local one (local Ray, 2 CPUs, real covers)."""

import subprocess
import sys
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
    from stylegen.featurize import runtime
    from stylegen.index.ingest_ray import FeaturizerActor
    from stylegen.index.shards import describe

    if asked == "onnx" and not runtime.installed("onnx"):
        pytest.skip("onnxruntime not installed")
    cfg = EmbedConfig()
    made = runtime.load_featurizer(cfg, "cpu", "fp32", runtime=asked)
    ingest_id = describe(cfg, made.backbone, made.precision)["ingest_id"]
    actor = FeaturizerActor(cfg.to_dict(), "fp32", "cpu", ingest_id, threads=1, runtime=asked)
    assert actor.featurizer.runtime == asked


def test_the_plan_fits_one_actor_on_every_node():
    from stylegen.index.ingest_ray import plan_resources

    one = plan_resources([8], 0)
    assert (one["actors"], one["actor_cpus"], one["spread"]) == (1, 7, False)
    # an actor must fit on one node: two 2-CPU nodes take a 1-CPU actor each, not one of 3 CPUs
    two = plan_resources([2, 2], 0)
    assert (two["actors"], two["actor_cpus"], two["spread"]) == (2, 1, True)
    mixed = plan_resources([16, 16, 4], 0)
    assert (mixed["actors"], mixed["actor_cpus"]) == (3, 3)
    gpu = plan_resources([16, 16], 2)
    assert (gpu["actors"], gpu["actor_cpus"], gpu["actor_gpus"], gpu["device"]) == (2, 1, 1, "cuda")


@pytest.mark.slow
def test_a_cluster_of_two_cpu_nodes_embeds_like_the_local_engine(genre_folder, tmp_path):
    """Two Ray nodes of 2 CPUs each (``ray.cluster_utils.Cluster``: real raylets on this
    machine). The plan used to ask for the cluster's CPUs minus one (3) for a single actor,
    which fits on no node, and the run waited forever; here it has 4 minutes."""
    cfg = EmbedConfig(compression=CompressionConfig(dims={"style": 4, "content": 4}))
    code = f"""
import os
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray
from ray.cluster_utils import Cluster
import stylegen
from stylegen.config import EmbedConfig
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2, "include_dashboard": False}})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
try:
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    print("nodes", sum(1 for n in ray.nodes() if n["Alive"]))
    r = stylegen.embed({str(genre_folder)!r}, {str(tmp_path / "ray")!r}, EmbedConfig.from_dict({cfg.to_dict()!r}),
                       engine="ray", address=cluster.address, progress=False, precision="fp32", checkpoint_every=4)
    print("added", r.added)
finally:
    ray.shutdown()
    cluster.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0 and "nodes 2" in out.stdout and "added 6" in out.stdout, out.stderr[-2000:]
    local = stylegen.embed(genre_folder, tmp_path / "local", cfg, workers=0, progress=False, precision="fp32")
    a, b = stylegen.Index.open(tmp_path / "local"), stylegen.Index.open(tmp_path / "ray")
    assert local.count == len(b) == 6
    pd.testing.assert_frame_equal(a.metadata, b.metadata)
    assert np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)).max() <= 1e-4

