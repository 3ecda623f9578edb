"""The query side: one path from any input to genres and similar covers.

``Engine.query`` takes a file path, uploaded bytes, a decoded PIL image or a cover id and

1. reads the item's bytes once, hashes them and looks the hash up in the index: a cover of
   the index is answered from its stored vector and is left out of its own kNN vote;
2. otherwise decodes it with the index's own preprocessing (``images.prepare`` with
   ``Index.preprocess``) and embeds it with the index's backbone, features and compressor;
3. scores it with the trained heads (one calling contract for every head) and finds its
   nearest covers.

The CLI's ``classify``/``similar``, the HTTP service, ``evaluate --test`` and the music
library scan are thin adapters over it, so the same file gets the same answer everywhere::

    engine = Engine.open("indexes/covers")
    r = engine.query("cover.jpg", top=3, k=12)
    r.genres, r.neighbours
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from stylegen.errors import (
    BadImageError,
    DataError,
    IndexMismatchError,
    IndexNotFoundError,
    ModelNotFoundError,
    StylegenError,
    UnknownCoverError,
)
from stylegen.index.store import Index
from stylegen.query.options import BY, METHODS
from stylegen.sources import images
from stylegen.sources.labels import Taxonomy

QueryItem = str | Path | bytes | Image.Image | int
NO_COVERS = ("similar covers need an index of your own covers: run `stylegen embed FOLDER --index indexes/mine`, "
             "then pass --index indexes/mine")


@dataclass
class QueryResult:
    """Everything one query answers; ``to_dict`` is the JSON shape of the CLI and the API."""

    label: str
    vector: np.ndarray
    row: int | None = None
    content_hash: str | None = None
    size: tuple[int, int] | None = None
    method: str | None = None
    proba: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    genres: list[dict[str, Any]] = field(default_factory=list)
    levels: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    neighbours: list[dict[str, Any]] = field(default_factory=list)
    explanation: dict[str, Any] | None = None  # query(explain=True): see stylegen.query.explain

    @property
    def in_index(self) -> bool:
        return self.row is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.label, "in_index": self.in_index, "id": self.row}
        if self.method is not None:
            out.update(method=self.method, genres=self.genres, levels=self.levels)
        if self.neighbours:
            out["neighbours"] = self.neighbours
        if self.explanation is not None:
            out["explanation"] = self.explanation
        return out


@dataclass
class _Item:
    """One query input after reading: its row in the index, or the pixels to embed."""

    label: str
    row: int | None = None
    content_hash: str | None = None
    size: tuple[int, int] | None = None
    pixels: np.ndarray | None = None
    vector: np.ndarray | None = None  # embedded already (query_batch: one forward pass for all)
    raw: dict[str, np.ndarray] | None = None  # its raw part vectors then (for explain)
    source: Any = None  # prepare(): the item as given (path, bytes, image or id), for steps that reread it


@dataclass
class Engine:
    """An opened index plus, loaded on first use, its featurizer and the heads asked for.

    ``weights``: the backbone weights file or tag to embed queries with, for an index made
    with other than the packaged weights (:meth:`stylegen.index.store.Index.query_config`).
    ``heads_root``: where the heads come from (a model bundle; None: the index's own);
    ``graph``: an exported featurizer shipped with the model (None: export on first use).
    """

    index: Index
    device: str = "auto"
    weights: str | None = None
    heads_root: Path | None = None
    graph: Path | None = None
    _featurizer: Any = field(default=None, repr=False)
    _heads: dict[str, Any] = field(default_factory=dict, repr=False)
    _head_config: dict[str, Any] | None = field(default=None, repr=False)
    _raw: Any = field(default=None, repr=False)  # RawFeatures of the index, made on first use
    _taxonomy: tuple[Any, Taxonomy] | None = field(default=None, repr=False)  # (tree, built from it)
    _keypoints: Any = field(default=None, repr=False)  # verify's KeypointCache, made on first use

    @classmethod
    def open(cls, index_dir: str | Path | None = None, device: str = "auto", weights: str | None = None,
             model: str | Path | None = None) -> Engine:
        """An index and/or a model bundle (``model``: a name or path, :mod:`stylegen.index.bundle`).

        No index: the model alone answers genres (None: the shipped default model). An index
        answers similar covers and genres with its own heads, or with ``model``'s heads, or,
        when it has none, with those of the installed model it was made with (looked up by
        name, never by a path the index names). A model's heads need the index to share its
        vector space (``stylegen embed SRC --index DIR --model NAME``).
        """
        from stylegen.heads.io import has_head_set
        from stylegen.index.bundle import open_model

        if index_dir is None:
            m = open_model(model)
            return cls(m.index, device=device, weights=weights, heads_root=m.root, graph=m.graph)
        index = Index.open(index_dir)
        recorded = str((index.manifest.get("model") or {}).get("name", ""))
        if model is None and recorded and "/" not in recorded and "\\" not in recorded \
                and not has_head_set(index_dir):
            model = recorded
        if model is None:
            return cls(index, device=device, weights=weights)
        m = open_model(model)
        if m.feature_id != index.feature_id:
            raise IndexMismatchError(f"index {index_dir} was not made with model {m.name} "
                                     f"(make it with `stylegen embed SRC --index DIR --model {m.name}`)")
        return cls(index, device=device, weights=weights, heads_root=m.root, graph=m.graph)

    @property
    def has_covers(self) -> bool:
        """Whether there are covers to search (a model bundle alone has none)."""
        return len(self.index) > 0

    # ---- the one query path ------------------------------------------------------------
    def query(self, item: QueryItem, *, top: int = 3, method: str | None = None, k: int = 0,
              by: str = "both", classify: bool = True, tabular: np.ndarray | None = None,
              label: str | None = None, explain: bool = False, verify: bool = False) -> QueryResult:
        """Genres (``classify``) and ``k`` nearest covers (by ``by``) of one item
        (``verify``: copies verified by local features first, :mod:`stylegen.query.verify`).

        Raises :class:`BadImageError` for an unreadable image and
        :class:`UnknownCoverError` for an id that is not in the index.
        """
        results, bad = self.query_many([item], top=top, method=method, k=k, by=by, classify=classify,
                                       tabular=tabular, labels=None if label is None else [label],
                                       keep_errors=True, explain=explain, verify=verify)
        if bad:
            exc = bad[0]["error"]
            raise type(exc)(f"{bad[0]['image']}: {exc}")
        return results[0]

    def query_many(self, items: Sequence[QueryItem], *, top: int = 3, method: str | None = None,
                   k: int = 0, by: str = "both", classify: bool = True,
                   tabular: np.ndarray | None = None, labels: Sequence[str] | None = None,
                   batch_size: int = 32, keep_errors: bool = False,
                   explain: bool = False, verify: bool = False) -> tuple[list[QueryResult], list[dict[str, Any]]]:
        """:meth:`query` for many items; unreadable ones are skipped and returned as
        ``[{"image", "reason"}]``. ``tabular`` has one row per item (hybrid heads).
        ``explain``: fill each result's ``explanation`` (kNN voters, per-tap leave-out)."""
        if by not in BY:
            raise StylegenError(f"by must be one of {', '.join(BY)}, got {by!r}")
        if k > 0 and not self.has_covers:
            raise IndexNotFoundError(NO_COVERS)
        if tabular is not None and len(tabular) != len(items):
            raise DataError(f"tabular has {len(tabular)} rows for {len(items)} images")
        read = [self._read(item, None if labels is None else labels[i]) for i, item in enumerate(items)]
        keep = [i for i, r in enumerate(read) if isinstance(r, _Item)]
        bad = [{"image": r[0], "reason": str(r[1]), "error": r[1]} for r in read if not isinstance(r, _Item)]
        bad = [b if keep_errors else {"image": b["image"], "reason": b["reason"]} for b in bad]
        if not keep:
            return [], bad
        good: list[_Item] = [read[i] for i in keep]  # type: ignore[misc]
        fresh_raw: dict[int, dict[str, np.ndarray]] = {}  # raw parts of the embedded items (explain)
        vectors = self._vectors(good, batch_size, fresh_raw if explain and classify else None)
        results = [QueryResult(it.label, v, it.row, it.content_hash, it.size) for it, v in zip(good, vectors, strict=True)]
        rows = [it.row for it in good]
        if classify:
            tab = None if tabular is None else np.asarray(tabular)[keep]
            proba, classes, used = self.predict_proba(vectors, method, rows=rows, tabular=tab)
            for r, p in zip(results, proba, strict=True):
                r.method, r.proba, r.classes = used, p, classes
                described = self.describe(p, classes, top)
                r.genres, r.levels = described["genres"], described.get("levels", {})
        if explain and classify:
            from stylegen.query.explain import explain as explain_one

            for i, (r, it) in enumerate(zip(results, good, strict=True)):
                raw = self.raw_features(it.row) if it.row is not None else fresh_raw[i]
                r.explanation = explain_one(self, r.vector, r.proba, r.classes, r.method, it.row, raw)
        if k > 0:
            from stylegen.query.verify import VERIFY_CANDIDATES, verify_neighbours

            found = self.neighbours(vectors, max(k, VERIFY_CANDIDATES) if verify else k, by, rows)
            for i, r, hits in zip(keep, results, found, strict=True):
                r.neighbours = verify_neighbours(self, items[i], r.vector, hits, k, by) if verify else hits
        return results, bad

    def prepare(self, item: QueryItem, label: str | None = None) -> _Item:
        """Read one item as :meth:`query` does (content hash, index lookup, decoding with the
        index's preprocessing), to be answered later by :meth:`query_batch`; lets a caller
        decode in its own thread. Raises :class:`BadImageError` for an unreadable image."""
        read = self._read(item, label)
        if not isinstance(read, _Item):
            raise type(read[1])(f"{read[0]}: {read[1]}")
        if read.source is None:
            read.source = item
        return read

    def query_batch(self, requests: Sequence[tuple[QueryItem | _Item, dict[str, Any]]], *,
                    batch_size: int = 32) -> list[QueryResult | Exception]:
        """Many queries, each with its own options (those of :meth:`query`), answered together:
        the items not in the index go through the featurizer in one batch, then each group of
        requests with the same options through :meth:`query_many` (heads and search batched).

        Returns one entry per request, in order: its :class:`QueryResult`, or the exception
        :meth:`query` would have raised for it alone (a bad item, or an error of its group);
        one request's failure never fails another's. The answers are :meth:`query`'s: the
        same vectors (a batch of the featurizer computes each row as alone, to float32
        round-off) through the same heads and search.
        """
        out: list[QueryResult | Exception | None] = [None] * len(requests)
        good: list[tuple[int, _Item]] = []
        for i, (item, options) in enumerate(requests):
            try:
                good.append((i, self.prepare(item, options.get("label"))))
            except StylegenError as exc:
                out[i] = exc
        fresh = [it for _, it in good if it.row is None and it.vector is None]
        if fresh:
            explain = any(requests[i][1].get("explain") for i, it in good if it.row is None)
            raw: dict[int, dict[str, np.ndarray]] = {}
            try:
                vectors = self._vectors(fresh, batch_size, raw if explain else None)
            except Exception:  # noqa: BLE001  (each query is then embedded alone, below)
                vectors = None
            if vectors is not None:
                for j, it in enumerate(fresh):
                    it.vector, it.raw = vectors[j], raw.get(j)
        groups: dict[str, list[tuple[int, _Item]]] = {}
        for i, it in good:
            options = {k: v for k, v in requests[i][1].items() if k != "label"}
            groups.setdefault(repr(sorted(options.items())), []).append((i, it))
        for members in groups.values():
            options = {k: v for k, v in requests[members[0][0]][1].items() if k != "label"}
            try:
                results, _ = self.query_many([it for _, it in members], **options, batch_size=batch_size)
                for (i, _), r in zip(members, results, strict=True):
                    out[i] = r
            except Exception:  # noqa: BLE001  (one at a time: each gets its own answer or error)
                for i, it in members:
                    try:
                        out[i] = self.query_many([it], **options, batch_size=batch_size)[0][0]
                    except Exception as exc:  # noqa: BLE001
                        out[i] = exc
        return out  # type: ignore[return-value]

    def _read(self, item: QueryItem, label: str | None) -> _Item | tuple[str, BadImageError]:
        """Find the item in the index by content hash, else decode it; or (label, reason).
        An item :meth:`prepare` read already is taken as it is."""
        if isinstance(item, _Item):
            return item
        if isinstance(item, int | np.integer) and not isinstance(item, bool):
            row = self._row(int(item))
            return _Item(label or f"id:{row}", row, self.index.rows([row])["content_hash"].iloc[0])
        if isinstance(item, Image.Image):
            name = label or "image"
            try:
                return _Item(name, size=item.size, pixels=images.prepare(item, self.index.preprocess))
            except BadImageError as exc:
                return name, exc
        name = label or (str(item) if isinstance(item, str | Path) else "upload")
        try:
            data = item if isinstance(item, bytes) else images.read_bytes(item)
            digest = images.hash_bytes(data) if data else None
            row = self.index.lookup_hashes([digest])[0]
            if row is not None:
                return _Item(name, row, digest, images.header_size(data))
            return _Item(name, None, digest, images.header_size(data), images.prepare(data, self.index.preprocess))
        except BadImageError as exc:
            return name, exc

    def _vectors(self, items: Sequence[_Item], batch_size: int,
                 keep_raw: dict[int, dict[str, np.ndarray]] | None = None) -> np.ndarray:
        """Stored vectors for covers of the index, freshly embedded ones for the rest (their
        raw part vectors put in ``keep_raw`` by item position, when given)."""
        out = np.zeros((len(items), self.index.manifest["dim"]), np.float32)
        stored = [i for i, it in enumerate(items) if it.row is not None]
        if stored:
            out[stored] = np.asarray(self.index.vectors[[items[i].row for i in stored]], np.float32)
        done = [i for i, it in enumerate(items) if it.row is None and it.vector is not None]
        for i in done:  # embedded by query_batch, with every other query of its batch
            out[i] = items[i].vector
            if keep_raw is not None and items[i].raw is not None:
                keep_raw[i] = items[i].raw
        fresh = [i for i, it in enumerate(items) if it.row is None and it.vector is None]
        for a in range(0, len(fresh), batch_size):
            chunk = fresh[a : a + batch_size]
            raw = self.featurizer(np.stack([items[i].pixels for i in chunk]))
            out[chunk] = self.compress(raw)
            if keep_raw is not None:
                keep_raw.update({i: {p: x[j : j + 1] for p, x in raw.items()} for j, i in enumerate(chunk)})
        return out

    def raw_features(self, row: int) -> dict[str, np.ndarray] | None:
        """The stored raw part vectors of one cover of the index (None: the index keeps none)."""
        if self._raw is None:
            from stylegen.index.build import RawFeatures

            self._raw = RawFeatures(self.index)
        return self._raw.rows([row])

    # ---- embedding -------------------------------------------------------------------
    @property
    def featurizer(self) -> Any:
        if self._featurizer is None:
            from stylegen.featurize.runtime import load_featurizer

            self._featurizer = load_featurizer(self.index.query_config(self.weights), self.device,
                                               self.index.manifest.get("precision", "auto"), graph=self.graph)
            if self._featurizer.backbone.weights_id != self.index.manifest["backbone"]["weights_id"]:
                raise IndexMismatchError("the installed backbone weights differ from the index's")
        return self._featurizer

    def compress(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """Index vectors of raw part vectors: the index's frozen compressor, then its part weights."""
        from stylegen.index.compress import combine

        return combine(self.index.compressor.transform(raw), self.index.config.features.weights)[0]

    # ---- heads -----------------------------------------------------------------------
    @property
    def head_config(self) -> dict[str, Any]:
        if self._head_config is None:
            from stylegen.heads.io import read_head_set

            cfg = read_head_set(self.heads_root or self.index.root)
            if cfg["feature_id"] != self.index.feature_id:
                raise IndexMismatchError("the heads were trained before the index changed; run `stylegen train` again")
            self._head_config = cfg
        return self._head_config

    def head(self, name: str) -> Any:
        """One trained head, loaded from disk the first time it is asked for."""
        if name not in self._heads:
            from stylegen.heads.io import head_file, load_predictor

            path = head_file(self.head_config["dir"], name) if name in self.head_config["heads"] else None
            if path is None and (Path(self.head_config["dir"]) / f"{name}.joblib").is_file():
                raise ModelNotFoundError(f"head {name!r} was saved by an older stylegen as a pickle, which "
                                         "stylegen never opens (it could run code); run `stylegen train` again")
            if path is None:
                raise ModelNotFoundError(f"head {name!r} is not trained in {self.index.root} "
                                         f"(trained: {', '.join(self.head_config['heads'])})")
            self._heads[name] = load_predictor(path, expect_feature_id=self.index.feature_id)
        return self._heads[name]

    @property
    def taxonomy(self) -> Taxonomy | None:
        tree = self.head_config.get("taxonomy")
        if not tree:
            return None
        if self._taxonomy is None or self._taxonomy[0] is not tree:  # built once per head set, not per answer
            self._taxonomy = (tree, Taxonomy.from_tree(tree))
        return self._taxonomy[1]

    def head_name(self, method: str | None) -> tuple[str, str]:
        """(method, head file name) for a classify method (None: the validated default)."""
        method = method or self.head_config["default_method"]
        if method not in METHODS:
            raise StylegenError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        return method, {"head": self.head_config["default_head"], "knn": "knn", "ensemble": "ensemble"}[method]

    def min_confidence(self, method: str | None = None) -> float | None:
        """The smallest top probability at which the head ``method`` answers with was right at
        least 80% of the time out of fold, as ``stylegen train`` recorded it (None: not recorded)."""
        name = self.head_name(method)[1]
        found = ((self.head_config.get("calibration") or {}).get(name) or {}).get("min_confidence")
        return None if found is None else float(found)

    def predict_proba(self, vectors: np.ndarray, method: str | None = None, *,
                      rows: Sequence[int | None] | None = None,
                      tabular: np.ndarray | None = None) -> tuple[np.ndarray, list[str], str]:
        """Genre probabilities (n, classes), the class names and the method used.

        ``rows[i]`` is the index row of query ``i`` when it is a cover of the index: it is
        then left out of its own vote. Every head takes the same arguments (``exclude``:
        positions among its fitted rows; ``tabular``: per-item numbers, used by hybrid heads).
        """
        method, name = self.head_name(method)
        head = self.head(name)
        if getattr(head, "mode", "image") != "image" and tabular is None:  # a hybrid or tabular head
            columns = self.head_config.get("tabular_columns") or []
            raise DataError(f"this head needs tabular columns: {', '.join(columns)}")
        proba = head.predict_proba(vectors, exclude=self.exclude_rows(rows, len(vectors)), tabular=tabular)
        return np.asarray(proba, np.float64), [str(c) for c in head.classes_], method

    def exclude_rows(self, rows: Sequence[int | None] | None, n: int) -> np.ndarray:
        """Position among the heads' fitted rows of each query that is one of them, else -1."""
        if rows is None:
            return np.full(n, -1)
        pos = {r: i for i, r in enumerate(self.head_config["train_rows"])}
        return np.array([-1 if r is None else pos.get(int(r), -1) for r in rows], dtype=np.int64)

    def describe(self, proba: np.ndarray, classes: list[str], top: int = 3) -> dict[str, Any]:
        """Top classes with probabilities and root-first paths (every class when ``top`` is at
        least their number), plus ``levels``: ``top``, the taxonomy's top-level genres, and for
        a multi-label head with classes below them (Discogs styles), ``style``: the best of those.

        Top-level genres come from :meth:`~stylegen.sources.labels.Taxonomy.roll_up`: sums for
        single-label heads, noisy-OR for multi-label ones, except that a multi-label head's
        genre that is itself a class (the hierarchy head) is read from its own column."""
        tax = self.taxonomy
        known = [tax is not None and c in tax for c in classes]

        def entry(i: int) -> dict[str, Any]:
            return {"genre": classes[i], "probability": round(float(proba[i]), 6),
                    "path": tax.path(classes[i]) if known[i] else [classes[i]]}

        out: dict[str, Any] = {"genres": [entry(i) for i in np.argsort(-proba, kind="stable")[:top]]}
        if tax is None:
            return out
        multi = self.head_config.get("labels") == "multi"
        top_p, top_c = tax.roll_up(proba[None], classes, multi_label=multi)
        top_p = top_p[0]
        idx = np.argsort(-top_p, kind="stable")[:top]
        out["levels"] = {"top": [{"genre": top_c[i], "probability": round(float(top_p[i]), 6)} for i in idx]}
        below = np.array([multi and k and tax.level_of(c) > 0 for k, c in zip(known, classes, strict=True)])
        if below.any():
            rows = np.flatnonzero(below)
            out["levels"]["style"] = [entry(i) for i in rows[np.argsort(-proba[rows], kind="stable")[:top]]]
        return out

    def tabular_for(self, keys: Sequence[str], table: str | Path | pd.DataFrame,
                    columns: Sequence[str] | None = None, key: str = "image") -> np.ndarray:
        """The numbers the heads were trained on, for items ``keys``, read **by column name**.

        ``columns`` (optional) must name the same set the heads were trained on; the table's
        own column order never matters.
        """
        from stylegen.sources.tabular import expand_columns, load_tabular

        trained = self.head_config.get("tabular_columns")
        if not trained:
            raise DataError("these heads were trained without tabular columns")
        if columns:
            asked = expand_columns(columns, trained, "the trained columns")
            if sorted(asked) != sorted(trained):
                raise DataError(f"the heads were trained on columns {', '.join(trained)}; got {', '.join(asked)}")
        values, _ = load_tabular(pd.DataFrame({key: list(keys)}), columns=list(trained), table=table, key=key)
        return values

    # ---- similar covers --------------------------------------------------------------
    def neighbours(self, vectors: np.ndarray, k: int = 12, by: str = "both",
                   rows: Sequence[int | None] | None = None) -> list[list[dict[str, Any]]]:
        """The ``k`` nearest covers of each vector; a cover of the index finds itself first,
        marked ``is_query`` (decided by content hash, never by similarity)."""
        sims, ids = self.index.search(vectors, k, by=by)
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        meta = self.index.rows(wanted)
        by_row = dict(zip(wanted, meta.to_dict("records"), strict=True))  # (iloc per row was ~1 ms each)
        out = []
        for q, (s_row, i_row) in enumerate(zip(sims, ids, strict=True)):
            own = rows[q] if rows is not None else None
            out.append([_cover(int(i), float(s), by_row[int(i)], own) for s, i in zip(s_row, i_row, strict=True) if i >= 0])
        return out

    def _row(self, cover_id: int) -> int:
        if not 0 <= int(cover_id) < len(self.index):
            raise UnknownCoverError(f"unknown cover id {cover_id} (the index has ids 0 to {len(self.index) - 1})")
        return int(cover_id)

    def cover_path(self, cover_id: int) -> Path:
        return Path(self.index.rows([self._row(cover_id)])["path"].iloc[0])

    def info(self) -> dict[str, Any]:
        m = self.index.manifest
        try:
            genres = list(self.head_config["classes"])
        except StylegenError:
            genres = []
        return {"count": len(self.index), "backbone": m["backbone"]["name"], "parts": m["parts"],
                "dims": m["dims"], "genres": [str(g) for g in genres]}


def _cover(row: int, sim: float, meta: dict[str, Any], own: int | None) -> dict[str, Any]:
    genres = [g for g in str(meta.get("genres") or "").split("|") if g and g != "None"]
    return {"id": row, "similarity": round(sim, 6), "genres": genres,
            "artist": _text(meta.get("artist")), "album": _text(meta.get("album")),
            "image": str(meta.get("image")), "is_query": own is not None and row == own}


def _text(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) or v == "" else str(v)
