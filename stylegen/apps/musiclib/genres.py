"""Genres for a music library: scan albums' cover art, suggest genres, write them safely.

The stages follow the data: :mod:`stylegen.sources.audioart` walks the audio files and finds each
album's cover; every album is judged through the one query path
(``Engine.query_many`` on the file holding its art, read by ``images.read_bytes``), so an
album gets exactly the answer ``stylegen classify`` gives for the same image;
:func:`plan_tags` decides per file what would change; :func:`apply` writes through
:mod:`stylegen.apps.musiclib.tagging` (verified temporary copies and an undo log)::

    engine = Engine.open("indexes/covers")
    report = scan("~/Music", engine)
    plans = plan_tags(report, min_confidence=0.5)
    done = apply(plans, "undo.csv")
"""

from __future__ import annotations

import csv
import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylegen.apps.musiclib import tagging
from stylegen.errors import StylegenError
from stylegen.sources import audioart
from stylegen.sources.labels import display_label
from stylegen.util.tables import safe_row

LEVELS = ("class", "top", "genre", "style", "both")
DISCOGS_LEVELS = ("genre", "style", "both")  # written as beets' discogs plugin writes them
QUERY_CHUNK = 32  # albums per query_many call (bounds the decoded pixels held at once)
Progress = Callable[[int], None]


def _no_progress(n: int) -> None:
    return None


@dataclass
class AlbumResult:
    """One album: where its art came from, its current genres and the suggested ones."""

    album: audioart.Album
    genres: list[dict[str, Any]] = field(default_factory=list)  # [{"genre","probability","path"}]
    levels: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    in_index: bool = False
    error: str | None = None  # no cover art, unreadable art

    def to_dict(self) -> dict[str, Any]:
        a = self.album
        return {"album": a.key, "artist": a.artist, "title": a.album, "folder": str(a.folder),
                "tracks": [str(t) for t in a.tracks], "art": None if a.art is None else str(a.art),
                "art_source": a.art_source, "current_genres": list(a.genres), "in_index": self.in_index,
                "genres": self.genres, "levels": self.levels, "error": self.error}


@dataclass
class ScanReport:
    root: str
    method: str | None
    albums: list[AlbumResult]
    bad_files: list[dict[str, str]]  # unreadable audio files {"path", "reason"}
    tracks: int = 0
    seconds: float = 0.0

    @property
    def no_art(self) -> list[AlbumResult]:
        return [r for r in self.albums if r.error]

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "method": self.method, "tracks": self.tracks,
                "albums": [r.to_dict() for r in self.albums], "bad_files": self.bad_files,
                "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        rate = len(self.albums) / self.seconds if self.seconds else 0.0
        return (f"{len(self.albums)} albums ({self.tracks} tracks) in {self.seconds:.1f} s ({rate:.1f} albums/s); "
                f"{len(self.albums) - len(self.no_art)} judged, {len(self.no_art)} without usable art, "
                f"{len(self.bad_files)} unreadable audio files")


# ---- scan ----------------------------------------------------------------------------------
def judge(albums: Sequence[audioart.Album], engine: Any, *, top: int = 3, method: str | None = None,
          progress: Progress = _no_progress) -> list[AlbumResult]:
    """One prediction per album from the file holding its art, through ``engine.query_many``."""
    out = {a.key: AlbumResult(a, error="no cover art") for a in albums if a.art is None}
    todo = [a for a in albums if a.art is not None]
    progress(len(out))
    for i in range(0, len(todo), QUERY_CHUNK):
        chunk = todo[i : i + QUERY_CHUNK]
        results, bad = engine.query_many([str(a.art) for a in chunk], top=top, method=method,
                                         labels=[a.key for a in chunk])
        by_key = {a.key: a for a in chunk}
        for r in results:
            out[r.label] = AlbumResult(by_key[r.label], r.genres, r.levels, r.in_index)
        for b in bad:
            out[b["image"]] = AlbumResult(by_key[b["image"]], error=f"art unreadable: {b['reason']}")
        progress(len(chunk))
    return [out[a.key] for a in albums]


def judge_files(paths: Sequence[str | Path], engine: Any, *, art: str | Path | None = None, top: int = 3,
                method: str | None = None) -> AlbumResult:
    """Suggestions for one album given as its files (and optionally its art image)."""
    return judge([audioart.album_from_files(paths, art)], engine, top=top, method=method)[0]


def scan(root: str | Path, engine: Any, *, top: int = 3, method: str | None = None,
         progress: bool = False) -> ScanReport:
    """Find every album under ``root`` and suggest its genres."""
    from stylegen.util.progress import embed_progress

    t0 = time.perf_counter()
    walked = audioart.walk_albums(root)
    with embed_progress(len(walked[0]), progress, label="reading tags", unit="files") as advance:
        albums, bad, n_tracks = audioart.find_albums(root, advance, walked)
    with embed_progress(len(albums), progress, label="judging art", unit="albums") as advance:
        results = judge(albums, engine, top=top, method=method, progress=advance)
    used = method or (engine.head_config["default_method"] if any(not r.error for r in results) else None)
    return ScanReport(str(root), used, results, bad, n_tracks, time.perf_counter() - t0)


# ---- rows for `stylegen embed DIR_OF_AUDIO` -------------------------------------------------
# ---- plan and write tags --------------------------------------------------------------------
@dataclass(frozen=True)
class TagPlan:
    """What ``tag`` does to one file: ``write``, or ``leave`` with the reason."""

    path: str
    album: str
    old: tuple[str, ...]
    new: tuple[str, ...]
    confidence: float
    action: str  # write | leave
    reason: str = ""
    root: str | None = None  # the scanned tree: a write never follows a link out of it


def _ranked(result: AlbumResult, level: str) -> list[dict[str, Any]]:
    if level == "class":
        return result.genres
    name = "top" if level in ("top", "genre") else "style"
    ranked = result.levels.get(name)
    if ranked is None and name == "top":
        raise StylegenError(f"the model's heads have no taxonomy, so there is no {level!r} level; use --level class")
    if ranked is None:
        raise StylegenError(f"the model has no styles below its genres, so there is no {level!r} level; use "
                            "--level genre (a model trained with --labels multi --taxonomy discogs has styles)")
    return ranked


def suggestion(result: AlbumResult, *, level: str = "class", count: int = 1,
               min_confidence: float = 0.0) -> tuple[tuple[str, ...], float]:
    """The genres to write for an album (up to ``count``, each at least ``min_confidence``)
    and the probability that decides whether to write (the best one's).

    ``level``: ``class`` (the heads' classes as named), ``top`` (the taxonomy's top-level
    genres), or for models with Discogs genres and styles the way beets' discogs plugin fills
    the genre field: ``genre`` (the broad genres: "Electronic"), ``style`` (the styles:
    "Techno") or ``both`` (styles, then their broad genres: "Techno", "Electronic"; the
    plugin's ``append_style_genre``). These three are spelled as Discogs spells them; whether
    to write is decided by the best genre for ``genre`` and ``both``, by the best style for
    ``style``."""
    if level not in LEVELS:
        raise StylegenError(f"--level must be one of {', '.join(LEVELS)}, got {level!r}")
    if level == "both":
        styles, _ = suggestion(result, level="style", count=count, min_confidence=min_confidence)
        genres, conf = suggestion(result, level="genre", count=count, min_confidence=min_confidence)
        return (tuple(dict.fromkeys(styles + genres)) if genres else ()), conf
    ranked = _ranked(result, level)
    if not ranked:
        return (), 0.0
    picked = tuple(g["genre"] for g in ranked[:count] if g["probability"] >= min_confidence)
    if level in DISCOGS_LEVELS:
        picked = tuple(dict.fromkeys(display_label(g) for g in picked))
    return picked, float(ranked[0]["probability"])


def broad_genre(result: AlbumResult, min_confidence: float = 0.0) -> str | None:
    """The best top-level genre in Discogs spelling when at least ``min_confidence`` (what
    beets' discogs plugin keeps in the ``style`` field), else None."""
    top = result.levels.get("top") or []
    return display_label(top[0]["genre"]) if top and top[0]["probability"] >= min_confidence else None


def plan_tags(report: ScanReport, *, level: str = "class", count: int = 1, min_confidence: float = 0.0,
              overwrite: bool = False) -> list[TagPlan]:
    """Per file: the genre that would be written, or why the file is left alone.

    Files that already have a genre are left alone unless ``overwrite``; albums whose top
    suggestion is below ``min_confidence`` or that have no usable art are left alone, and so
    are symbolic links to files outside the scanned tree.
    """
    plans = []
    for r in report.albums:
        new, conf = suggestion(r, level=level, count=count, min_confidence=min_confidence) if not r.error else ((), 0.0)
        for t, old in zip(r.album.tracks, r.album.track_genres, strict=True):
            why = (r.error or ("" if new else f"confidence {conf:.2f} below {min_confidence:.2f}")
                   or ("has a genre (use --overwrite)" if old and not overwrite else "")
                   or ("already tagged so" if old == new else "")
                   or tagging.link_outside(t, report.root) or "")
            plans.append(TagPlan(str(t), r.album.key, old, new, conf, "leave" if why else "write", why, report.root))
    return plans


@dataclass
class TagReport:
    written: list[tagging.Change] = field(default_factory=list)
    left: list[TagPlan] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    log: str | None = None
    removed: list[str] = field(default_factory=list)  # temporary copies left by a killed run

    def summary(self) -> str:
        return (f"tagged {len(self.written)} files, left {len(self.left)} alone, {len(self.failed)} failed"
                + tagging.leftovers_note(self.removed))


def apply(plans: Sequence[TagPlan], log: str | Path, progress: Progress = _no_progress, *,
          keep_times: bool = True) -> TagReport:
    """Write every ``write`` plan through a verified temporary copy; a failure is recorded
    and the run goes on. Each change is appended to the undo ``log`` as it happens.

    First the temporary copies that a killed earlier run left next to the planned files are
    deleted. A file whose genre changed since the scan, or that now resolves outside the
    scanned tree, is reported as failed and left alone. ``keep_times``: tagged files keep
    their modification times (owner, group and mode are always kept)."""
    report = TagReport(log=str(log), removed=[str(q) for q in tagging.remove_leftovers(p.path for p in plans)])
    for p in plans:
        if p.action != "write":
            report.left.append(p)
            continue
        try:
            report.written.append(tagging.write_genre(p.path, list(p.new), log=log, root=p.root, expect=p.old,
                                                      keep_times=keep_times))
        except tagging.TagWriteError as exc:
            report.failed.append({"path": p.path, "reason": str(exc)})
        progress(1)
    return report


# ---- output ----------------------------------------------------------------------------------
def format_scan(report: ScanReport) -> str:
    """One line per album: current genres -> suggested top genres with probabilities."""
    lines = []
    for r in report.albums:
        now = ", ".join(r.album.genres) or "no genre"
        if r.error:
            lines.append(f"{r.album.key}: {now}  ({r.error})")
            continue
        shown = ", ".join(f"{g['genre']} {g['probability']:.2f}" for g in r.genres)
        lines.append(f"{r.album.key}: {now} -> {shown}  [{r.album.art_source} art]")
    lines += [f"unreadable: {b['path']}: {b['reason']}" for b in report.bad_files]
    return "\n".join(lines)


def format_plan(plans: Sequence[TagPlan], bad_files: Sequence[dict[str, str]] = ()) -> str:
    """Per album, what ``tag --write`` would change (files left alone are counted)."""
    lines, by_album = [], {}
    for p in plans:
        by_album.setdefault(p.album, []).append(p)
    for album, ps in by_album.items():
        writes = [p for p in ps if p.action == "write"]
        if writes:
            olds = sorted({", ".join(p.old) or "no genre" for p in writes})
            lines.append(f"{album}: {' / '.join(olds)} -> {', '.join(writes[0].new)} "
                         f"({writes[0].confidence:.2f}, {len(writes)} of {len(ps)} files)")
        else:
            lines.append(f"{album}: unchanged ({ps[0].reason})")
    lines += [f"unreadable: {b['path']}: {b['reason']}" for b in bad_files]
    return "\n".join(lines)


def write_csv(report: ScanReport, out: str | Path) -> None:
    """One row per album: key, art, current genres, top-3 suggestions (text that a
    spreadsheet would run as a formula gets a leading apostrophe)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["album", "artist", "title", "folder", "tracks", "art", "art_source", "current_genres",
                    *[f"{x}{i}" for i in (1, 2, 3) for x in ("genre", "probability")], "error"])
        for r in report.albums:
            a = r.album
            top = [v for g in r.genres[:3] for v in (g["genre"], g["probability"])]
            w.writerow(safe_row([a.key, a.artist or "", a.album or "", str(a.folder), len(a.tracks),
                                 str(a.art or ""), a.art_source or "", "|".join(a.genres),
                                 *(top + [""] * (6 - len(top))), r.error or ""]))


def write_html(report: ScanReport, out: str | Path) -> None:
    """A self-contained page: each album's art, current genres and suggestions."""
    from stylegen.apps.render import thumbnail_data_uri

    cards = []
    for r in report.albums:
        src = thumbnail_data_uri(r.album.art, 160) if r.album.art is not None and not r.error else ""
        sugg = "<br>".join(f"{html.escape(g['genre'])} {g['probability']:.2f}" for g in r.genres) or html.escape(r.error or "")
        now = html.escape(", ".join(r.album.genres) or "no genre")
        img = f"<img src='{src}' alt=''>" if src else "<div class='none'>no art</div>"
        cards.append(f"<figure>{img}<figcaption><b>{html.escape(r.album.key)}</b><br>now: {now}<br>"
                     f"<span class='s'>{sugg}</span></figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em}.grid{display:grid;"
             "grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:14px}figure{margin:0}"
             "img,.none{width:160px;height:160px;object-fit:cover;background:#ddd}figcaption{font-size:13px}"
             ".s{color:#264}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>stylegen library scan</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(report.root)}</h1><p>{html.escape(report.summary())}</p>"
            f"<div class='grid'>{''.join(cards)}</div></body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")


def default_log(root: str | Path) -> Path:
    """Where ``tag --write`` keeps its undo log unless told: in the library's root."""
    return Path(root) / f"stylegen-undo-{time.strftime('%Y%m%d-%H%M%S')}.csv"
