"""What the genre tagger promises about the files it touches (issue 19, items 3-5), on real
FLAC/MP3/Ogg files: a tagged file keeps its owner, group, mode and times; no write follows
a link out of the scanned tree; a genre set after the scan is not overwritten; the undo log
survives a torn last record; a killed write leaves nothing behind for good."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stylegen.apps.musiclib import genres as library
from stylegen.apps.musiclib import tagging
from stylegen.errors import StylegenError
from stylegen.sources import audioart
from tests.audiofiles import tag, write_audio

FORMATS = ("flac", "mp3", "ogg")
OLD_MTIME_NS = 1_500_000_000_123_456_789  # 2017: what a music player sorts "recently added" by
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a file to 1000:1000")


def genre_of(path: Path) -> tuple[str, ...]:
    return audioart.read_track(path).genres


def scanned(root: Path, genre: str = "jazz") -> library.ScanReport:
    """What `library scan` reports for ``root`` when every album's art says ``genre``
    (the real walk and tag reading; only the engine's answer is given)."""
    albums, bad, n = audioart.find_albums(root)
    results = [library.AlbumResult(a, [{"genre": genre, "probability": 0.9, "path": [genre]}]) for a in albums]
    return library.ScanReport(str(root), "knn", results, bad, n)


def plan_for(plans: list[library.TagPlan], path: Path) -> library.TagPlan:
    return next(p for p in plans if p.path == str(path))


# ---- 3. a tagged file is the same file ----------------------------------------------------------
@as_root
@pytest.mark.parametrize("fmt", FORMATS)
def test_tagging_keeps_owner_group_mode_and_mtime(fmt, tmp_path):
    p = tag(write_audio(tmp_path / f"a.{fmt}"), artist="A", album="B", genre="Rock")
    os.chown(p, 1000, 1000)
    os.chmod(p, 0o640)
    os.utime(p, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    log = tmp_path / "undo.csv"

    tagging.write_genre(p, ["jazz"], log=log)
    st = os.stat(p)
    assert genre_of(p) == ("jazz",)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o640)
    assert st.st_mtime_ns == OLD_MTIME_NS

    assert tagging.undo(log).restored == [str(p.resolve())]
    st = os.stat(p)
    assert genre_of(p) == ("Rock",)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (1000, 1000, 0o640, OLD_MTIME_NS)


@as_root
def test_keep_times_false_gives_a_new_mtime_and_still_keeps_the_owner(tmp_path):
    p = write_audio(tmp_path / "a.flac")
    os.chown(p, 1000, 1000)
    os.chmod(p, 0o640)
    os.utime(p, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    tagging.write_genre(p, ["jazz"], keep_times=False)
    st = os.stat(p)
    assert st.st_mtime_ns > OLD_MTIME_NS and genre_of(p) == ("jazz",)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o640)


@as_root
def test_an_owner_that_cannot_be_kept_leaves_the_file_alone(tmp_path, monkeypatch):
    p = write_audio(tmp_path / "a.flac")
    os.chown(p, 1000, 1000)
    before = p.read_bytes()

    def refuse(*a, **k):  # what a user other than root gets for another user's file
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)
    with pytest.raises(tagging.TagWriteError, match="cannot keep the file's owner"):
        tagging.write_genre(p, ["jazz"])
    monkeypatch.undo()
    assert p.read_bytes() == before and sorted(q.name for q in tmp_path.iterdir()) == ["a.flac"]


def test_a_link_out_of_the_library_is_reported_not_followed(tmp_path):
    lib, outside = tmp_path / "lib", tmp_path / "outside"
    own = tag(write_audio(lib / "album" / "01 own.flac"), artist="A", album="B", albumartist="A")
    victim = tag(write_audio(outside / "victim.flac", seed=1), artist="A", album="B", albumartist="A")
    link = lib / "album" / "02 link.flac"
    link.symlink_to(victim)
    inner = lib / "album" / "03 inner.flac"  # a link that stays inside the library is fine
    inner.symlink_to(lib / "album" / "01 own.flac")
    victim_bytes = victim.read_bytes()

    plans = library.plan_tags(scanned(lib))
    done = library.apply(plans, tmp_path / "undo.csv")
    assert victim.read_bytes() == victim_bytes and genre_of(victim) == ()
    assert genre_of(own) == ("jazz",)
    skipped = {p.path: p.reason for p in done.left} | {f["path"]: f["reason"] for f in done.failed}
    assert "outside" in skipped[str(link)] and "not followed" in skipped[str(link)]
    assert len(skipped[str(link)].splitlines()) == 1
    assert str(inner) not in skipped or "outside" not in skipped[str(inner)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_swapped_for_a_link_out_after_the_scan_is_not_followed(fmt, tmp_path):
    lib, outside = tmp_path / "lib", tmp_path / "outside"
    p = tag(write_audio(lib / "album" / f"01.{fmt}"), artist="A", album="B", albumartist="A")
    victim = write_audio(outside / f"victim.{fmt}", seed=1)
    victim_bytes = victim.read_bytes()
    plans = library.plan_tags(scanned(lib))
    assert plan_for(plans, p).action == "write"
    p.unlink()
    p.symlink_to(victim)  # between the scan and the write

    done = library.apply(plans, tmp_path / "undo.csv")
    assert victim.read_bytes() == victim_bytes
    assert done.failed and "outside" in done.failed[0]["reason"] and not done.written


# ---- 4. a genre set after the scan -------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_genre_set_after_the_scan_is_left_alone(fmt, tmp_path):
    lib = tmp_path / "lib"
    first, second = (tag(write_audio(lib / f"{i}.{fmt}", seed=i), artist="A", album="B", albumartist="A")
                     for i in (1, 2))
    plans = library.plan_tags(scanned(lib))  # neither has a genre: both would be written
    assert [p.action for p in plans] == ["write", "write"]
    tag(first, genre="Blues")  # the user sets a genre in another program meanwhile

    done = library.apply(plans, tmp_path / "undo.csv")
    assert genre_of(first) == ("Blues",) and genre_of(second) == ("jazz",)
    assert [f["path"] for f in done.failed] == [str(first)]
    assert "changed since the scan" in done.failed[0]["reason"]
    assert [c.path for c in tagging.read_log(tmp_path / "undo.csv")[0]] == [str(second.resolve())]


# ---- 5. the undo log and killed writes ---------------------------------------------------------
def two_changes(tmp_path: Path) -> tuple[Path, list[Path], bytes]:
    a, b = write_audio(tmp_path / "a.flac"), write_audio(tmp_path / "b.flac", seed=1)
    log = tmp_path / "undo.csv"
    tagging.write_genre(a, ["jazz"], log=log)
    tagging.write_genre(b, ["Música popular brasileira"], log=log)  # multi-byte characters to cut inside
    return log, [a, b], log.read_bytes()


def test_a_torn_last_log_record_is_dropped_with_a_notice(tmp_path):
    log, (a, b), full = two_changes(tmp_path)
    complete = tagging.read_log(log)[0]
    start = full.rindex(b"\n", 0, len(full) - 1) + 1  # the last record
    cut_inside_a_character = False
    for cut in range(start + 1, len(full)):
        log.write_bytes(full[:cut])
        changes, notice = tagging.read_log(log)
        assert changes[0] == complete[0], cut
        if len(changes) == 2:  # everything but the line end (or the closing quote) was written
            assert changes[1] == complete[1] and notice is None, cut
        else:
            assert len(changes) == 1 and "incomplete last record" in notice, cut
        try:
            full[:cut].decode("utf-8")
        except UnicodeDecodeError:
            cut_inside_a_character = True
    assert cut_inside_a_character

    log.write_bytes(full[: len(full) - 12])  # the last write was killed: undo restores the rest
    report = tagging.undo(log)
    assert report.restored == [str(a.resolve())] and "incomplete last record" in report.summary()
    assert genre_of(a) == () and genre_of(b) == ("Música popular brasileira",)


def test_damage_before_the_last_record_is_still_an_error(tmp_path):
    log, _, full = two_changes(tmp_path)
    first = full.index(b"\n") + 1
    log.write_bytes(full[:first] + full[first:].replace(b'"[""jazz""]"', b'"[""jazz"""', 1))
    with pytest.raises(StylegenError, match="damaged at record 1"):
        tagging.read_log(log)
    log.write_bytes(full[:first] + b"\xff" + full[first:])  # not UTF-8, and not at the end
    with pytest.raises(StylegenError, match="damaged"):
        tagging.undo(log)
    log.write_bytes(b"path,fie")  # killed while writing the header: nothing to undo, no error
    assert tagging.read_log(log)[0] == [] and tagging.undo(log).notice


def test_the_new_log_and_every_replace_are_made_durable_by_fsyncing_the_folder(tmp_path, monkeypatch):
    p = write_audio(tmp_path / "music" / "a.flac")
    log = tmp_path / "logs" / "undo.csv"
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync-file", st.st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("replace", os.stat(dst).st_ino))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    tagging.write_genre(p, ["jazz"], log=log)
    logs_dir, music_dir = os.stat(log.parent).st_ino, os.stat(p.parent).st_ino
    assert ("fsync-dir", logs_dir) in events  # the log's new name is durable
    replaced = events.index(("replace", os.stat(p).st_ino))
    assert ("fsync-dir", music_dir) in events[replaced:]  # and so is the rename


KILLED_WRITE = ("import os, sys\nfrom stylegen.apps.musiclib import tagging\n"
                "os.replace = lambda *a: os._exit(9)  # killed just before the rename\n"
                "tagging.write_genre(sys.argv[1], ['jazz'], log=sys.argv[2])\n")
LEFTOVER = re.compile(r"\.01 track\.[a-z0-9_]{8}\.stylegen\.flac")


def test_a_killed_write_leaves_a_copy_that_the_next_run_removes(tmp_path):
    lib, outside = tmp_path / "lib", tmp_path / "outside"
    p = tag(write_audio(lib / "01 track.flac"), artist="A", album="B", albumartist="A")
    before = p.read_bytes()
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(p), str(tmp_path / "killed.csv")],
                            check=False, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert killed.returncode == 9, killed.stderr
    leftovers = [q for q in lib.iterdir() if LEFTOVER.fullmatch(q.name)]
    assert len(leftovers) == 1 and p.read_bytes() == before  # the original is untouched
    not_ours = [".01 track.abcdefgh.stylegen.flac.part", ".01 track.ABCDEFGH.stylegen.flac",
                ".01 track.abcdefg.stylegen.flac", ".02 other.abcdefgh.stylegen.flac",
                ".01 track.abcdefgh.stylegen.mp3", ".01 track.abcdefgh.flac", "notes.txt"]
    for name in not_ours:
        (lib / name).write_bytes(b"someone else's")
    (outside / "x.flac").parent.mkdir()
    (outside / "x.flac").write_bytes(b"outside")
    (lib / ".01 track.zzzzzzzz.stylegen.flac").symlink_to(outside / "x.flac")  # a link, not a copy we made
    spare = tmp_path / "spare"
    spare.write_bytes(leftovers[0].read_bytes())

    done = library.apply(library.plan_tags(scanned(lib)), tmp_path / "undo.csv")
    assert not leftovers[0].exists() and genre_of(p) == ("jazz",)
    assert [Path(q).name for q in done.removed] == [leftovers[0].name] and "removed 1" in done.summary()
    assert sorted(q.name for q in lib.iterdir()) == sorted([p.name, *not_ours, ".01 track.zzzzzzzz.stylegen.flac"])
    assert (outside / "x.flac").read_bytes() == b"outside"

    os.replace(spare, leftovers[0])  # `library undo` cleans up after a killed write too
    assert tagging.undo(tmp_path / "killed.csv").removed == [str(leftovers[0])] and not leftovers[0].exists()
