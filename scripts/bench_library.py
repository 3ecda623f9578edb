#!/usr/bin/env python
"""Music library scan speed (albums/s) on a generated library.

    python scripts/bench_library.py --index indexes/covers [--albums 200] [--tracks 3]

Builds a library of ALBUMS x TRACKS short (0.2 s) audio files in a temporary folder, the
formats taking turns by album (FLAC, MP3, Ogg Vorbis, Opus, WAV, M4A when ffmpeg is there),
each album with a real cover from ../shared/data embedded in every track (every sixth album
has a ``cover.jpg`` in its folder instead). The covers are re-encoded (300 px, JPEG q85) so
that none is byte-identical to a cover of the index: every album is embedded for real, as
it would be in someone's own library. Times, in one run:

* ``find``: walking the files, reading tags and finding each album's art (no model);
* ``scan``: the whole ``stylegen library scan`` (find + one prediction per album through
  ``Engine.query_many``), with the model already loaded, then again including the load.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.audiofiles import FORMATS, embed_art, tag, unsupported_reason, write_audio

COVERS = ROOT.parent / "shared" / "data" / "covers" / "covers.csv"


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    flags = next((ln for ln in info if ln.startswith("flags")), "")
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    return f"{model}; flags: {', '.join(have) or 'none'}; {load}"


def reencoded_covers(n: int) -> list[bytes]:
    df = pd.read_csv(COVERS)
    out = []
    for rel in df["image"].iloc[:: max(1, len(df) // n)][:n]:
        img = Image.open(COVERS.parent / rel).convert("RGB")
        img.thumbnail((300, 300))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def build(root: Path, albums: int, tracks: int) -> list[str]:
    fmts = [f for f in FORMATS if unsupported_reason(f) is None]
    templates = {f: write_audio(root / ".templates" / f"t.{f}") for f in fmts}
    covers = reencoded_covers(albums)
    for a in range(albums):
        fmt = fmts[a % len(fmts)]
        folder = root / f"Artist {a % 37}" / f"Album {a}"
        folder.mkdir(parents=True)
        for t in range(tracks):
            p = folder / f"{t + 1:02d} song.{fmt}"
            shutil.copy(templates[fmt], p)
            tag(p, artist=f"Artist {a % 37}", albumartist=f"Artist {a % 37}", album=f"Album {a}",
                title=f"song {t}", track=t + 1)
            if a % 6 != 5:
                embed_art(p, covers[a])
        if a % 6 == 5:
            (folder / "cover.jpg").write_bytes(covers[a])
    shutil.rmtree(root / ".templates")
    return fmts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=Path("indexes/covers"))
    ap.add_argument("--albums", type=int, default=200)
    ap.add_argument("--tracks", type=int, default=3)
    ap.add_argument("--method", default=None)
    a = ap.parse_args()
    if not (a.index / "CURRENT").exists() or not (a.index / "heads" / "heads.json").exists():
        sys.exit(f"skipped: no index with trained heads at {a.index} (stylegen embed + stylegen train)")
    if not COVERS.exists():
        sys.exit(f"skipped: real covers not found at {COVERS}")
    import torch

    from stylegen import library
    from stylegen.engine import Engine

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(cpu_line())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "music"
        t = time.perf_counter()
        fmts = build(root, a.albums, a.tracks)
        print(f"built {a.albums} albums x {a.tracks} tracks ({', '.join(fmts)}) in {time.perf_counter() - t:.1f} s")

        t = time.perf_counter()
        albums, bad, n = library.find_albums(root)
        find_s = time.perf_counter() - t
        assert len(albums) == a.albums and not bad and all(x.art for x in albums), "art not found"

        t = time.perf_counter()
        engine = Engine.open(a.index)
        engine.featurizer  # noqa: B018 - load the model
        load_s = time.perf_counter() - t
        report = library.scan(root, engine, method=a.method)
        scan_s = report.seconds
        judged = sum(1 for r in report.albums if not r.error)
        assert judged == a.albums, report.summary()
        print(f"find (tags + art, no model): {find_s:6.2f} s  {a.albums / find_s:8.1f} albums/s  "
              f"({n / find_s:.0f} files/s)")
        print(f"scan (find + predict):       {scan_s:6.2f} s  {a.albums / scan_s:8.1f} albums/s  "
              f"(method {report.method}; model load {load_s:.1f} s more)")
        print(f"scan incl. model load:       {scan_s + load_s:6.2f} s  {a.albums / (scan_s + load_s):8.1f} albums/s")
        print(cpu_line())


if __name__ == "__main__":
    main()
