"""beets plugin: genres from album art with stylegen, fully offline.

Enable it with ``plugins: stylegen``; it answers out of the box with the model shipped in
stylegen, or with a model or an index of your own::

    stylegen:
        model: null           # a model's name or path (`stylegen model list`); default: the shipped one
        index: null           # an index with trained heads (wins over model)
        min_confidence: null  # leave albums whose top genre is less likely; null: the threshold
                              # `stylegen train` recorded (precision >= 0.80 out of fold), else 0.5
        auto: no              # yes: judge every album during `beet import`
        force: no             # yes: replace genres that are already set
        level: class          # "top": the taxonomy's top-level genres; for a Discogs model
                              # "genre" | "style" | "both", as beets' discogs plugin does
                              # (style: genres = styles, the style field = the broad genre)
        count: 1              # write up to this many genres
        method: null          # head | knn | ensemble (default: the index's best)
        device: auto

``beet stylegen [QUERY]`` sets the genres of the matching albums (``-p`` only shows the
suggestions) and stores the top probability in the float field ``stylegen_confidence``
(``beet ls -a stylegen_confidence:0.8..``). The art is ``album.artpath``, else the cover
embedded in the album's files, else ``cover.*``/``folder.*`` next to them. beets 2.7 and
later keep genres in the list field ``genres``; older versions get the ``genre`` string.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from beets import ui
from beets.dbcore import types
from beets.library import Album, Item
from beets.plugins import BeetsPlugin

CONFIDENCE = "stylegen_confidence"


class StylegenPlugin(BeetsPlugin):
    item_types: ClassVar[dict[str, types.Type]] = {CONFIDENCE: types.FLOAT}
    album_types: ClassVar[dict[str, types.Type]] = {CONFIDENCE: types.FLOAT}

    def __init__(self) -> None:
        super().__init__()
        self.config.add({"index": None, "model": None, "min_confidence": None, "auto": False, "force": False,
                         "level": "class", "count": 1, "method": None, "device": "auto"})
        self._engine: Any = None
        if self.config["auto"].get(bool):
            self.import_stages = [self.imported]

    # ---- the stylegen engine, opened on first use -------------------------------------
    def engine(self) -> Any:
        if self._engine is None:
            from stylegen.errors import StylegenError
            from stylegen.query.engine import Engine

            index = self.config["index"].as_filename() if self.config["index"].get() else None
            model = self.config["model"].as_str() if self.config["model"].get() else None
            try:
                self._engine = Engine.open(index, device=self.config["device"].as_str(), model=model)
            except StylegenError as exc:
                raise ui.UserError(f"stylegen: {exc}") from None
        return self._engine

    def min_confidence(self, method: str | None) -> float:
        """The configured threshold, else the one `stylegen train` recorded for the method, else 0.5."""
        if self.config["min_confidence"].get() is not None:
            return float(self.config["min_confidence"].as_number())
        recorded = self.engine().min_confidence(method)
        return 0.5 if recorded is None else recorded

    # ---- command and import stage -------------------------------------------------------
    def commands(self) -> list[ui.Subcommand]:
        cmd = ui.Subcommand("stylegen", help="suggest or set genres from album art (offline)")
        cmd.parser.add_option("-p", "--pretend", action="store_true", help="only show the suggestions")
        cmd.parser.add_option("-f", "--force", action="store_true", default=None,
                              help="replace genres that are already set")
        cmd.parser.add_option("-m", "--min-confidence", type="float", dest="min_confidence",
                              help="leave albums whose top genre is less likely")

        def func(lib: Any, opts: Any, args: list[str]) -> None:
            overrides = {k: v for k, v in (("force", opts.force), ("min_confidence", opts.min_confidence))
                         if v is not None}
            self.config.set(overrides)
            write = ui.should_write()
            for album in lib.albums(args):
                self.process(album, pretend=bool(opts.pretend), write=write)

        cmd.func = func
        return [cmd]

    def imported(self, session: Any, task: Any) -> None:
        """Import stage (``auto: yes``): the importer writes the files afterwards."""
        self.process(task.album if task.is_album else task.item, pretend=False, write=False)

    # ---- one album or singleton -----------------------------------------------------------
    def process(self, obj: Album | Item, *, pretend: bool, write: bool) -> None:
        from stylegen.apps.musiclib import genres as library
        from stylegen.errors import StylegenError

        items = list(obj.items()) if isinstance(obj, Album) else [obj]
        art = os.fsdecode(obj.artpath) if isinstance(obj, Album) and obj.artpath else None
        try:
            result = library.judge_files([os.fsdecode(i.path) for i in items], self.engine(), art=art,
                                         method=self.config["method"].get())
            new, confidence = library.suggestion(result, level=self.config["level"].as_str(),
                                                 count=self.config["count"].get(int),
                                                 min_confidence=self.min_confidence(self.config["method"].get()))
        except StylegenError as exc:
            self._log.warning("{}: {}", obj, exc)
            return
        if result.error:
            self._log.info("{}: {}", obj, result.error)
            return
        shown = ", ".join(f"{g['genre']} {g['probability']:.2f}" for g in result.genres)
        old = current_genres(obj)
        ui.print_(f"{obj}: {', '.join(old) or 'no genre'} -> {shown}")
        if pretend:
            return
        if not new:
            self._log.info("{}: confidence {:.2f} is below min_confidence", obj, confidence)
            return
        if old and not self.config["force"].get(bool):
            self._log.info("{}: keeping {} (use --force)", obj, ", ".join(old))
            return
        set_genres(obj, list(new))
        level = self.config["level"].as_str()
        if level in ("style", "both") and "style" in type(obj)._fields:
            # beets' discogs plugin: styles in `genres`, the broad Discogs genre in `style`
            broad = library.broad_genre(result)
            if broad is not None:
                obj["style"] = broad
        obj[CONFIDENCE] = confidence
        obj.try_sync(write=write, move=False)


def genre_field(obj: Album | Item) -> str:
    """``genres`` (a list, beets 2.7 and later) or the older string field ``genre``."""
    return "genres" if "genres" in type(obj)._fields else "genre"


def current_genres(obj: Album | Item) -> list[str]:
    value = obj.get(genre_field(obj))
    if not value:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [g.strip() for g in str(value).split(",") if g.strip()]


def set_genres(obj: Album | Item, genres: list[str]) -> None:
    field = genre_field(obj)
    obj[field] = genres if field == "genres" else ", ".join(genres)
