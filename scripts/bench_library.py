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
  ``Engine.query_many``), with the model already loaded;
* ``classify`` (the baseline): the same 200 cover images as plain JPEG files through
  ``Engine.query_many``, as ``stylegen classify`` does, so ``scan / classify`` is the cost of
  reading a music library instead of a folder of images.

Wall-clock and CPU time (this process) are both printed: on a machine shared with other
jobs the wall clock mostly measures the wait for a core.
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

from tests.audiofiles import FORMATS, embed_art, tag, unsupported_reason, write_audio  # noqa: E402

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
    if not (a.index / "CURRENT").exists() or not (a.index / "heads" / "CURRENT").exists():
        sys.exit(f"skipped: no index with trained heads at {a.index} (stylegen embed + stylegen train)")
    if not COVERS.exists():
        sys.exit(f"skipped: real covers not found at {COVERS}")
    import torch

    from stylegen.apps.musiclib import genres as library
    from stylegen.query.engine import Engine
    from stylegen.sources import audioart, images

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(cpu_line())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "music"
        t = time.perf_counter()
        fmts = build(root, a.albums, a.tracks)
        print(f"built {a.albums} albums x {a.tracks} tracks ({', '.join(fmts)}) in {time.perf_counter() - t:.1f} s")

        (albums, bad, n), find_s, find_cpu = timed(audioart.find_albums, root)
        assert len(albums) == a.albums and not bad and all(x.art for x in albums), "art not found"
        art = Path(tmp) / "art"
        art.mkdir()
        jpegs = []
        for i, x in enumerate(albums):
            jpegs.append(art / f"{i}.jpg")
            jpegs[-1].write_bytes(images.read_bytes(x.art))

        engine, load_s, _ = timed(Engine.open, a.index)
        _, s, _ = timed(lambda: engine.featurizer)
        load_s += s
        engine.query_many(jpegs[:4], method=a.method)  # warm-up
        report, scan_s, scan_cpu = timed(library.scan, root, engine, method=a.method)
        assert sum(1 for r in report.albums if not r.error) == a.albums, report.summary()

        def classify() -> None:
            for i in range(0, len(jpegs), library.QUERY_CHUNK):
                engine.query_many(jpegs[i : i + library.QUERY_CHUNK], method=a.method)

        _, cls_s, cls_cpu = timed(classify)
        rate = a.albums
        print(f"find (tags + art, no model): {find_s:7.2f} s wall {rate / find_s:7.1f} albums/s | "
              f"{find_cpu:6.2f} s CPU {rate / find_cpu:7.1f} albums/CPU-s  ({n} files)")
        print(f"scan (find + predict):       {scan_s:7.2f} s wall {rate / scan_s:7.1f} albums/s | "
              f"{scan_cpu:6.2f} s CPU {rate / scan_cpu:7.1f} albums/CPU-s  (method {report.method})")
        print(f"classify same covers (JPEG): {cls_s:7.2f} s wall {rate / cls_s:7.1f} covers/s | "
              f"{cls_cpu:6.2f} s CPU {rate / cls_cpu:7.1f} covers/CPU-s")
        print(f"scan / classify: {scan_s / cls_s:.2f}x wall, {scan_cpu / cls_cpu:.2f}x CPU; "
              f"model load {load_s:.1f} s once")
        print(cpu_line())


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process incl. its threads)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t, time.process_time() - c


if __name__ == "__main__":
    main()
