"""Real audio files made in the tests: short tones written by soundfile (libsndfile inside
its wheel) or by the ffmpeg inside imageio-ffmpeg (M4A), tagged and given cover art with
mutagen. Formats that the installed encoders cannot write are skipped with the reason."""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COVERS_CSV, make_image

SOUNDFILE_FORMATS = {  # extension -> soundfile format, subtype, sample rate
    "flac": ("FLAC", "PCM_16", 44100),
    "ogg": ("OGG", "VORBIS", 44100),
    "opus": ("OGG", "OPUS", 48000),
    "mp3": ("MP3", "MPEG_LAYER_III", 44100),
    "wav": ("WAV", "PCM_16", 44100),
}
FORMATS = (*SOUNDFILE_FORMATS, "m4a")


def unsupported_reason(fmt: str) -> str | None:
    """Why this machine cannot make ``fmt`` files, or None."""
    if fmt == "m4a":
        try:
            import imageio_ffmpeg

            imageio_ffmpeg.get_ffmpeg_exe()
        except (ImportError, RuntimeError) as exc:
            return f"no ffmpeg for M4A ({exc})"
        return None
    try:
        import soundfile as sf
    except (ImportError, OSError) as exc:
        return f"soundfile/libsndfile unavailable ({exc})"
    major, sub, _ = SOUNDFILE_FORMATS[fmt]
    if major not in sf.available_formats() or sub not in sf.available_subtypes(major):
        return f"libsndfile {sf.__libsndfile_version__} cannot write {major}/{sub}"
    return None


def tone(seconds: float = 0.2, rate: int = 44100, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)[:, None] + 0.01 * r.standard_normal((len(t), 2))
    return x.astype(np.float32)


def write_audio(path: Path, seconds: float = 0.2, seed: int = 0) -> Path:
    """A short stereo tone in the format of ``path``'s extension (skips if unsupported)."""
    fmt = path.suffix.lstrip(".").lower()
    reason = unsupported_reason(fmt)
    if reason:
        pytest.skip(reason)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "m4a":
        import imageio_ffmpeg

        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
                        "-f", "lavfi", "-i", f"sine=frequency={220 + 40 * seed}:duration={seconds}",
                        "-ac", "2", "-c:a", "aac", "-b:a", "64k", str(path)], check=True)
        return path
    import soundfile as sf

    major, sub, rate = SOUNDFILE_FORMATS[fmt]
    sf.write(path, tone(seconds, rate, seed), rate, format=major, subtype=sub)
    return path


def decode(path: Path) -> np.ndarray:
    """Decoded samples: soundfile where libsndfile reads the format, else ffmpeg to PCM."""
    if path.suffix.lower() != ".m4a":
        import soundfile as sf

        return sf.read(path, dtype="float32")[0]
    import imageio_ffmpeg

    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(path),
                          "-f", "f32le", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(out, np.float32)


def tag(path: Path, *, artist: str | None = None, album: str | None = None, albumartist: str | None = None,
        title: str | None = None, genre: str | list[str] | None = None, track: int | None = None) -> Path:
    """Set text tags with mutagen in the format's own fields."""
    import mutagen
    from mutagen import id3
    from mutagen.mp4 import MP4

    f = mutagen.File(path)
    if f.tags is None:
        f.add_tags()
    genres = [genre] if isinstance(genre, str) else genre
    if isinstance(f.tags, id3.ID3):
        frames = {"TPE1": artist, "TALB": album, "TPE2": albumartist, "TIT2": title,
                  "TRCK": None if track is None else str(track)}
        for key, val in frames.items():
            if val is not None:
                f.tags.add(getattr(id3, key)(encoding=3, text=[val]))
        if genres:
            f.tags.add(id3.TCON(encoding=3, text=genres))
    elif isinstance(f, MP4):
        for key, val in {"\xa9ART": artist, "\xa9alb": album, "aART": albumartist, "\xa9nam": title}.items():
            if val is not None:
                f.tags[key] = [val]
        if track is not None:
            f.tags["trkn"] = [(track, 0)]
        if genres:
            f.tags["\xa9gen"] = genres
    else:
        for key, val in {"ARTIST": artist, "ALBUM": album, "ALBUMARTIST": albumartist, "TITLE": title,
                         "TRACKNUMBER": None if track is None else str(track)}.items():
            if val is not None:
                f.tags[key] = [val]
        if genres:
            f.tags["GENRE"] = genres
    f.save()
    return path


def embed_art(path: Path, data: bytes, picture_type: int = 3, mime: str = "image/jpeg",
              ogg_style: str = "picture") -> Path:
    """Embed ``data`` as a picture: ID3 APIC, FLAC picture block, MP4 covr, Ogg/Opus
    METADATA_BLOCK_PICTURE (``ogg_style="coverart"``: the old base64 COVERART field)."""
    import mutagen
    from mutagen import id3
    from mutagen.flac import FLAC, Picture
    from mutagen.mp4 import MP4, MP4Cover

    f = mutagen.File(path)
    if f.tags is None and not isinstance(f, FLAC):
        f.add_tags()
    if isinstance(f.tags, id3.ID3):
        f.tags.add(id3.APIC(encoding=3, mime=mime, type=picture_type, desc=f"t{picture_type}", data=data))
    elif isinstance(f, MP4):
        fmt = MP4Cover.FORMAT_PNG if mime == "image/png" else MP4Cover.FORMAT_JPEG
        f.tags["covr"] = [*f.tags.get("covr", []), MP4Cover(data, imageformat=fmt)]
    else:
        pic = Picture()
        pic.type, pic.mime, pic.data = picture_type, mime, data
        if isinstance(f, FLAC):
            f.add_picture(pic)
        elif ogg_style == "coverart":
            f.tags["COVERART"] = [base64.b64encode(data).decode("ascii")]
            f.tags["COVERARTMIME"] = [mime]
        else:
            f.tags["METADATA_BLOCK_PICTURE"] = [*f.tags.get("metadata_block_picture", []),
                                                base64.b64encode(pic.write()).decode("ascii")]
    f.save()
    return path


def cover_images(n: int, tmp: Path) -> list[bytes]:
    """``n`` JPEG covers: real ones from ../shared/data when present, else generated."""
    if COVERS_CSV.exists():
        files = sorted((COVERS_CSV.parent / "images").glob("*.jpg"))[: 200 * n : 200]
        if len(files) >= n:
            return [p.read_bytes() for p in files[:n]]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.open(make_image(tmp / f"gen{i}.png", kind=i, seed=i)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


GENRES = ("jazz", "metal", "pop")


def tiny_index(tmp_path_factory) -> Path:
    """A tiny real index (3 genres x 8 generated covers) with trained heads, built once per
    test session and shared by the library and beets tests (read-only for them)."""
    import pandas as pd
    from threadpoolctl import threadpool_limits

    from stylegen.heads.train import train
    from tests.conftest import embed_tiny, planted_rows

    root = tmp_path_factory.getbasetemp() / "audio_tiny_index"
    idx = root / "idx"
    if (idx / "heads" / "CURRENT").is_file():
        return idx
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(planted_rows(root, list(GENRES), 8, lambda g, i: {"artist": f"{GENRES[g]}-artist{i % 4}"})
                 ).to_csv(root / "train.csv", index=False)
    embed_tiny(root / "train.csv", idx)
    with threadpool_limits(1):
        train(idx, heads=("linear", "knn", "ensemble"))
    return idx


STYLES = ("Rock---Hard Rock", "Electronic---Techno", "Jazz---Swing")


def styled_tiny_index(tmp_path_factory) -> Path:
    """A tiny real index of generated covers labelled with Discogs styles only, with the
    hierarchy head trained through the packaged Discogs taxonomy (built once per session)."""
    import pandas as pd
    from threadpoolctl import threadpool_limits

    from stylegen.heads.train import train
    from tests.conftest import embed_tiny, planted_rows

    root = tmp_path_factory.getbasetemp() / "audio_styled_index"
    idx = root / "idx"
    if (idx / "heads" / "CURRENT").is_file():
        return idx
    root.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame(planted_rows(root, list(STYLES), 8, lambda g, i: {"artist": f"a{g}{i % 4}"}))
    rows["styles"] = rows["genre"]
    rows[["image", "styles", "artist"]].to_csv(root / "train.csv", index=False)
    embed_tiny(root / "train.csv", idx)
    with threadpool_limits(1):
        train(idx, heads=("hierarchy", "knn"), labels="multi", label_columns=["styles"], taxonomy="discogs")
    return idx
