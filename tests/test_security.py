"""Opening someone else's index runs none of their code, and stylegen deletes only what it wrote.

Each test here failed on the main of issue 19 (a crafted head set made `classify` write a
file; a foreign manifest made stylegen load the weights it named; `embed` wrote into a
folder of the user's; a commit removed a user's folder that looked like a version; `train`
took no lock; the map page and CSV outputs let a title become markup or a formula).
"""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from stylegen.errors import StylegenError
from stylegen.heads.io import head_sets, read_head_set
from stylegen.heads.train import train
from stylegen.index.store import exclusive, snapshots
from stylegen.util.persist import VersionedFolder
from stylegen.util.tables import safe_cell, safe_frame
from tests.conftest import embed_tiny, make_image, planted_rows

GENRES = ["jazz", "metal", "pop"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny trained index (3 genres x 6 generated covers) and its source folder."""
    root = tmp_path_factory.mktemp("collection")
    pd.DataFrame(planted_rows(root, GENRES, 6, lambda g, i: {"artist": f"a{g}{i % 3}"})).to_csv(
        root / "train.csv", index=False)
    embed_tiny(root / "train.csv", root / "idx")
    with threadpool_limits(1):
        train(root / "idx", heads=("linear", "knn"), validate=False)
    return root, root / "idx"


def copy_index(collection, tmp_path: Path) -> Path:
    shutil.copytree(collection[1], tmp_path / "idx")
    return tmp_path / "idx"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stylegen", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


class WritesAFile:
    """A pickle that, when loaded, creates ``marker``: what a crafted head file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


# ---- 1. opening an index runs none of its code --------------------------------------------
def test_a_crafted_pickled_head_set_is_refused_without_being_unpickled(collection, tmp_path):
    idx = copy_index(collection, tmp_path)
    marker = tmp_path / "pwned"
    folder = Path(read_head_set(idx)["dir"])
    for name in read_head_set(idx)["heads"]:  # each head only as a pickle with a valid sidecar
        sidecar = next(p for p in (folder / f"{name}.json", folder / f"{name}.joblib.json") if p.is_file())
        info = sidecar.read_text()
        for f in folder.glob(f"{name}.*"):
            f.unlink()
        joblib.dump(WritesAFile(marker), folder / f"{name}.joblib")
        (folder / f"{name}.joblib.json").write_text(info)
    cover = make_image(tmp_path / "query.png", 1, seed=99)
    for method in ("head", "knn"):
        line = one_line_error(cli("classify", str(cover), "--index", str(idx), "--method", method))
        assert "pickle" in line and "stylegen train" in line
    assert not marker.exists()


@pytest.mark.parametrize("pointer", ["../../elsewhere", "/etc", "set-000001/../../x", "link"])
def test_current_pointers_never_leave_the_index(collection, tmp_path, pointer):
    idx = copy_index(collection, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(head_sets(idx).current(), outside)
    (idx / "heads" / "link").symlink_to(outside, target_is_directory=True)
    (idx / "heads" / "CURRENT").write_text(pointer + "\n")
    cover = make_image(tmp_path / "query.png", 1, seed=99)
    line = one_line_error(cli("classify", str(cover), "--index", str(idx)))
    assert "not a version" in line or "not a folder" in line


def test_a_snapshot_pointer_never_leaves_the_index(collection, tmp_path):
    idx = copy_index(collection, tmp_path)
    shutil.copytree(snapshots(idx).current(), tmp_path / "v000009")
    (idx / "CURRENT").write_text("../v000009\n")
    line = one_line_error(cli("similar", str(make_image(tmp_path / "q.png", 1)), "--index", str(idx)))
    assert "damaged" in line


def with_named_weights(idx: Path, weights: str) -> None:
    """Make the index's manifest name backbone weights, as an index shared by a stranger can."""
    snap = snapshots(idx).current()
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["config"]["backbone"]["weights"] = weights
    (snap / "manifest.json").write_text(json.dumps(manifest))


def test_weights_a_manifest_names_are_loaded_only_when_the_user_names_them(collection, tmp_path):
    from stylegen.config import BackboneConfig
    from stylegen.featurize.backbones import _lite_weights

    idx = copy_index(collection, tmp_path)
    crafted = tmp_path / "weights.pth"
    crafted.write_bytes(b"not weights: stylegen must not even open this")
    with_named_weights(idx, str(crafted))
    cover = make_image(tmp_path / "query.png", 1, seed=99)
    line = one_line_error(cli("classify", str(cover), "--index", str(idx), "--method", "knn"))
    assert "--weights" in line and str(tmp_path) not in line
    # the user names the (packaged) file the index was made with: its hash matches, it answers
    packaged = _lite_weights(BackboneConfig())
    ok = cli("classify", str(cover), "--index", str(idx), "--method", "knn", "--weights", packaged)
    assert ok.returncode == 0, ok.stderr
    assert "query.png:" in ok.stdout


def test_adding_covers_to_an_index_that_names_weights_needs_them_named(collection, tmp_path):
    from stylegen.index.ingest import embed

    idx = copy_index(collection, tmp_path)
    with_named_weights(idx, "laion2b_s34b_b79k")  # a hub tag: would be a download
    new = tmp_path / "new"
    new.mkdir()
    make_image(new / "extra.png", 2, seed=5)
    with pytest.raises(StylegenError, match="--weights"):
        embed(new, idx, workers=0, progress=False, precision="fp32")


# ---- 2. stylegen deletes only what it wrote ----------------------------------------------
def test_embed_refuses_a_folder_that_is_neither_empty_nor_an_index(collection, tmp_path):
    root, _ = collection
    mine = tmp_path / "photos"
    (mine / "v2_family_photos").mkdir(parents=True)
    (mine / "v2_family_photos" / "me.jpg").write_bytes(b"x")
    (mine / ".tmp-notes").write_text("keep me")
    line = one_line_error(cli("embed", str(root / "train.csv"), "--index", str(mine), "--no-progress"))
    assert "not empty and is not a stylegen index" in line
    assert sorted(p.name for p in mine.iterdir()) == [".tmp-notes", "v2_family_photos"]


def test_files_put_in_an_index_survive_appends_and_training(collection, tmp_path):
    root, _ = collection
    idx = copy_index(collection, tmp_path)
    users = [idx / "v2_family_photos", idx / ".tmp-notes", idx / "v000042", idx / "heads" / "set-000042"]
    for folder in users:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    new = tmp_path / "new"
    new.mkdir()
    for i in range(3):
        make_image(new / f"extra{i}.png", i, seed=50 + i)
    embed_tiny(new, idx)
    with threadpool_limits(1):
        train(idx, heads=("knn",), validate=False)
        train(idx, heads=("knn",), validate=False)
    assert all((folder / "keep.txt").read_text() == "mine" for folder in users)
    assert snapshots(idx).current_name() != "v000042" and len(snapshots(idx).written()) == 1
    assert len(head_sets(idx).written()) == 1


def test_a_versioned_folder_removes_only_versions_it_wrote(tmp_path):
    folder = VersionedFolder(tmp_path, "v")
    (tmp_path / "v000007").mkdir()  # looks like a version; stylegen never wrote it
    first = folder.commit(lambda t: (t / "a").write_text("1"))
    second = folder.commit(lambda t: (t / "a").write_text("2"))
    assert (first.name, second.name) == ("v000008", "v000009")
    assert not first.exists() and (tmp_path / "v000007").is_dir()
    assert folder.current() == second and folder.written() == ["v000009"]


# ---- 8. train takes the index's lock ------------------------------------------------------
def test_train_waits_for_no_one_and_refuses_while_another_run_writes(collection, tmp_path):
    idx = copy_index(collection, tmp_path)
    before = read_head_set(idx)
    with exclusive(idx), pytest.raises(StylegenError, match="another stylegen run is writing"):
        train(idx, heads=("knn",), validate=False)
    assert read_head_set(idx)["dir"] == before["dir"]


def test_train_on_a_missing_index_leaves_no_folder_behind(tmp_path):
    with pytest.raises(StylegenError, match="no stylegen index"):
        train(tmp_path / "absent", heads=("knn",))
    assert not (tmp_path / "absent").exists()


# ---- 7. pages and CSV files written for people --------------------------------------------
def test_the_map_page_keeps_every_title_inside_its_data():
    from stylegen.apps.maps import map_html

    evil = "<!--<script>alert(1)</script>"
    page = map_html({"points": [{"artist": evil, "title": "a & b"}]}, title="</title><script>")
    data = page.split("<script id='map-data' type='application/json'>", 1)[1].split("</script>", 1)[0]
    assert "<" not in data and ">" not in data
    assert json.loads(data)["points"][0]["artist"] == evil
    assert "</title><script>" not in page


@pytest.mark.parametrize("text", ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\t=1"])
def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(text):
    assert safe_cell(text) == "'" + text
    frame = safe_frame(pd.DataFrame({text: [text, "-3.5", 4]}, index=[text, "b", "c"]))
    assert frame.columns[0] == "'" + text and frame.index[0] == "'" + text
    assert frame.iloc[:, 0].tolist() == ["'" + text, "-3.5", 4]  # numbers, even negative, unchanged


def test_bad_files_csv_is_neutralised(tmp_path):
    import stylegen

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        make_image(src / f"ok{i}.png", i)
    (src / "=cmd.png").write_bytes(b"not an image")
    stylegen.embed(src, tmp_path / "idx", workers=0, progress=False, precision="fp32")
    bad = (tmp_path / "idx" / "bad_files.csv").read_text()
    assert "'=cmd.png" in bad or "'" + str(src / "=cmd.png") in bad
