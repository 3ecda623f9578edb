"""Genre labels: parsing catalogue cells, frequency filtering, a genre taxonomy, target encoding.

Cells follow ``covers.csv``: ``genre`` holds one genre (empty when a cover carries several) and
``genres`` all of them, ``|``-separated. Names are compared lower-cased and stripped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

from stylegen.errors import DataError


def split_genres(value: Any) -> list[str]:
    """``"Rock| pop|rock"`` -> ``["rock", "pop"]``; NaN, None and ``""`` -> ``[]``."""
    if isinstance(value, (list, tuple, set, np.ndarray)):
        parts = [str(v) for v in value]
    elif value is None or pd.isna(value):
        return []
    elif isinstance(value, str):
        parts = value.split("|")
    else:
        raise DataError(f"genre cell must be text, got {type(value).__name__}: {value!r}")
    names = (p.strip().lower() for p in parts)
    return list(dict.fromkeys(n for n in names if n))


def _columns(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    if "genre" not in df.columns and "genres" not in df.columns:
        raise DataError("labels need a 'genre' or a 'genres' column")
    empty = pd.Series([None] * len(df), index=df.index, dtype=object)
    return df.get("genre", empty), df.get("genres", empty)


def single_labels(df: pd.DataFrame) -> pd.Series:
    """One genre per row: ``genre``, else the only entry of ``genres``; None when 0 or >1."""
    genre, genres = _columns(df)
    out = []
    for one, many in zip(genre, genres):
        labels = split_genres(one) or split_genres(many)
        out.append(labels[0] if len(labels) == 1 else None)
    return pd.Series(out, index=df.index, dtype=object, name="genre")


def multi_labels(df: pd.DataFrame) -> list[list[str]]:
    """All genres per row, from ``genres`` and falling back to ``genre``."""
    genre, genres = _columns(df)
    return [split_genres(many) or split_genres(one) for one, many in zip(genre, genres)]


def frequent_genres(genre_lists: Sequence[Sequence[str]], min_fraction: float = 0.05) -> list[str]:
    """Genres carried by at least ``min_fraction`` of the items, most frequent first."""
    if not 0.0 <= min_fraction <= 1.0:
        raise DataError(f"min_fraction must lie in [0, 1], got {min_fraction}")
    counts = Counter(g for genres in genre_lists for g in dict.fromkeys(genres))
    need = min_fraction * len(genre_lists)
    return [g for g, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= need]


def filter_genres(genre_lists: Sequence[Sequence[str]], keep: Iterable[str]) -> list[list[str]]:
    """Drop every genre not in ``keep``; an item may end up with an empty list."""
    keep = set(keep)
    return [[g for g in genres if g in keep] for genres in genre_lists]


def _key(name: str) -> str:
    """Spelling-insensitive key: "Hip Hop", "hip-hop" and "hiphop" meet, as do "&" and "and"."""
    return re.sub(r"[^0-9a-z]", "", name.lower().replace("&", "and"))


@dataclass(frozen=True, eq=False)
class Taxonomy:
    """A forest of genres; build with :meth:`from_tree`, :meth:`load` or :meth:`default`."""

    parents: Mapping[str, str | None]
    children: Mapping[str, tuple[str, ...]] = field(repr=False)
    keys: Mapping[str, str] = field(repr=False)

    @classmethod
    def from_tree(cls, tree: Mapping[str, Sequence[str] | None]) -> Taxonomy:
        """``{parent: [child, ...]}``; a child may itself be a key, giving deeper levels."""
        if not isinstance(tree, Mapping):
            raise DataError("taxonomy must map each parent genre to a list of children")
        parents: dict[str, str | None] = {}
        children: dict[str, list[str]] = {}
        for raw_parent, raw_kids in tree.items():
            parent = _node_name(raw_parent)
            if raw_kids is not None and not isinstance(raw_kids, list):
                raise DataError(f"children of {parent!r} must be a list of genre names")
            parents.setdefault(parent, None)
            kids = children.setdefault(parent, [])
            for child in map(_node_name, raw_kids or []):
                if parents.get(child) not in (None, parent):
                    twice = f"{parents[child]!r}, {parent!r}"
                    raise DataError(f"genre {child!r} has two parents: {twice}")
                if child not in kids:
                    kids.append(child)
                parents[child] = parent
        for name in parents:  # walk up from every node: meeting a node twice is a cycle
            seen = [name]
            while (up := parents[seen[-1]]) is not None:
                if up in seen:
                    raise DataError("taxonomy has a cycle: " + " -> ".join([*seen, up]))
                seen.append(up)
        keys: dict[str, str] = {}
        for name in parents:
            if keys.setdefault(_key(name), name) != name:
                raise DataError(f"taxonomy spells one genre twice: {keys[_key(name)]!r}, {name!r}")
        return cls(parents, {k: tuple(v) for k, v in children.items()}, keys)

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        """Read a YAML or JSON ``{parent: [child, ...]}`` file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            tree = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except OSError as exc:
            raise DataError(f"cannot read taxonomy {path}: {exc.strerror or exc}") from exc
        except (ValueError, yaml.YAMLError) as exc:
            raise DataError(f"taxonomy {path} is not valid JSON/YAML: {exc}") from exc
        return cls.from_tree(tree)

    @classmethod
    def default(cls) -> Taxonomy:
        """The packaged ``stylegen/data/taxonomy.yaml``."""
        text = resources.files("stylegen").joinpath("data/taxonomy.yaml").read_text("utf-8")
        return cls.from_tree(yaml.safe_load(text))

    @classmethod
    def discogs(cls) -> Taxonomy:
        """The packaged Discogs list (``stylegen/data/taxonomy_discogs.json``): 15 genres and
        400 styles named ``Genre---Style``, since Discogs files some style names (Disco, Dub,
        Electro, Ska, ...) under two genres."""
        text = resources.files("stylegen").joinpath("data/taxonomy_discogs.json").read_text("utf-8")
        return cls.from_tree(json.loads(text))

    @classmethod
    def named(cls, spec: str | Path | None) -> Taxonomy:
        """``None`` or ``"default"``: :meth:`default`; ``"discogs"``: :meth:`discogs`; else a file."""
        if spec is None or str(spec) == "default":
            return cls.default()
        if str(spec) == "discogs":
            return cls.discogs()
        return cls.load(spec)

    def __contains__(self, genre: object) -> bool:
        return genre in self.parents

    def find(self, genre: str, match_suffix: bool = False) -> str | None:
        """The taxonomy's spelling of ``genre`` ("Hip Hop" -> "hip-hop"), or None when unknown.

        With ``match_suffix`` an unknown name falls back to its longest known word suffix,
        as in Spotify-style names: "atl hip hop" -> "hip-hop", "album rock" -> "rock".
        """
        words = genre.lower().split()
        for start in range(len(words) if match_suffix else 1):
            if (name := self.keys.get(_key(" ".join(words[start:])))) is not None:
                return name
        return None

    def _known(self, genre: str) -> str:
        if genre not in self.parents:
            raise DataError(f"genre {genre!r} is not in the taxonomy")
        return genre

    def parent(self, genre: str) -> str | None:
        return self.parents[self._known(genre)]

    def path(self, genre: str) -> list[str]:
        """Root first: ``path("thrash metal") == ["metal", "thrash metal"]``."""
        out = [self._known(genre)]
        while (up := self.parents[out[-1]]) is not None:
            out.append(up)
        return out[::-1]

    def level_of(self, genre: str) -> int:
        """0 for a root, 1 for its children, and so on."""
        return len(self.path(genre)) - 1

    def ancestor(self, genre: str, level: int = 0) -> str:
        """The ancestor at ``level``, or ``genre`` itself when it sits at or above it."""
        path = self.path(genre)
        return path[min(level, len(path) - 1)]

    @property
    def roots(self) -> tuple[str, ...]:
        return tuple(g for g, p in self.parents.items() if p is None)

    @property
    def leaves(self) -> tuple[str, ...]:
        return tuple(g for g in self.parents if not self.children.get(g))

    def roll_up(
        self, proba: np.ndarray, classes: Sequence[str], level: int = 0, multi_label: bool = False
    ) -> tuple[np.ndarray, list[str]]:
        """Class probabilities carried up to their ancestors at ``level`` (sorted by name).

        Single-label (softmax) probabilities are exclusive events, so a parent gets the **sum**
        of its descendants' and every level is again a distribution. Multi-label (sigmoid)
        probabilities are separate yes/no answers that may each be near 1; summing them can
        exceed 1. A parent then gets the **noisy-OR** ``1 - prod(1 - p_child)``: the
        probability that at least one child applies if the children are independent. It stays
        in [0, 1], is never below its most probable child, and equals the child for a single
        child, unless the ancestor is itself a class: then its own column is its probability
        (a head trained on closed label sets, such as the hierarchy head, answers for the
        genre directly, and a noisy-OR of the genre and its styles would overstate it). A
        class at or above ``level`` keeps its own column; an unknown class raises DataError.
        """
        proba = np.asarray(proba, dtype=np.float64)
        if proba.ndim != 2 or proba.shape[1] != len(classes):
            raise DataError(f"proba has shape {proba.shape}, expected (n, {len(classes)})")
        targets = [self.ancestor(c, level) for c in classes]
        groups = sorted(set(targets))
        member = np.zeros((len(classes), len(groups)))
        member[np.arange(len(classes)), [groups.index(t) for t in targets]] = 1.0
        if not multi_label:
            return proba @ member, groups
        log_none = np.log1p(-np.clip(proba, 0.0, 1.0 - 1e-12)) @ member
        out = -np.expm1(log_none)
        own = {str(c): j for j, c in enumerate(classes)}
        for g, name in enumerate(groups):
            if name in own:
                out[:, g] = proba[:, own[name]]
        return out, groups


def _node_name(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise DataError(f"taxonomy genre names must be non-empty text, got {raw!r}")
    return raw.strip().lower()


def map_to_taxonomy(
    genre_lists: Sequence[Sequence[str]],
    taxonomy: Taxonomy,
    level: int | Literal["parent"] = 0,
    keep_unknown: bool = False,
    match_suffix: bool = False,
) -> list[list[str]]:
    """Replace each genre by its ancestor at ``level`` (0: top level; "parent": one step up).

    Unknown genres are dropped, or kept unchanged with ``keep_unknown``; duplicates that
    the mapping creates are merged, first occurrence first.
    """
    if level != "parent" and (not isinstance(level, int) or level < 0):
        raise DataError(f"level must be a depth (0 = top) or 'parent', got {level!r}")
    out = []
    for genres in genre_lists:
        mapped = []
        for genre in genres:
            name = taxonomy.find(genre, match_suffix)
            if name is None:
                mapped += [genre] if keep_unknown else []
            elif level == "parent":
                mapped.append(taxonomy.parent(name) or name)
            else:
                mapped.append(taxonomy.ancestor(name, level))
        out.append(list(dict.fromkeys(mapped)))
    return out


STYLE_SEP = "---"  # Discogs styles are written ``Genre---Style``


def column_labels(df: pd.DataFrame, columns: str | Sequence[str]) -> list[list[str]]:
    """Per row, the union of the ``|``-separated labels in ``columns`` (e.g. ``genres`` and
    ``styles``), first occurrence first."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    if missing := [c for c in columns if c not in df.columns]:
        raise DataError(f"no label column {missing[0]!r}; columns: {', '.join(map(str, df.columns))}")
    cells = [[split_genres(v) for v in df[c]] for c in columns]
    return [list(dict.fromkeys(g for parts in row for g in parts)) for row in zip(*cells)]


def label_parent(label: str, taxonomy: Taxonomy) -> str | None:
    """The taxonomy's parent of ``label``; for a ``Genre---Style`` the taxonomy lacks, its
    genre when the taxonomy knows that; else None (a root, or unknown)."""
    if (name := taxonomy.find(label)) is not None:
        return taxonomy.parent(name)
    genre, sep, _ = label.partition(STYLE_SEP)
    return taxonomy.find(genre) if sep else None


def label_closure(
    label_lists: Sequence[Sequence[str]], taxonomy: Taxonomy, keep_unknown: bool = False
) -> list[list[str]]:
    """Each label list with every label's ancestors added (``rock---hard rock`` implies
    ``rock``), names spelled as the taxonomy spells them, ancestors first.

    A ``Genre---Style`` the taxonomy lacks still implies its genre; it is itself kept only
    with ``keep_unknown`` (as is any other unknown label, as a root)."""
    out = []
    for labels in label_lists:
        closed: list[str] = []
        for label in labels:
            name = taxonomy.find(label)
            if name is not None:
                closed += taxonomy.path(name)
                continue
            if (parent := label_parent(label, taxonomy)) is not None:
                closed += taxonomy.path(parent)
            if keep_unknown:
                closed.append(label)
        out.append(list(dict.fromkeys(closed)))
    return out


def encode_targets(
    y: Any, multi_label: bool, n_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Labels -> (targets, classes_): class indices (n,), or a 0/1 matrix (n, C) if multi-label."""
    if multi_label:
        rows = list(y)
        if any(isinstance(r, str) or not isinstance(r, Iterable) for r in rows):
            raise DataError("multi-label targets must be a list of label lists: [['pop'], ...]")
        from sklearn.preprocessing import (
            MultiLabelBinarizer,  # here: the query path needs no sklearn
        )

        binarizer = MultiLabelBinarizer().fit(rows)
        targets, classes = binarizer.transform(rows).astype(np.float32), binarizer.classes_
    else:
        y = np.asarray(y, dtype=object)
        if y.ndim != 1 or any(isinstance(v, (list, tuple, set)) for v in y):
            raise DataError("single-label targets must be flat; use multi_label=True for lists")
        if (missing := int(pd.isna(y).sum())) > 0:
            raise DataError(f"{missing} rows have no label; drop them before fitting")
        classes, targets = np.unique(y, return_inverse=True)
    if n_rows is not None and len(targets) != n_rows:
        raise DataError(f"got {len(targets)} labels for {n_rows} feature rows")
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes to fit, got {list(classes)}")
    return targets, np.asarray(classes, dtype=object)


def decode_predictions(
    proba: np.ndarray, classes: np.ndarray, multi_label: bool, threshold: float = 0.5
) -> np.ndarray | list[list[str]]:
    """Most probable class per row, or every label at or above ``threshold`` if multi-label."""
    if multi_label:
        return [list(classes[row >= threshold]) for row in proba]
    return classes[np.argmax(proba, axis=1)]


def grouped_split(
    targets: np.ndarray, fraction: float, random_state: int = 0, groups: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`stratified_split`, but no group (e.g. artist) on both sides when ``groups``
    is given: covers of one artist look alike, so a validation split that shares artists
    with training overrates nearest-neighbour votes. Falls back to :func:`stratified_split`
    when every row is its own group."""
    if groups is None:
        return stratified_split(targets, fraction, random_state)
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    targets = np.asarray(targets)
    groups = np.asarray([str(g) for g in groups], dtype=object)
    if len(groups) != len(targets):
        raise DataError(f"{len(groups)} group values for {len(targets)} rows")
    rows = np.arange(len(targets))
    n_groups = len(set(groups))
    if fraction <= 0 or n_groups < 2 or n_groups == len(groups):  # one row per group: plain split
        return stratified_split(targets, fraction, random_state)
    n_splits = max(2, min(round(1 / fraction), n_groups))
    if targets.ndim == 1 and np.unique(targets, return_counts=True)[1].min() >= n_splits:
        train, val = next(StratifiedGroupKFold(n_splits, shuffle=True, random_state=random_state)
                          .split(rows, targets, groups))
    else:
        train, val = next(GroupShuffleSplit(1, test_size=fraction, random_state=random_state)
                          .split(rows, groups=groups))
    return train, val


def stratified_split(
    targets: np.ndarray, fraction: float, random_state: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation), stratified on the class (or label set) where possible."""
    from sklearn.model_selection import train_test_split

    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must lie in [0, 1), got {fraction}")
    targets = np.asarray(targets)
    rows = np.arange(len(targets))
    if targets.ndim == 1:
        candidates = [targets]
    else:  # the whole label set, else the first label, else nothing
        candidates = [np.array(["|".join(map(str, r)) for r in targets.astype(int)]),
                      np.where(targets.any(1), targets.argmax(1), -1)]
    n_val = round(fraction * len(rows))
    if n_val == 0:
        return rows, rows[:0]
    for key in candidates:
        counts = np.unique(key, return_counts=True)[1]
        if counts.min() >= 2 and len(counts) <= min(n_val, len(rows) - n_val):
            return train_test_split(rows, test_size=n_val, stratify=key, random_state=random_state)
    return train_test_split(rows, test_size=n_val, random_state=random_state)


def label_map(spec: str | Path) -> dict[str, list[str]]:
    """A label mapping ``{source label: [target labels]}``: ``"covers9-discogs"`` (the packaged
    ``stylegen/data/covers9_to_discogs.json``: the 9 genres of ../shared/data/covers as Discogs
    genres, metal as Rock + ``Rock---Heavy Metal``) or a JSON file. Keys starting with ``_``
    are comments; names are matched as :func:`split_genres` spells them (lower case)."""
    if str(spec) == "covers9-discogs":
        text = resources.files("stylegen").joinpath("data/covers9_to_discogs.json").read_text("utf-8")
    else:
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except OSError as exc:
            raise DataError(f"cannot read label map {spec}: {exc.strerror or exc}") from exc
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise DataError(f"label map {spec} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"label map {spec} must be an object {{label: [labels]}}")
    out = {}
    for key, value in raw.items():
        if str(key).startswith("_"):
            continue
        targets = [value] if isinstance(value, str) else value
        if not isinstance(targets, list) or not all(isinstance(t, str) and t.strip() for t in targets):
            raise DataError(f"label map {spec}: {key!r} must map to a label or a list of labels")
        out[key.strip().lower()] = [t.strip().lower() for t in targets]
    return out


def map_labels(label_lists: Sequence[Sequence[str]], mapping: Mapping[str, Sequence[str]],
               keep_unknown: bool = False) -> list[list[str]]:
    """Each label replaced by its targets in ``mapping`` (first occurrence first); a label the
    mapping lacks is dropped, or kept with ``keep_unknown``."""
    out = []
    for labels in label_lists:
        mapped: list[str] = []
        for label in labels:
            mapped += list(mapping.get(label, [label] if keep_unknown else []))
        out.append(list(dict.fromkeys(mapped)))
    return out


@cache
def _discogs_spelling() -> dict[str, str]:
    """Lower-case name -> the packaged Discogs taxonomy's spelling, for genres and style parts."""
    tree = json.loads(resources.files("stylegen").joinpath("data/taxonomy_discogs.json").read_text("utf-8"))
    names = [*tree, *(s.partition(STYLE_SEP)[2] for styles in tree.values() for s in styles)]
    return {n.lower(): n for n in names}


def display_label(label: str) -> str:
    """A class as a tag reads it: a ``Genre---Style`` is its style part, and a Discogs genre or
    style takes Discogs' spelling (``rock---hard rock`` -> ``Hard Rock``, ``hip hop`` -> ``Hip
    Hop``); any other label is left as it is."""
    genre, sep, style = label.partition(STYLE_SEP)
    name = style if sep else genre
    return _discogs_spelling().get(name.strip().lower(), name)
