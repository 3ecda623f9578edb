"""Music libraries, read side: walk audio files, read their tags and find each album's cover.

Every audio format is opened with mutagen and seen through one of three tag families:
``id3`` (MP3, WAV, AIFF), ``vorbis`` (FLAC, Ogg Vorbis, Opus) and ``mp4`` (M4A). An album's
front cover is an embedded picture first (ID3 ``APIC`` preferring picture type 3, FLAC
picture blocks, Ogg ``METADATA_BLOCK_PICTURE`` or the older ``COVERART``, MP4 ``covr``),
then an image file in the album's folder (``cover.*``, ``folder.*``, ``front.*``,
``AlbumArt*``). Unreadable audio files are returned as reasons, never raised.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stylegen.errors import BadImageError, SourceError, StylegenError

AUDIO_EXTS = frozenset({".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".m4b", ".mp4",
                        ".wav", ".aif", ".aiff"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
FOLDER_ART_NAMES = ("cover", "folder", "front")  # in order of preference; then AlbumArt*
FRONT, OTHER = 3, 0  # picture types (ID3 / FLAC): front cover, "other"


class BadAudioError(StylegenError):
    """An audio file that mutagen cannot read (corrupt, truncated, not audio, unsupported)."""


@dataclass(frozen=True)
class Track:
    """One audio file: the tags that group it into an album, its genres and its best picture."""

    path: Path
    family: str  # id3 | vorbis | mp4
    artist: str | None
    albumartist: str | None
    album: str | None
    genres: tuple[str, ...]
    picture_rank: int | None  # 0 front cover, 1 "other", 2 any other type; None: no picture


@dataclass(frozen=True)
class Album:
    """Tracks grouped by album artist + album tags (else by folder), and where its art is."""

    key: str
    folder: Path
    artist: str | None
    album: str | None
    tracks: tuple[Path, ...]
    genres: tuple[str, ...]  # current genre tags, in order of first appearance over the tracks
    track_genres: tuple[tuple[str, ...], ...]  # each track's own genres
    art: Path | None  # the file holding the cover: an audio file (embedded) or an image
    art_source: str | None  # "embedded" | "folder" | None


def is_audio(path: str | Path) -> bool:
    return Path(path).suffix.lower() in AUDIO_EXTS


def has_audio(folder: str | Path) -> bool:
    """Whether any file under ``folder`` is an audio file (stops at the first)."""
    for _, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(is_audio(n) and not n.startswith(".") for n in filenames):
            return True
    return False


# ---- opening files ---------------------------------------------------------------------
def open_audio(path: str | Path) -> Any:
    """The mutagen file object; raises :class:`BadAudioError` with a one-line reason."""
    import mutagen

    p = Path(path)
    try:
        f = mutagen.File(p)
    except mutagen.MutagenError as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        if isinstance(cause, OSError) and cause.strerror:
            raise BadAudioError(f"unreadable: {cause.strerror}") from None
        raise BadAudioError(f"corrupt or truncated audio: {_line(exc)}") from None
    except OSError as exc:  # raised by some format parsers on short reads
        raise BadAudioError(f"unreadable: {exc.strerror or _line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - mutagen's parsers raise assorted errors on garbage
        raise BadAudioError(f"corrupt audio ({type(exc).__name__}: {_line(exc)})") from None
    if f is None:
        raise BadAudioError("not a recognised audio file")
    family(f)  # refuses formats we cannot read tags of
    return f


def family(f: Any) -> str:
    """The tag family of an opened file: ``id3``, ``vorbis`` or ``mp4``."""
    from mutagen.aiff import AIFF
    from mutagen.flac import FLAC
    from mutagen.mp3 import MP3
    from mutagen.mp4 import MP4
    from mutagen.ogg import OggFileType
    from mutagen.wave import WAVE

    if isinstance(f, MP3 | WAVE | AIFF):
        return "id3"
    if isinstance(f, FLAC | OggFileType):
        return "vorbis"
    if isinstance(f, MP4):
        return "mp4"
    raise BadAudioError(f"unsupported audio format ({type(f).__name__})")


# ---- tags ------------------------------------------------------------------------------
_TEXT_KEYS = {
    "id3": {"artist": "TPE1", "albumartist": "TPE2", "album": "TALB"},
    "vorbis": {"artist": "artist", "albumartist": "albumartist", "album": "album"},
    "mp4": {"artist": "\xa9ART", "albumartist": "aART", "album": "\xa9alb"},
}


def text_tag(f: Any, name: str) -> str | None:
    """First value of the artist / albumartist / album tag, stripped, or None."""
    tags = f.tags
    if tags is None:
        return None
    fam = family(f)
    key = _TEXT_KEYS[fam][name]
    if fam == "id3":
        frame = tags.get(key)
        values = list(frame.text) if frame is not None else []
    else:
        values = list(tags.get(key) or [])
        if not values and fam == "vorbis" and name == "albumartist":
            values = list(tags.get("album artist") or [])
    for v in values:
        if str(v).strip():
            return str(v).strip()
    return None


def genres(f: Any) -> tuple[str, ...]:
    """The genres a player shows for this file (ID3 numeric references resolved)."""
    tags = f.tags
    if tags is None:
        return ()
    fam = family(f)
    if fam == "id3":
        values = [g for frame in tags.getall("TCON") for g in frame.genres]
    elif fam == "vorbis":
        values = list(tags.get("genre") or [])
    else:
        values = list(tags.get("\xa9gen") or [])
        if not values and tags.get("gnre"):
            from mutagen.id3 import TCON

            values = [TCON.GENRES[n - 1] for n in tags["gnre"] if 0 < n <= len(TCON.GENRES)]
    return tuple(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))


# ---- embedded pictures -----------------------------------------------------------------
def pictures(f: Any) -> list[tuple[int, bytes]]:
    """(picture type, image bytes) of every embedded picture, in file order."""
    fam = family(f)
    out: list[tuple[int, bytes]] = []
    if fam == "vorbis" and hasattr(f, "pictures"):  # FLAC picture blocks
        out += [(int(p.type), bytes(p.data)) for p in f.pictures]
    tags = f.tags
    if tags is None:
        return out
    if fam == "id3":
        out += [(int(fr.type), bytes(fr.data)) for fr in tags.getall("APIC")]
    elif fam == "mp4":
        out += [(FRONT, bytes(c)) for c in tags.get("covr") or []]  # MP4 has no picture types
    else:
        out += _vorbis_pictures(tags)
    return [(t, d) for t, d in out if d]


def _vorbis_pictures(tags: Any) -> list[tuple[int, bytes]]:
    from mutagen.flac import Picture

    out = []
    for value in tags.get("metadata_block_picture") or []:
        try:
            pic = Picture(base64.b64decode(value))
        except Exception:  # noqa: BLE001, S112 - a damaged picture block is skipped
            continue
        out.append((int(pic.type), bytes(pic.data)))
    for value in tags.get("coverart") or []:  # the pre-2008 convention: raw image, base64
        try:
            out.append((OTHER, base64.b64decode(value)))
        except (binascii.Error, ValueError):
            continue
    return out


def picture_rank(picture_type: int) -> int:
    """0 for a front cover, 1 for type "other" (what many taggers write), 2 for the rest."""
    return 0 if picture_type == FRONT else 1 if picture_type == OTHER else 2


def best_picture(pics: Iterable[tuple[int, bytes]]) -> tuple[int, bytes] | None:
    """The (rank, bytes) of the picture to use: the first of the best rank."""
    ranked = sorted(((picture_rank(t), i, d) for i, (t, d) in enumerate(pics)))
    return (ranked[0][0], ranked[0][2]) if ranked else None


def embedded_cover(path: str | Path) -> bytes:
    """The front cover embedded in an audio file (see :func:`best_picture`).

    Raises :class:`BadImageError` ("no cover art", or why the file cannot be read): this is
    what :func:`stylegen.sources.images.read_bytes` returns for an audio path.
    """
    try:
        best = best_picture(pictures(open_audio(path)))
    except BadAudioError as exc:
        raise BadImageError(str(exc)) from None
    if best is None:
        raise BadImageError("no cover art")
    return best[1]


# ---- folder images ---------------------------------------------------------------------
def folder_cover(names: Iterable[str]) -> str | None:
    """The cover image among a folder's file names: cover, folder, front, then AlbumArt*
    (the largest-named variant: ``AlbumArt_..._Large`` before ``AlbumArtSmall``)."""
    candidates = []
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS or name.startswith("."):
            continue
        s = stem.lower()
        if s in FOLDER_ART_NAMES:
            candidates.append((FOLDER_ART_NAMES.index(s), 0, name))
        elif s.startswith("albumart"):
            candidates.append((len(FOLDER_ART_NAMES), 1 if "small" in s else 0, name))
    return min(candidates)[2] if candidates else None


# ---- walking and grouping --------------------------------------------------------------
def read_track(path: Path) -> Track:
    """Tags and best picture rank of one audio file; raises :class:`BadAudioError`."""
    f = open_audio(path)
    best = best_picture(pictures(f))
    return Track(path=path, family=family(f), artist=text_tag(f, "artist"),
                 albumartist=text_tag(f, "albumartist"), album=text_tag(f, "album"),
                 genres=genres(f), picture_rank=None if best is None else best[0])


def walk_audio(root: str | Path) -> tuple[list[Path], dict[Path, list[str]]]:
    """Audio files under ``root`` (sorted) and each folder's file names (for folder art)."""
    root = Path(root)
    if not root.is_dir():
        raise StylegenError(f"not a folder: {root}")
    audio: list[Path] = []
    names: dict[Path, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        names[folder] = filenames
        audio += [folder / n for n in sorted(filenames) if not n.startswith(".") and is_audio(n)]
    return audio, names


def read_tracks(paths: Iterable[Path], progress: Callable[[int], None] = lambda n: None) -> tuple[list[Track], list[dict[str, str]]]:
    """Read each audio file: (tracks, unreadable files ``{"path", "reason"}``)."""
    tracks, bad = [], []
    for p in paths:
        try:
            tracks.append(read_track(p))
        except BadAudioError as exc:
            bad.append({"path": str(p), "reason": str(exc)})
        progress(1)
    return tracks, bad


def album_key(t: Track, root: Path) -> tuple[str, ...]:
    """Album artist + album when both are tagged, else the folder (+ album tag)."""
    if t.album and t.albumartist:
        return ("tags", t.albumartist.casefold(), t.album.casefold())
    return ("folder", str(t.path.parent), (t.album or "").casefold())


def group_albums(tracks: list[Track], root: str | Path, names: dict[Path, list[str]] | None = None) -> list[Album]:
    """Albums in order of their first track, with the art each will be judged by."""
    root = Path(root)
    groups: dict[tuple[str, ...], list[Track]] = {}
    for t in tracks:
        groups.setdefault(album_key(t, root), []).append(t)
    albums = [_album(ts, root, names) for ts in groups.values()]
    return _unique_keys(albums)


def _album(ts: list[Track], root: Path, names: dict[Path, list[str]] | None) -> Album:
    first = ts[0]
    folder = first.path.parent
    artist = first.albumartist or _common(t.artist for t in ts)
    album = first.album
    art, source = _choose_art(ts, names)
    rel = folder.relative_to(root) if folder.is_relative_to(root) else folder
    if artist and album:
        key = f"{artist} – {album}"
    else:
        key = str(rel) if str(rel) != "." else root.name
        key = f"{key} – {album}" if album else key
    gen = tuple(dict.fromkeys(g for t in ts for g in t.genres))
    return Album(key=key, folder=folder, artist=artist, album=album, tracks=tuple(t.path for t in ts),
                 genres=gen, track_genres=tuple(t.genres for t in ts), art=art, art_source=source)


def album_from_files(paths: Iterable[str | Path], art: str | Path | None = None) -> Album:
    """One album made of these files (as a beets album is), judged by ``art`` when that
    image exists, else by the art found in the files and their folders."""
    paths = [Path(p) for p in paths]
    tracks = []
    for p in paths:
        try:
            tracks.append(read_track(p))
        except BadAudioError:
            continue
    if not tracks:
        raise BadAudioError(f"none of the {len(paths)} files can be read")
    root = tracks[0].path.parent
    album = _album(tracks, root, None)
    if art is not None and Path(art).is_file():
        album = dataclasses.replace(album, art=Path(art), art_source="given")
    return album


def _choose_art(ts: list[Track], names: dict[Path, list[str]] | None) -> tuple[Path | None, str | None]:
    """Embedded front/"other" picture, else a cover image in a track's folder, else any
    embedded picture (a back cover or booklet page is better than nothing)."""
    ranked = sorted((t.picture_rank, i) for i, t in enumerate(ts) if t.picture_rank is not None)
    if ranked and ranked[0][0] <= 1:
        return ts[ranked[0][1]].path, "embedded"
    for folder in dict.fromkeys(t.path.parent for t in ts):
        listing = names.get(folder) if names is not None else None
        if listing is None:
            listing = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        name = folder_cover(sorted(listing))
        if name:
            return folder / name, "folder"
    if ranked:
        return ts[ranked[0][1]].path, "embedded"
    return None, None


def _common(values: Iterable[str | None]) -> str | None:
    vals = {v for v in values if v}
    return vals.pop() if len(vals) == 1 else None


def _unique_keys(albums: list[Album]) -> list[Album]:
    seen: dict[str, int] = {}
    out = []
    for a in albums:
        n = seen.get(a.key, 0)
        seen[a.key] = n + 1
        if n:
            a = dataclasses.replace(a, key=f"{a.key} ({n + 1})")
        out.append(a)
    return out


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- a music library as a SOURCE ------------------------------------------------------------
def find_albums(root: str | Path, progress: Callable[[int], None] | None = None,
                walked: tuple[list[Path], dict[Path, list[str]]] | None = None,
                ) -> tuple[list[Album], list[dict[str, str]], int]:
    """Albums under ``root``, the unreadable audio files and the number of readable tracks
    (``walked``: :func:`walk_audio` of ``root`` when already done)."""
    paths, names = walked or walk_albums(root)
    tracks, bad = read_tracks(paths, progress or (lambda n: None))
    return group_albums(tracks, root, names), bad, len(tracks)


def walk_albums(root: str | Path) -> tuple[list[Path], dict[Path, list[str]]]:
    paths, names = walk_audio(root)
    if not paths:
        raise SourceError(f"no audio files ({', '.join(sorted(AUDIO_EXTS))}) under {root}")
    return paths, names


def album_rows(root: str | Path) -> pd.DataFrame:
    """One row per album for the embed pipeline (see :func:`stylegen.sources.images.list_source`).

    ``image``: the album key; ``path``: the file holding its art (the first track when it
    has none, so the run reports "no cover art"); ``artist``, ``album``, ``genre``/``genres``
    from the tags; ``tracks``: ``|``-joined track paths. Unreadable audio files get a row
    of their own, so the run lists them with the reason.
    """
    albums, bad, _ = find_albums(root)
    rows = [{"image": a.key, "path": str((a.art or a.tracks[0]).resolve()), "artist": a.artist,
             "album": a.album, "genre": a.genres[0] if a.genres else None,
             "genres": "|".join(a.genres) or None, "tracks": "|".join(str(t) for t in a.tracks),
             "art_source": a.art_source}
            for a in albums]
    rows += [{"image": str(Path(b["path"]).relative_to(root)) if Path(b["path"]).is_relative_to(root) else b["path"],
              "path": b["path"], "tracks": b["path"]} for b in bad]
    return pd.DataFrame(rows)


