"""Writing to disk so that a crash never leaves half a file or half a folder behind.

Two helpers, used by everything stylegen writes:

* :func:`atomic_write`: a file is written under a temporary name in its own folder,
  flushed to disk, renamed over the target, and the folder is flushed too.
* :class:`VersionedFolder`: a folder of complete versions (``v000001``, ``set-000001``)
  with a ``CURRENT`` file naming the live one. A new version is written whole under a
  temporary name, renamed, and only then named in ``CURRENT``; readers never see a
  half-written version, and a run killed at any point leaves the previous one in use.

Temporary names start with :data:`TMP_PREFIX`, so a clean-up after a killed run removes
only what stylegen itself was writing, never a user's file that happens to look alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylegen.errors import DataError

TMP_PREFIX = ".stylegen-tmp-"
CURRENT = "CURRENT"
WRITTEN = ".stylegen-versions"  # the versions a VersionedFolder wrote, by name: all it may delete


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file directly in ``folder``, then the folder itself."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk, rename
    it over ``path`` and flush the folder. On any error ``path`` is unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder(parent: Path, name: str, fill: Callable[[Path], Any]) -> Path:
    """``fill(tmp)`` a temporary folder under ``parent``, flush it, rename it to ``name``.

    ``parent/name`` must not exist, except as a complete folder left by a run killed before
    it was named anywhere; that one is replaced."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide an index or a shipped model from other users
    final = parent / name
    try:
        fill(tmp)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    return final


def clean_temporary(parent: Path) -> list[Path]:
    """Remove what a killed stylegen run was writing under ``parent`` (only names that
    start with :data:`TMP_PREFIX`); returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for stale in parent.glob(f"{TMP_PREFIX}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


@dataclass(frozen=True)
class VersionedFolder:
    """Versions ``{prefix}NNNNNN`` under ``base``, the live one named in ``base/CURRENT``."""

    base: Path
    prefix: str

    def _pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.prefix) + r"(\d{6})")

    def versions(self) -> list[str]:
        """Names of the complete versions on disk, oldest first."""
        if not self.base.is_dir():
            return []
        pat = self._pattern()
        return sorted(p.name for p in self.base.iterdir()
                      if pat.fullmatch(p.name) and p.is_dir() and not p.is_symlink())

    def current_name(self) -> str | None:
        """The name in ``CURRENT`` (None: no ``CURRENT``). A name that is not one of this
        folder's version names (a path, ``..``, a link) is refused: ``CURRENT`` never points
        outside ``base``."""
        pointer = self.base / CURRENT
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not self._pattern().fullmatch(name):
            raise DataError(f"{pointer} names {name[:80]!r}, not a version of this folder")
        folder = self.base / name
        if folder.is_symlink() or not folder.is_dir():
            raise DataError(f"{pointer} names {name!r}, which is not a folder in {self.base}")
        return name

    def current(self) -> Path | None:
        name = self.current_name()
        return None if name is None else self.base / name

    def written(self) -> list[str]:
        """The versions this folder's commits wrote and have not removed (``.stylegen-versions``)."""
        path = self.base / WRITTEN
        if not path.is_file():
            return []
        pat = self._pattern()
        return [n for n in path.read_text(encoding="utf-8", errors="replace").split() if pat.fullmatch(n)]

    def commit(self, fill: Callable[[Path], Any]) -> Path:
        """Write a new version with ``fill(tmp_folder)``, make it current, then remove the
        older versions stylegen wrote: those recorded in ``.stylegen-versions`` and the one
        ``CURRENT`` named. A folder that only looks like a version is never touched."""
        numbers = [int(n[len(self.prefix):]) for n in self.versions()]
        current = self.current_name()
        if current:
            numbers.append(int(current[len(self.prefix):]))
        name = f"{self.prefix}{max(numbers, default=0) + 1:06d}"
        ours = [*self.written(), *([current] if current else [])]
        final = write_folder(self.base, name, fill)
        atomic_write_text(self.base / WRITTEN, "\n".join(dict.fromkeys([*ours, name])) + "\n")
        atomic_write_text(self.base / CURRENT, name + "\n")
        for old in dict.fromkeys(ours):
            folder = self.base / old
            if old != name and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
        atomic_write_text(self.base / WRITTEN, name + "\n")
        return final
