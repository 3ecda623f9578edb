"""The exported featurizer runtimes (ONNX Runtime, OpenVINO) against eager torch, the export
cache, runtime choice, and what the query path imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stylegen.config import BackboneConfig, EmbedConfig, FeatureConfig
from stylegen.errors import StylegenError
from stylegen.featurize import runtime
from tests.conftest import COVERS_CSV, needs_real_data

ROOT = Path(__file__).resolve().parents[1]
EXPORTED = [pytest.param(r, marks=pytest.mark.skipif(not runtime.installed(r), reason=f"{r} not installed"))
            for r in runtime.EXPORTED]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the module (an export takes seconds)."""
    return tmp_path_factory.mktemp("stylegen-cache")


@pytest.fixture
def use_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STYLEGEN_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def torch_reference():
    from stylegen.featurize.runtime import load_featurizer

    return {flip: load_featurizer(_config(flip), "cpu", "fp32", runtime="torch") for flip in (False, True)}


def _config(flip: bool = False, **features) -> EmbedConfig:
    return EmbedConfig(features=FeatureConfig(flip=flip, **features))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("name", EXPORTED)
@pytest.mark.parametrize("flip", [False, True])
def test_exported_runtime_gives_the_torch_vectors(name, flip, use_cache, torch_reference, rng):
    pixels = rng.integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    pixels[0] = pixels[0, :, ::-1]  # an asymmetric image: flip averaging must match too
    # fp32 asked for: on a CPU with AVX-512 BF16 or AMX, OpenVINO's ``auto`` is bf16 (tested below)
    feat = runtime.load_featurizer(_config(flip), "cpu", "fp32", runtime=name)
    assert (feat.runtime, feat.precision, feat.device.type) == (name, "fp32", "cpu")
    ref, out = torch_reference[flip](pixels), feat(pixels)
    assert list(out) == ["style", "content"]
    for part in ref:
        assert out[part].dtype == np.float32 and out[part].shape == ref[part].shape
        assert _cosines(ref[part], out[part]).min() > 0.9999, part
        np.testing.assert_allclose(out[part], ref[part], atol=1e-4)


@pytest.mark.parametrize("name", EXPORTED)
def test_batch_of_one_equals_the_same_image_in_a_batch(name, use_cache, rng):
    feat = runtime.load_featurizer(_config(), "cpu", runtime=name)
    pixels = rng.integers(0, 255, (4, 224, 224, 3), dtype=np.uint8)
    batch, single = feat(pixels), feat(pixels[2:3])
    np.testing.assert_allclose(single["style"][0], batch["style"][2], atol=1e-5)


@pytest.mark.skipif(not runtime.installed("onnx"), reason="onnxruntime not installed")
def test_export_is_cached_and_rebuilt_when_a_setting_changes(use_cache, monkeypatch, rng):
    first = runtime.load_featurizer(_config(), "cpu", runtime="onnx")  # exported now or earlier
    exports = sorted((use_cache / "exports").glob("*.onnx"))
    stamp = {p: p.stat().st_mtime_ns for p in exports}
    calls: list[Path] = []
    real_export = runtime.export_onnx

    def counting_export(config, path):
        calls.append(Path(path))
        return real_export(config, path)

    monkeypatch.setattr(runtime, "export_onnx", counting_export)
    runtime.load_featurizer(_config(), "cpu", runtime="onnx")  # served from the cache
    assert calls == [] and {p: p.stat().st_mtime_ns for p in exports} == stamp
    # another feature setting: a new graph is exported to a new file, the first one is kept
    other_config = _config(signed_sqrt=False)
    other = runtime.load_featurizer(other_config, "cpu", runtime="onnx")
    assert len(calls) == 1 and calls[0] not in exports and calls[0].is_file()
    assert {p: p.stat().st_mtime_ns for p in exports} == stamp
    spec = json.loads(calls[0].with_suffix(".json").read_text())
    assert spec["features"]["signed_sqrt"] is False
    assert spec["backbone"]["weights_id"] == runtime.backbones.describe(BackboneConfig()).weights_id
    # and it computes the other setting: not the cached graph's vectors
    pixels = rng.integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    assert not np.allclose(other(pixels)["style"], first(pixels)["style"], atol=1e-3)
    # each setting is then served from its own file without exporting again
    runtime.load_featurizer(other_config, "cpu", runtime="onnx")
    runtime.load_featurizer(_config(), "cpu", runtime="onnx")
    assert len(calls) == 1
    assert not list((use_cache / "exports").glob(".*.tmp"))  # written atomically, nothing left over


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("STYLEGEN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.cache_dir() == tmp_path / "xdg" / "stylegen"
    monkeypatch.setenv("STYLEGEN_CACHE", str(tmp_path / "mine"))
    assert runtime.cache_dir() == tmp_path / "mine"


def test_weights_hash_is_remembered_and_follows_the_file(use_cache, tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    first = runtime.cached_sha256(f)
    assert first == runtime.backbones.file_sha256(f)
    f.write_bytes(b"two!")  # new size and mtime: hashed again
    assert runtime.cached_sha256(f) == runtime.backbones.file_sha256(f) != first


def test_runtime_choice(monkeypatch):
    cfg = EmbedConfig()
    monkeypatch.setattr(runtime, "installed", lambda r: r == "openvino")
    assert runtime.resolve_runtime("auto", "cpu", cfg) == "openvino"
    assert runtime.resolve_runtime("auto", "cuda", cfg) == "torch"  # GPUs stay on torch
    clip = replace(cfg, backbone=BackboneConfig(name="open_clip:RN50"))
    assert runtime.resolve_runtime("auto", "cpu", clip) == "torch"  # not exportable
    with pytest.raises(StylegenError, match="pip install onnxruntime"):
        runtime.resolve_runtime("onnx", "cpu", cfg)
    with pytest.raises(StylegenError, match="runs on the CPU"):
        runtime.resolve_runtime("openvino", "cuda", cfg)
    with pytest.raises(StylegenError, match="runtime must be one of"):
        runtime.resolve_runtime("tensorrt", "cpu", cfg)
    monkeypatch.setattr(runtime, "installed", lambda r: False)
    assert runtime.resolve_runtime("auto", "cpu", cfg) == "torch"  # nothing exported installed


@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_runtime_choice_follows_the_precision_a_graph_can_compute(monkeypatch, bf16_cpu):
    cfg = EmbedConfig()
    monkeypatch.setattr(runtime, "installed", lambda r: True)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: bf16_cpu)
    assert runtime.graph_precision("onnx", "auto") == "fp32" and runtime.graph_precision("onnx", "bf16") is None
    assert runtime.graph_precision("openvino", "auto") == ("bf16" if bf16_cpu else "fp32")
    for precision in ("auto", "fp32"):
        assert runtime.resolve_runtime("auto", "cpu", cfg, precision) == "onnx"
    # a bf16 index (made on an AMX CPU) is added to by what computes bf16, never silently at fp32
    assert runtime.resolve_runtime("auto", "cpu", cfg, "bf16") == ("openvino" if bf16_cpu else "torch")
    assert runtime.resolve_runtime("auto", "cpu", cfg, "fp16") == "torch"
    with pytest.raises(StylegenError, match="cannot compute bf16"):
        runtime.resolve_runtime("onnx", "cpu", cfg, "bf16")
    with pytest.raises(StylegenError, match="precision must be one of"):
        runtime.resolve_runtime("auto", "cpu", cfg, "int4")


def test_unknown_tap_is_refused_without_building(tmp_path):
    with pytest.raises(StylegenError, match="no tap 'stage9'"):
        runtime.backbones.describe(BackboneConfig(taps=("stage9",)))


def _imports_after(code: str, env: dict[str, str]) -> set[str]:
    probe = f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout
    return {m.split(".")[0] for m in json.loads(out.strip().splitlines()[-1])}


def test_cli_and_package_import_no_heavy_modules():
    loaded = _imports_after("import stylegen, stylegen.apps.cli", {})
    assert not loaded & {"torch", "sklearn", "faiss", "pandas", "onnxruntime", "openvino", "rich"}
    loaded = _imports_after("import stylegen.query.engine, stylegen.heads, stylegen.index.compress, stylegen.sources.labels", {})
    assert not loaded & {"torch", "sklearn", "onnxruntime", "openvino"}


@pytest.mark.skipif(not runtime.installed("onnx"), reason="onnxruntime not installed")
def test_exported_featurizer_serves_without_torch(use_cache):
    runtime.load_featurizer(_config(), "cpu", runtime="onnx")  # fills the cache
    code = ("import numpy as np\nfrom stylegen.config import EmbedConfig\nfrom stylegen.featurize.runtime import load_featurizer\n"
            "f = load_featurizer(EmbedConfig(), 'cpu', runtime='onnx')\n"
            "f(np.zeros((1, 224, 224, 3), np.uint8))")
    loaded = _imports_after(code, {"STYLEGEN_CACHE": str(use_cache)})
    assert "onnxruntime" in loaded and not loaded & {"torch", "sklearn"}


@pytest.mark.skipif(not runtime.installed("onnx"), reason="onnxruntime not installed")
def test_embedding_with_an_exported_runtime_imports_no_torch(use_cache, tmp_path, rng):
    """``stylegen embed`` on ONNX Runtime: decoding inline, manifest and all, torch stays out
    (its import alone is ~2 s of a CLI call); an append needs no scikit-learn either."""
    from PIL import Image

    runtime.load_featurizer(_config(), "cpu", runtime="onnx")  # fills the cache
    src = tmp_path / "covers"
    src.mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(src / f"{i}.png")
    embed = ("import stylegen\nfrom stylegen.config import EmbedConfig\n"
             "r = stylegen.embed({src!r}, {idx!r}, {cfg}, device='cpu', runtime='onnx', progress=False)\n"
             "assert r.added == {n} and r.count == {count}, r.summary()")
    idx = str(tmp_path / "idx")
    new = _imports_after(embed.format(src=str(src), idx=idx, cfg="EmbedConfig()", n=7, count=7),
                         {"STYLEGEN_CACHE": str(use_cache)})
    assert "onnxruntime" in new and "sklearn" in new and "torch" not in new  # PCA is fitted with sklearn
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(src / "new.png")
    append = _imports_after(embed.format(src=str(src), idx=idx, cfg="None", n=1, count=8),
                            {"STYLEGEN_CACHE": str(use_cache)})
    assert "onnxruntime" in append and not append & {"torch", "sklearn"}


@pytest.mark.realdata
@needs_real_data()
@pytest.mark.parametrize("name", EXPORTED)
def test_real_covers_match_torch_fp32(name, use_cache, torch_reference):
    """200 real covers: every raw part vector within cosine 0.999 of eager torch fp32."""
    import pandas as pd

    from stylegen.sources import images

    rows = pd.read_csv(COVERS_CSV).sample(200, random_state=0)
    spec = torch_reference[False].backbone.preprocess
    pixels = np.stack([images.prepare(COVERS_CSV.parent / p, spec) for p in rows["image"]])
    feat = runtime.load_featurizer(_config(), "cpu", "fp32", runtime=name)
    for i in range(0, len(pixels), 50):
        ref, out = torch_reference[False](pixels[i:i + 50]), feat(pixels[i:i + 50])
        for part in ref:
            assert _cosines(ref[part], out[part]).min() >= 0.999, (part, i)
