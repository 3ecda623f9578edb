"""The model shipped in the package answers a new user with no index, no labels and no cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stylegen.index.bundle import DEFAULT_MODEL, is_bundle, packaged_models_dir
from tests.audiofiles import cover_images, embed_art, tag, write_audio
from tests.conftest import make_image

SHIPPED = packaged_models_dir() / DEFAULT_MODEL
pytestmark = pytest.mark.skipif(not is_bundle(SHIPPED), reason=f"the default model is not built at {SHIPPED} "
                                "(python scripts/build_default_model.py)")


def fresh_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``stylegen ARGS`` in an empty folder with an empty cache and no user models."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "STYLEGEN_CACHE": str(home / "cache"),
           "XDG_CACHE_HOME": str(home / "cache"), "XDG_DATA_HOME": str(home / "data")}
    env.pop("STYLEGEN_MODELS", None)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "stylegen", *args], capture_output=True, text=True, timeout=300,
                          check=False, env=env, cwd=work)


def test_the_shipped_model_is_small_plain_and_carded():
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 30 * 1024 * 1024
    assert {f.suffix for f in files} <= {".json", ".npz", ".onnx"}
    card = json.loads((SHIPPED / "model.json").read_text())
    assert len(card["classes"]) == 9 and card["rebuild"].startswith("python scripts/build_default_model.py")
    data = card["training_data"]
    assert data["covers"] == sum(data["covers_per_source"].values()) and "research" in data["usage_terms"]
    assert "provenance" in data and card["metrics"]["heads"]


def test_classify_with_no_index_answers_from_the_shipped_model(tmp_path):
    cover = make_image(tmp_path / "cover.png", 1, size=96, seed=3)
    out = fresh_cli(tmp_path, "classify", str(cover), "--json")
    assert out.returncode == 0, out.stderr
    genres = json.loads(out.stdout)["results"][0]["genres"]
    classes = json.loads((SHIPPED / "model.json").read_text())["classes"]
    assert len(genres) == 3 and {g["genre"] for g in genres} <= set(classes)
    assert not (tmp_path / "home" / "cache" / "exports").exists()  # the shipped graph served: nothing exported


def test_model_list_names_the_shipped_default(tmp_path):
    out = fresh_cli(tmp_path, "model", "list", "--json")
    assert out.returncode == 0, out.stderr
    default = [m for m in json.loads(out.stdout) if m["default"]]
    assert [m["name"] for m in default] == [DEFAULT_MODEL] and default[0]["size_bytes"] <= 30 * 1024 * 1024


def test_similar_without_an_index_says_what_to_run(tmp_path):
    cover = make_image(tmp_path / "cover.png", 1, size=96)
    out = fresh_cli(tmp_path, "similar", str(cover))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "stylegen embed" in out.stderr


def test_library_scan_with_no_index(tmp_path):
    music = tmp_path / "music" / "album"
    music.mkdir(parents=True)
    track = write_audio(music / "01.flac")
    tag(track, artist="A", album="B")
    embed_art(track, cover_images(1, tmp_path)[0])
    out = fresh_cli(tmp_path, "library", "scan", str(tmp_path / "music"), "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    albums = json.loads(out.stdout)["albums"]
    assert len(albums) == 1 and len(albums[0]["genres"]) == 3
