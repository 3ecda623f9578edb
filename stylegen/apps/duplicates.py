"""Near-duplicate covers: rescans, re-encodes, re-releases with a sticker or a border.

Pairs are found with FAISS, never with an n x n matrix: an exact range search
(every pair with cosine similarity >= ``threshold``) on collections below
``EXACT_LIMIT`` (100k) covers, a k-NN search filtered by the threshold above it (the
graph index; each cover then links to at most ``k`` others, and groups still form
through chains). Pairs are grouped into connected components (union-find).

``against``: pairs between two collections only (a cover of one and a cover of the
other). Two indexes built separately have separately fitted compressions, so the other
collection's stored raw part vectors are re-projected with this index's compressor;
their feature settings (backbone, taps, parts, weights) must be the same.

The default threshold, 0.70 on the combined style + content vector, is the best F1 of the
found pairs on planted copies of 200 real covers, kept apart from the 300 reported in
docs/results.md ("Near-duplicates (issue 13)"). It holds for collections of thousands of
covers: the compression is centred on the collection, so in a tiny collection (tens of
covers) similarities run lower and a lower threshold is needed.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from stylegen.errors import IndexMismatchError, StylegenError
from stylegen.index.compress import combine
from stylegen.index.store import Index, config_diff

DEFAULT_THRESHOLD = 0.70
EXACT_LIMIT = 100_000  # below this many covers, exact range search
DEFAULT_K = 20  # neighbours per cover when the collection is too large for exact range search
BATCH = 4096  # queries per FAISS call (bounds the memory of one range search)
SAME_SETTINGS = ("backbone", "features")  # what two collections must share to be compared


@dataclass(frozen=True)
class Duplicates:
    """Pairs and groups of near-duplicate covers.

    ``pairs``: columns ``a``, ``b`` (row ids), ``similarity``; ``b`` is a row of the other
    collection with ``against``, else ``a < b``. ``groups``: one array of node ids per
    group, largest first; a node is a row of this index, or ``len(index) + row`` of the
    other collection.
    """

    pairs: pd.DataFrame
    groups: list[np.ndarray]
    n_self: int
    threshold: float
    by: str
    method: str  # "range" or "knn"

    def summary(self) -> str:
        covers = sum(len(g) for g in self.groups)
        return (f"{len(self.groups)} groups of near-duplicates ({covers} covers, {len(self.pairs)} pairs) "
                f"at similarity >= {self.threshold:g} by {self.by} ({self.method} search)")


def _flat(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _batches(n: int, size: int = BATCH) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def range_pairs(queries: np.ndarray, base: faiss.Index, threshold: float) -> tuple[np.ndarray, ...]:
    """Every (query row, base row, similarity) with inner product >= ``threshold``."""
    qi, bi, sims = [], [], []
    for a, b in _batches(len(queries)):
        lims, dist, ids = base.range_search(np.ascontiguousarray(queries[a:b], dtype=np.float32), float(threshold))
        counts = np.diff(lims.astype(np.int64))
        qi.append(np.repeat(np.arange(a, b), counts))
        bi.append(ids)
        sims.append(dist)
    return _cat(qi, np.int64), _cat(bi, np.int64), _cat(sims, np.float32)


def knn_pairs(queries: np.ndarray, base: faiss.Index, threshold: float, k: int) -> tuple[np.ndarray, ...]:
    """The ``k`` nearest base rows of each query, kept when similarity >= ``threshold``."""
    qi, bi, sims = [], [], []
    k = min(k, base.ntotal)
    for a, b in _batches(len(queries)):
        s, i = base.search(np.ascontiguousarray(queries[a:b], dtype=np.float32), k)
        keep = (i >= 0) & (s >= threshold)
        qi.append(np.broadcast_to(np.arange(a, b)[:, None], i.shape)[keep])
        bi.append(i[keep])
        sims.append(s[keep])
    return _cat(qi, np.int64), _cat(bi, np.int64), _cat(sims, np.float32)


def _cat(chunks: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)


def group_pairs(n: int, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Connected components (size >= 2) of the graph on ``n`` nodes with edges ``a``-``b``."""
    if len(a) == 0:
        return []
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.argsort(label, kind="stable")
    bounds = np.flatnonzero(np.diff(label[order])) + 1
    comps = [c for c in np.split(order, bounds) if len(c) > 1]
    return sorted(comps, key=lambda c: (-len(c), int(c[0])))


def comparable_vectors(index: Index, other: Index, by: str) -> np.ndarray:
    """``other``'s vectors in ``index``'s vector space (re-projected from its raw parts)."""
    diffs = [d for key in SAME_SETTINGS
             for d in config_diff(index.manifest["config"].get(key, {}), other.manifest["config"].get(key, {}), f"{key}.")]
    if diffs:
        raise IndexMismatchError(f"{other.root} was embedded with other settings than {index.root}: {diffs[0]}")
    if other.feature_id == index.feature_id:
        return index.part_vectors(other.vectors, by)
    from stylegen.index.build import raw_batches

    batches = raw_batches(other)
    if batches is None:
        raise StylegenError(f"{other.root} keeps no raw features (random projection), so it cannot be "
                            f"compared with {index.root}; embed both with --compression pca")
    vectors = [combine(index.compressor.transform(raw), index.config.features.weights)[0] for raw in batches]
    return index.part_vectors(np.concatenate(vectors), by)


def find_duplicates(index: Index, threshold: float = DEFAULT_THRESHOLD, by: str = "both",
                    against: Index | None = None, k: int = DEFAULT_K) -> Duplicates:
    """Near-duplicate pairs (similarity >= ``threshold`` on the ``by`` part) and their groups."""
    if not -1.0 <= threshold <= 1.0:
        raise StylegenError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    mine = index.part_vectors(index.vectors, by)
    queries = mine if against is None else comparable_vectors(index, against, by)
    exact = len(mine) < EXACT_LIMIT
    if exact:
        base = _flat(mine)
    elif by == "both":
        base = index.faiss_index
    else:  # a large collection searched by one part: a graph index over that part
        base = faiss.IndexHNSWFlat(mine.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        base.add(mine)
    qi, bi, sims = range_pairs(queries, base, threshold) if exact else knn_pairs(queries, base, threshold, k)
    n_other = 0 if against is None else len(queries)
    if against is None:  # each unordered pair once, no self-pairs
        keep = qi < bi
        a, b, sims = qi[keep], bi[keep], sims[keep]
        a, b = np.minimum(a, b), np.maximum(a, b)
        nodes_a, nodes_b = a, b
    else:  # query rows are the other collection's: a = this index's row, b = the other's
        a, b = bi, qi
        nodes_a, nodes_b = a, len(mine) + b
    pairs = pd.DataFrame({"a": a, "b": b, "similarity": sims}).drop_duplicates(["a", "b"])
    pairs = pairs.sort_values(["similarity", "a", "b"], ascending=[False, True, True], ignore_index=True)
    groups = group_pairs(len(mine) + n_other, nodes_a, nodes_b)
    return Duplicates(pairs, groups, len(mine), float(threshold), by, "range" if exact else "knn")


def group_table(dups: Duplicates, index: Index, other: Index | None = None) -> pd.DataFrame:
    """One row per cover of each group: group, collection, id, similarity to its closest
    member, image, and the metadata columns people look at."""
    best: dict[int, float] = {}
    offset = dups.n_self if other is not None else 0
    for a, b, s in dups.pairs[["a", "b", "similarity"]].itertuples(index=False):
        for node in (int(a), int(b) + offset):
            best[node] = max(best.get(node, -1.0), float(s))
    rows = []
    for g, members in enumerate(dups.groups, 1):
        for node in members:
            node = int(node)
            mine = node < dups.n_self
            src = index if mine else other
            row = node if mine else node - dups.n_self
            meta = src.metadata.iloc[row]
            rows.append({"group": g, "collection": str(src.root), "id": row,
                         "similarity": round(best.get(node, float("nan")), 4),
                         **{c: meta.get(c) for c in ("image", "path", "genres", "artist", "album") if c in meta}})
    return pd.DataFrame(rows, columns=None if rows else ["group", "collection", "id", "similarity", "image"])


def groups_html(table: pd.DataFrame, dups: Duplicates, max_groups: int = 300) -> str:
    """A self-contained page of the groups (thumbnails inlined; the largest ``max_groups``)."""
    from stylegen.apps.render import thumbnail_data_uri

    sections = []
    for g, members in table.groupby("group", sort=True):
        if g > max_groups:
            break
        cards = []
        for m in members.itertuples(index=False):
            m = m._asdict()
            caption = "<br>".join(html.escape(str(x)) for x in (
                f"#{m['id']} · {m['similarity']:.3f}", Path(str(m.get("image", ""))).name,
                " – ".join(str(x) for x in (m.get("artist"), m.get("album")) if _present(x)) or "",
                Path(m["collection"]).name))
            cards.append(f"<figure><img src='{thumbnail_data_uri(str(m.get('path') or m.get('image')), 160)}' "
                         f"alt=''><figcaption>{caption}</figcaption></figure>")
        sections.append(f"<section><h2>Group {g} · {len(members)} covers</h2><div class='row'>{''.join(cards)}</div></section>")
    more = (f"<p>{len(dups.groups) - max_groups} more groups are in the CSV.</p>"
            if len(dups.groups) > max_groups else "")
    style = ("body{font-family:system-ui,sans-serif;background:#111;color:#eee;margin:2em}"
             ".row{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;background:#1d1d1d;padding:6px;"
             "border-radius:6px;width:160px}img{width:160px;height:160px;object-fit:contain}"
             "figcaption{font-size:12px;line-height:1.35;word-break:break-all}h2{font-size:16px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Near-duplicate covers</title>"
            f"<style>{style}</style></head><body><h1>Near-duplicate covers</h1>"
            f"<p>{html.escape(dups.summary())}</p>{''.join(sections)}{more}</body></html>")


def _present(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and np.isnan(x)) and str(x) != ""
