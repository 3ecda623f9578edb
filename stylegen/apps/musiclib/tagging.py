"""Music libraries, write side: set the genre tag of an audio file safely, and undo it.

The genre goes in each format's own field: ID3 ``TCON`` (MP3, WAV, AIFF), Vorbis comment
``GENRE`` (FLAC, Ogg Vorbis, Opus) and MP4 ``©gen``. A write never touches the file itself:
the file is copied next to itself, the copy is tagged, re-read and verified (the genre is
the new one, every other tag, picture and the stream parameters are unchanged), flushed to
disk, and only then moved over the original with ``os.replace``, so a crash or a failed
check leaves the original as it was. Each change is appended to an undo log (CSV of old and
new values) before the file is replaced.

A tagged file is the same file: the copy gets the original's owner, group and mode (and, by
default, its access and modification times) before it replaces it. A write never follows a
symbolic link out of the tree it was given, and leaves alone a file whose genre is no longer
the one its caller saw. A write killed half-way leaves at most a hidden temporary copy
(``.<name>.<8 random>.stylegen<ext>``), which :func:`remove_leftovers` deletes on the next
run, and at most a torn last line in the undo log, which :func:`read_log` drops.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylegen.errors import StylegenError
from stylegen.sources.audioart import AUDIO_EXTS, BadAudioError, family, open_audio
from stylegen.sources.audioart import genres as shown_genres

GENRE_FIELD = {"id3": "TCON", "vorbis": "GENRE", "mp4": "\xa9gen"}
LOG_COLUMNS = ("path", "field", "old", "new")
TMP_INFIX = ".stylegen"  # temporary copies: .<stem>.<8 chars of mkstemp>.stylegen<suffix>

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


def write_genre(path: str | Path, values: Values, log: str | Path | None = None, *,
                root: str | Path | None = None, expect: Sequence[str] | None = None,
                keep_times: bool = True) -> Change:
    """Set the genre field of ``path`` to ``values`` through a verified temporary copy.

    ``root``: the tree the caller was given; a path that resolves (through symbolic links)
    outside it is refused. ``expect``: the genres, as players show them, that the caller saw
    (e.g. at scan time); a file whose genre is no longer that is left alone. ``keep_times``:
    the tagged file keeps the original's access and modification times (owner, group and
    mode are always kept). The change is appended to the undo ``log`` before the copy
    replaces the file. Raises :class:`TagWriteError` (one line) and leaves the file
    untouched on any failure.
    """
    path = Path(os.path.realpath(path))  # replace the file a symlink points to, not the link ...
    reason = link_outside(path, root)  # ... when that file is inside the tree
    if reason:
        raise TagWriteError(reason)
    st = _check_writable(path)
    try:
        before = open_audio(path)
    except BadAudioError as exc:
        raise TagWriteError(str(exc)) from None
    if expect is not None and shown_genres(before) != tuple(expect):
        now = ", ".join(shown_genres(before)) or "no genre"
        raise TagWriteError(f"genre changed since the scan (now {now!r}); left alone")
    old, want = genre_values(before), _fingerprint(before)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f"{TMP_INFIX}{path.suffix}")
        os.close(fd)
        tmp = Path(tmp_name)
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
        _carry_over(tmp, st, keep_times)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if _identity(os.stat(path)) != _identity(st):
            raise TagWriteError("the file changed while it was being tagged")
        change = Change(str(path), genre_field(after), old, new)
        if log is not None:
            append_log(log, change)
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def link_outside(path: str | Path, root: str | Path | None) -> str | None:
    """Why ``path`` must not be written: it resolves (through a symbolic link) outside
    ``root``; None when it is inside, or when there is no ``root`` to keep to."""
    if root is None:
        return None
    real = os.path.realpath(path)
    if Path(real).is_relative_to(os.path.realpath(root)):
        return None
    return f"symbolic link to {real}, outside {root}; not followed"


def _carry_over(tmp: Path, st: os.stat_result, keep_times: bool) -> None:
    """Give the tagged copy the original's owner, group, mode and (``keep_times``) times."""
    now = os.stat(tmp)
    if (now.st_uid, now.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.chown(tmp, st.st_uid, st.st_gid)
        except PermissionError:
            raise TagWriteError(f"cannot keep the file's owner and group {st.st_uid}:{st.st_gid} "
                                "(not permitted); left alone") from None
    os.chmod(tmp, stat.S_IMODE(st.st_mode))  # after chown, which may clear set-id bits
    if keep_times:
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when anyone writes the file (ctime too, for editors that keep mtime)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def fsync_dir(folder: str | Path) -> None:
    """Make a new name or a rename in ``folder`` durable (skipped where the OS cannot)."""
    if os.name == "nt":  # no directory handles to fsync
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


_TMP_NAME = re.compile(r"\.(?P<stem>.+)\.[a-z0-9_]{8}" + re.escape(TMP_INFIX) + r"(?P<suffix>\.[^.]+)")


def remove_leftovers(paths: Iterable[str | Path]) -> list[Path]:
    """Delete the temporary copies that a killed :func:`write_genre` of one of ``paths`` left.

    Only regular files named exactly as write_genre names its copy of one of these very
    files (``.<stem>.<8 characters>.stylegen<suffix>`` next to ``<stem><suffix>``) are
    deleted; returns them.
    """
    by_folder: dict[Path, set[str]] = {}
    for p in map(Path, paths):
        by_folder.setdefault(p.parent, set()).add(p.name)
    removed = []
    for folder, names in by_folder.items():
        try:
            entries = sorted(os.listdir(folder))
        except OSError:
            continue  # a folder gone since the scan: nothing of ours can be in it
        for entry in entries:
            m = _TMP_NAME.fullmatch(entry)
            leftover = folder / entry
            if m and m["stem"] + m["suffix"] in names and m["suffix"].lower() in AUDIO_EXTS and _is_file(leftover):
                try:
                    leftover.unlink()
                except OSError:
                    continue  # not ours to force; the next run tries again
                removed.append(leftover)
    return removed


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)  # never a link, whatever it points to
    except OSError:
        return False


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
    """Append one change to the undo CSV (header on first use), flushed to disk (and, when
    the log is new, its folder too, so the log's name survives a crash)."""
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
    if new_file:
        fsync_dir(log.parent)


def read_log(log: str | Path) -> tuple[list[Change], str | None]:
    """The changes in an undo log, and a notice when its last record was torn and left out.

    A write killed half-way can leave only the log's last record incomplete (or cut inside
    a UTF-8 character); that record is dropped. Damage anywhere before it is an error.
    """
    log = Path(log)
    try:
        text = log.read_bytes().decode("utf-8", "surrogateescape")  # undecodable bytes: checked per record
        records = list(csv.reader(io.StringIO(text, newline="")))
    except OSError as exc:
        raise StylegenError(f"cannot read undo log {log}: {exc.strerror or exc}") from None
    except csv.Error as exc:
        raise StylegenError(f"undo log {log} is damaged: {exc}") from None
    if not records:
        return [], None
    header, rows = records[0], [r for r in records[1:] if r]  # csv.writer writes no empty records
    if set(LOG_COLUMNS) - set(header):
        if not rows and ",".join(LOG_COLUMNS).startswith(text):  # killed while writing the header
            return [], f"ignored the incomplete header of {log} (an interrupted write)"
        raise StylegenError(f"{log} is not a stylegen undo log (columns: {', '.join(LOG_COLUMNS)})")
    changes = []
    for i, row in enumerate(rows):
        try:
            changes.append(_log_change(header, row))
        except ValueError as exc:
            if i < len(rows) - 1:
                raise StylegenError(f"undo log {log} is damaged at record {i + 1}: {exc}") from None
            return changes, f"ignored the incomplete last record of {log} (an interrupted write: {exc})"
    return changes, None


def _log_change(header: list[str], row: list[str]) -> Change:
    """One log record as a :class:`Change`; ValueError when it is incomplete or malformed."""
    if len(row) != len(header):
        raise ValueError(f"{len(row)} fields, expected {len(header)}")
    for value in row:
        value.encode("utf-8")  # UnicodeEncodeError (a ValueError) on bytes that were not UTF-8
    r = dict(zip(header, row, strict=True))
    old, new = json.loads(r["old"]), json.loads(r["new"])  # JSONDecodeError is a ValueError
    for v in (old, new):
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise ValueError(f"not a list of genres: {v!r}")
    return Change(r["path"], r["field"], old, new)


@dataclass
class UndoReport:
    restored: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # already holding the old value
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    removed: list[str] = field(default_factory=list)  # temporary copies left by a killed write
    notice: str | None = None  # a torn last log record that was left out

    def summary(self) -> str:
        return (f"restored {len(self.restored)} files, {len(self.unchanged)} already as before, "
                f"{len(self.failed)} not restored" + leftovers_note(self.removed)
                + (f"; {self.notice}" if self.notice else ""))


def leftovers_note(removed: Sequence[str | Path]) -> str:
    return f"; removed {len(removed)} temporary copies left by an interrupted run" if removed else ""


def undo(log: str | Path, progress=lambda n: None) -> UndoReport:
    """Put back the old values of every change in ``log`` (newest first).

    A file whose genre is no longer the value written by stylegen was edited since; it is
    left alone and reported.
    """
    changes, notice = read_log(log)
    report = UndoReport(notice=notice, removed=[str(p) for p in remove_leftovers(ch.path for ch in changes)])
    for ch in reversed(changes):
        try:
            if os.path.realpath(ch.path) != ch.path:  # the log holds resolved paths
                raise TagWriteError("now reached through a symbolic link; left alone")
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

