"""The beets plugin (beetsplug/stylegen.py) in a temporary beets library: `beet import -A`
of generated audio files, then `beet stylegen` sets genres and the float field
stylegen_confidence; with `auto: yes` the import stage does it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.audiofiles import GENRES, cover_images, embed_art, tag, tiny_index, write_audio

beets = pytest.importorskip("beets", reason="beets is not installed (pip install -e '.[beets]')")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    return tiny_index(tmp_path_factory)


def make_music(root: Path, covers: list[bytes]) -> None:
    """Two albums with embedded front covers (FLAC, MP3) and one with cover.jpg only (Ogg)."""
    for a, (fmt, art) in enumerate([("flac", covers[0]), ("mp3", covers[1]), ("ogg", None)]):
        for i in range(2):
            p = write_audio(root / f"album{a}" / f"{i + 1:02d}.{fmt}", seed=i)
            tag(p, artist=f"Artist {a}", albumartist=f"Artist {a}", album=f"Album {a}", title=f"t{i}", track=i + 1)
            if art is not None:
                embed_art(p, art)
    (root / "album2" / "cover.jpg").write_bytes(covers[2])


def beet(beetsdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BEETSDIR": str(beetsdir), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "beets", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def configure(beetsdir: Path, index: Path, auto: bool) -> None:
    beetsdir.mkdir(parents=True)
    (beetsdir / "config.yaml").write_text(
        f"directory: {beetsdir / 'music'}\nlibrary: {beetsdir / 'library.db'}\nplugins: stylegen\n"
        "import:\n  copy: no\n  write: no\n  resume: no\n  incremental: no\n"
        f"stylegen:\n  index: {index}\n  min_confidence: 0.0\n  auto: {'yes' if auto else 'no'}\n")


def listing(beetsdir: Path, *query: str, albums: bool = True) -> dict[str, tuple[list[str], float | None]]:
    """album -> (genres, stylegen_confidence) from `beet ls [-a] QUERY`."""
    out = beet(beetsdir, "ls", *(["-a"] if albums else []), "-f", "$album|$genres|$stylegen_confidence", *query)
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.strip().splitlines():
        album, genres, conf = line.split("|")
        rows[album] = ([g for g in genres.split("; ") if g], None if conf in ("", "$stylegen_confidence") else float(conf))
    return rows


@pytest.fixture(scope="module")
def music(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("music")
    make_music(root, cover_images(3, root / ".gen"))
    return root


def test_beet_stylegen_sets_genres_and_typed_confidence(music, index, tmp_path):
    bd = tmp_path / "beets"
    configure(bd, index, auto=False)
    imp = beet(bd, "import", "-A", "-q", str(music))
    assert imp.returncode == 0, imp.stderr

    pretend = beet(bd, "stylegen", "-p")
    assert pretend.returncode == 0, pretend.stderr
    assert pretend.stdout.count("no genre ->") == 3
    assert listing(bd) == {f"Album {i}": ([], None) for i in range(3)}  # -p changed nothing

    run = beet(bd, "stylegen")
    assert run.returncode == 0, run.stderr
    # the tracks inherit the album's genres and confidence; a numeric range query only
    # matches a typed float field (an untyped one is compared as text)
    tracks = beet(bd, "ls", "-f", "$album|$genres|$stylegen_confidence", "stylegen_confidence:0.3..1")
    rows = [line.split("|") for line in tracks.stdout.strip().splitlines()]
    assert len(rows) == 6 and {r[0] for r in rows} == {f"Album {i}" for i in range(3)}
    for album, genres, conf in rows:
        assert genres in GENRES and 1 / len(GENRES) <= float(conf) <= 1.0  # top probability of 3 classes


def test_auto_import_stage_sets_genres(music, index, tmp_path):
    bd = tmp_path / "beets"
    configure(bd, index, auto=True)
    imp = beet(bd, "import", "-A", "-q", str(music))
    assert imp.returncode == 0, imp.stderr
    got = listing(bd)
    assert len(got) == 3 and all(len(g) == 1 and g[0] in GENRES and c is not None for g, c in got.values())


def test_level_style_writes_discogs_styles_to_genres_and_the_broad_genre_to_style(music, tmp_path_factory, tmp_path):
    """`level: style` with a model of Discogs genres and styles fills the fields as beets'
    own discogs plugin does: the style names in `genres` ("Hard Rock"), the broad genre in
    `style` ("Rock")."""
    from tests.audiofiles import STYLES, styled_tiny_index

    bd = tmp_path / "beets"
    configure(bd, styled_tiny_index(tmp_path_factory), auto=False)
    with open(bd / "config.yaml", "a") as fh:
        fh.write("  level: style\n")
    assert beet(bd, "import", "-A", "-q", str(music)).returncode == 0
    run = beet(bd, "stylegen")
    assert run.returncode == 0, run.stderr
    out = beet(bd, "ls", "-a", "-f", "$album|$genres|$style")
    rows = [line.split("|") for line in out.stdout.strip().splitlines()]
    styles = {s.split("---")[1]: s.split("---")[0] for s in STYLES}
    assert len(rows) == 3 and all(g in styles and s in styles.values() for _, g, s in rows), rows
