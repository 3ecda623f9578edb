"""Music libraries, write side: set the genre tag of an audio file safely, and undo it.

The genre goes in each format's own field: ID3 ``TCON`` (MP3, WAV, AIFF), Vorbis comment
``GENRE`` (FLAC, Ogg Vorbis, Opus) and MP4 ``©gen``. A write never touches the file itself:
the file is copied next to itself, the copy is tagged, re-read and verified (the genre is
the new one, every other tag, picture and the stream parameters are unchanged), flushed to
disk, and only then moved over the original with ``os.replace``, so a crash or a failed
check leaves the original as it was. Each change is appended to an undo log (CSV of old and
new values) before the file is replaced.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylegen.errors import StylegenError
from stylegen.sources.audioart import BadAudioError, family, open_audio

GENRE_FIELD = {"id3": "TCON", "vorbis": "GENRE", "mp4": "\xa9gen"}
LOG_COLUMNS = ("path", "field", "old", "new")

Values = list[str] | None  # a field's values; None: the field is absent


class TagWriteError(StylegenError):
    """A file whose tags could not be written (read-only, unreadable, failed verification)."""


# ---- the genre field of an opened file ---------------------------------------------------
def genre_field(f: Any) -> str:
    return GENRE_FIELD[family(f)]


def genre_values(f: Any) -> Values:
    """The raw values of the file's genre field (ID3 numeric references kept as written)."""
    tags, fam = f.tags, family(f)
    if tags is None:
        return None
    if fam == "id3":
        frames = tags.getall("TCON")
        return [str(t) for fr in frames for t in fr.text] if frames else None
    if fam == "vorbis":
        return list(tags["genre"]) if "genre" in tags else None
    return [str(v) for v in tags["\xa9gen"]] if "\xa9gen" in tags else None


def set_genre_values(f: Any, values: Values) -> None:
    """Set (or with None remove) the genre field of an opened file, in memory."""
    fam = family(f)
    if f.tags is None:
        if values is None:
            return
        f.add_tags()
    tags = f.tags
    if fam == "id3":
        from mutagen.id3 import TCON

        tags.delall("TCON")
        if values is not None:
            tags.add(TCON(encoding=3, text=list(values)))
    elif fam == "vorbis":
        key = next((k for k, _ in tags if k.lower() == "genre"), "GENRE")  # keep the file's spelling
        if values is None:
            if "genre" in tags:
                del tags["genre"]
        else:
            tags[key] = list(values)
    elif values is None:
        tags.pop("\xa9gen", None)
    else:
        tags["\xa9gen"] = list(values)


def _save(f: Any, path: Path) -> None:
    if family(f) == "id3":
        version = getattr(f.tags, "version", (2, 4, 0))
        f.save(path, v2_version=4 if tuple(version[:2]) >= (2, 4) else 3)  # keep ID3v2.3 files v2.3
    else:
        f.save(path)


def _fingerprint(f: Any) -> tuple:
    """Everything but the genre field: other tags, pictures and stream parameters."""
    tags, fam, info = f.tags, family(f), f.info
    if tags is None:
        other: list = []
    elif fam == "id3":
        other = sorted((k, repr(v)) for k, v in tags.items() if k != "TCON")
    elif fam == "vorbis":
        other = [(k.lower(), v) for k, v in tags if k.lower() != "genre"]
    else:
        other = sorted((k, repr(v)) for k, v in tags.items() if k != "\xa9gen")
    pics = [(p.type, p.mime, p.desc, bytes(p.data)) for p in getattr(f, "pictures", [])]
    stream = tuple(getattr(info, a, None) for a in ("sample_rate", "channels", "md5_signature", "total_samples"))
    return type(f).__name__, other, pics, stream, round(float(getattr(info, "length", 0.0) or 0.0), 3)


# ---- safe writes -------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """One field of one file: old and new values as read back from the file."""

    path: str
    field: str
    old: Values
    new: Values


def read_genre(path: str | Path) -> tuple[str, Values]:
    """(field name, raw values) of a file's genre field; raises :class:`TagWriteError`."""
    try:
        f = open_audio(path)
    except BadAudioError as exc:
        raise TagWriteError(str(exc)) from None
    return genre_field(f), genre_values(f)


def write_genre(path: str | Path, values: Values, log: str | Path | None = None) -> Change:
    """Set the genre field of ``path`` to ``values`` through a verified temporary copy.

    The change is appended to the undo ``log`` before the copy replaces the file. Raises
    :class:`TagWriteError` (one line) and leaves the file untouched on any failure.
    """
    path = Path(os.path.realpath(path))  # replace the file a symlink points to, not the link
    st = _check_writable(path)
    try:
        before = open_audio(path)
    except BadAudioError as exc:
        raise TagWriteError(str(exc)) from None
    old, want = genre_values(before), _fingerprint(before)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".stylegen{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copy2(path, tmp)
        f = open_audio(tmp)
        set_genre_values(f, values)
        expected = _expected(values, f)
        _save(f, tmp)
        after = open_audio(tmp)
        new = genre_values(after)
        if _normalise(new) != _normalise(expected):
            raise TagWriteError(f"verification failed: genre read back as {new!r}, wrote {values!r}")
        if _fingerprint(after) != want:
            raise TagWriteError("verification failed: other tags or stream parameters changed")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if os.stat(path).st_mtime_ns != st.st_mtime_ns:
            raise TagWriteError("the file changed while it was being tagged")
        change = Change(str(path), genre_field(after), old, new)
        if log is not None:
            append_log(log, change)
        os.replace(tmp, path)
        return change
    except BadAudioError as exc:
        raise TagWriteError(f"verification failed: {exc}") from None
    except OSError as exc:
        raise TagWriteError(f"cannot write: {exc.strerror or exc}") from None
    except TagWriteError:
        raise
    except Exception as exc:  # noqa: BLE001 - mutagen raises assorted errors on odd files
        raise TagWriteError(f"cannot write tags ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _check_writable(path: Path) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TagWriteError(f"unreadable: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TagWriteError("not a regular file")
    if not st.st_mode & 0o222:  # honoured even for root, who could write it anyway
        raise TagWriteError("read-only file")
    if st.st_nlink > 1:
        raise TagWriteError("file has hard links (replacing it would split them)")
    return st


def _expected(values: Values, f: Any) -> Values:
    """What a format stores for ``values``: ID3v2.3 joins several values with '/'."""
    if values is None or family(f) != "id3":
        return values
    version = getattr(f.tags, "version", (2, 4, 0))
    return ["/".join(values)] if tuple(version[:2]) < (2, 4) and len(values) > 1 else list(values)


def _normalise(values: Values) -> Values:
    return None if values is None else [str(v) for v in values]


# ---- undo log ------------------------------------------------------------------------------
def append_log(log: str | Path, change: Change) -> None:
    """Append one change to the undo CSV (header on first use), flushed to disk."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    new_file = not log.exists() or log.stat().st_size == 0
    with open(log, "a", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if new_file:
            w.writerow(LOG_COLUMNS)
        w.writerow([change.path, change.field, json.dumps(change.old, ensure_ascii=False),
                    json.dumps(change.new, ensure_ascii=False)])
        fh.flush()
        os.fsync(fh.fileno())


def read_log(log: str | Path) -> list[Change]:
    log = Path(log)
    try:
        with open(log, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise StylegenError(f"cannot read undo log {log}: {exc.strerror or exc}") from None
    if rows and set(LOG_COLUMNS) - set(rows[0]):
        raise StylegenError(f"{log} is not a stylegen undo log (columns: {', '.join(LOG_COLUMNS)})")
    try:
        return [Change(r["path"], r["field"], json.loads(r["old"]), json.loads(r["new"])) for r in rows]
    except (json.JSONDecodeError, TypeError) as exc:
        raise StylegenError(f"undo log {log} is damaged: {exc}") from None


@dataclass
class UndoReport:
    restored: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # already holding the old value
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}

    def summary(self) -> str:
        return (f"restored {len(self.restored)} files, {len(self.unchanged)} already as before, "
                f"{len(self.failed)} not restored")


def undo(log: str | Path, progress=lambda n: None) -> UndoReport:
    """Put back the old values of every change in ``log`` (newest first).

    A file whose genre is no longer the value written by stylegen was edited since; it is
    left alone and reported.
    """
    report = UndoReport()
    for ch in reversed(read_log(log)):
        try:
            fld, current = read_genre(ch.path)
            if current == ch.old:
                report.unchanged.append(ch.path)
            elif current != ch.new or fld != ch.field:
                report.failed.append({"path": ch.path, "reason": f"genre changed since tagging ({current!r}); left alone"})
            else:
                write_genre(ch.path, ch.old)
                report.restored.append(ch.path)
        except TagWriteError as exc:
            report.failed.append({"path": ch.path, "reason": str(exc)})
        progress(1)
    return report

