"""Near-duplicate covers: rescans, re-encodes, re-releases with a sticker or a border, photos.

Two stages (the default, ``verify=True``): FAISS proposes candidates tuned for recall (each
cover's ``candidates`` nearest covers by style + content, by content and by style), then each candidate pair is verified with local features
matched under a RANSAC homography (:mod:`stylegen.query.verify`): a pair is a copy when
enough keypoints agree (``inliers``) over a real part of both images. Verified pairs carry
the transform (scale, rotation, flip, crop, perspective). Keypoints are computed for the
covers that are candidates, once per run (:class:`stylegen.query.verify.KeypointCache`).

``verify=False`` is the vector-only search of issue 13, described below: closeness of the
vectors says "looks alike", which links covers of one series or one look as well as copies
(docs/results.md, "Near-duplicates").

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

DEFAULT_THRESHOLD = 0.70  # vector-only search (verify=False)
DEFAULT_CANDIDATES = 10  # with verification: nearest covers per cover (by each of CANDIDATE_BY)
# each part ranks other copies higher: content framed/bordered ones, style photos of the cover
CANDIDATE_BY = ("both", "content", "style")
# with verification: no similarity floor (k bounds the work; in a small collection, where the
# compression is fitted on few covers, a framed copy can sit below any fixed floor)
CANDIDATE_FLOOR = -1.0
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
    method: str  # "range", "knn" or "verified"
    candidates: int = 0  # with verification: candidate pairs checked
    seconds: dict[str, float] | None = None  # with verification: time of each stage

    def summary(self) -> str:
        covers = sum(len(g) for g in self.groups)
        head = f"{len(self.groups)} groups of near-duplicates ({covers} covers, {len(self.pairs)} pairs)"
        if self.method == "verified":
            centre = " (with the covers' centre squares)" if (self.seconds or {}).get("centre_squares") else ""
            return (f"{head} verified by local features (>= {self.threshold:g} inliers) "
                    f"among {self.candidates} candidate pairs{centre}")
        return f"{head} at similarity >= {self.threshold:g} by {self.by} ({self.method} search)"


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
        raise StylegenError(f"{other.root} does not keep every cover's raw features (random projection, or "
                            f"its raw retention), so it cannot be compared with {index.root}; embed both with "
                            "--compression pca --raw-retention all")
    vectors = [combine(index.compressor.transform(raw), index.config.features.weights)[0] for raw in batches]
    return index.part_vectors(np.concatenate(vectors), by)


def _search_base(mine: np.ndarray, index: Index, by: str, exact: bool) -> faiss.Index:
    if exact:
        return _flat(mine)
    if by == "both":
        return index.faiss_index
    base = faiss.IndexHNSWFlat(mine.shape[1], 32, faiss.METRIC_INNER_PRODUCT)  # a large collection, one part
    base.add(np.ascontiguousarray(mine, dtype=np.float32))
    return base


def candidate_pairs(index: Index, against: Index | None = None, k: int = DEFAULT_CANDIDATES,
                    floor: float = CANDIDATE_FLOOR, by: tuple[str, ...] = CANDIDATE_BY,
                    centre: np.ndarray | None = None) -> pd.DataFrame:
    """Stage one: each cover's ``k`` nearest covers by each of ``by`` (similarity >= ``floor``).

    ``centre``: index vectors of each querying cover's centre square (``against``'s covers, else
    this index's; :func:`stylegen.query.verify.centre_vectors`); their ``k`` nearest covers of
    this index are proposed too (photos of a cover, mostly table around it).
    Columns ``a`` (this index's row), ``b`` (a row of ``against``, else of this index, ``a < b``)
    and ``similarity`` (on style + content).
    """
    exact = len(index) < EXACT_LIMIT
    both = index.part_vectors(index.vectors, "both")
    other = both if against is None else comparable_vectors(index, against, "both")
    found = []
    for part in (p for p in by if p == "both" or p in index.slices):
        mine = index.part_vectors(index.vectors, part)
        queries = mine if against is None else comparable_vectors(index, against, part)
        qi, bi, _ = knn_pairs(queries, _search_base(mine, index, part, exact), floor, k + (against is None))
        found.append(_oriented(qi, bi, against is None))
    if centre is not None:
        if len(centre) != (len(index) if against is None else len(against)):
            raise StylegenError(f"{len(centre)} centre vectors for {len(index) if against is None else len(against)} covers")
        qi, bi, _ = knn_pairs(np.ascontiguousarray(centre, np.float32), _search_base(both, index, "both", exact),
                              floor, k + (against is None))
        found.append(_oriented(qi, bi, against is None))
    ab = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
    sims = np.einsum("ij,ij->i", np.asarray(both)[ab[:, 0]], np.asarray(other)[ab[:, 1]]) if len(ab) else []
    return pd.DataFrame({"a": ab[:, 0].astype(np.int64), "b": ab[:, 1].astype(np.int64),
                         "similarity": np.asarray(sims, np.float32)})


def _oriented(qi: np.ndarray, bi: np.ndarray, same: bool) -> np.ndarray:
    """(a, b) rows of found pairs: within one index ``a < b`` without self-pairs; across two,
    ``a`` this index's row and ``b`` the other's."""
    if same:
        keep = qi != bi
        return np.stack([np.minimum(qi, bi)[keep], np.maximum(qi, bi)[keep]], 1)
    return np.stack([bi, qi], 1)


def verified_duplicates(index: Index, against: Index | None = None, k: int = DEFAULT_CANDIDATES,
                        min_inliers: int | None = None, min_coverage: float | None = None,
                        floor: float = CANDIDATE_FLOOR, keypoints_dir: str | Path | None = None,
                        keypoints: Any = None, centre: np.ndarray | None = None) -> Duplicates:
    """Candidates from FAISS (:func:`candidate_pairs`), kept when local features verify them
    (at least ``min_inliers`` inliers whose hull covers ``min_coverage`` of an image).

    ``pairs`` gets ``inliers``, ``coverage``, ``flip`` and ``transform`` (JSON) columns.
    Keypoints are computed once per cover into memory-mapped files in ``keypoints_dir``
    (None: a temporary folder, removed at the end; 66 KB per cover), or taken from
    ``keypoints`` (a :class:`stylegen.query.verify.KeypointCache` over this index's rows, then
    ``against``'s). ``centre``: centre-square vectors that propose more candidates
    (:func:`candidate_pairs`; ``stylegen duplicates --photos``).
    """
    import json
    import tempfile
    import time

    from stylegen.query import verify

    min_inliers = verify.MIN_INLIERS if min_inliers is None else int(min_inliers)
    min_coverage = verify.MIN_COVERAGE if min_coverage is None else float(min_coverage)
    if min_inliers < 4:
        raise StylegenError(f"min_inliers must be at least 4 (a homography needs 4 points), got {min_inliers}")
    if not 0.0 <= min_coverage <= 1.0:
        raise StylegenError(f"min_coverage is a share of the image in [0, 1], got {min_coverage}")
    t0 = time.perf_counter()
    cand = candidate_pairs(index, against, k, floor, centre=centre)
    t1 = time.perf_counter()
    n_self = len(index)
    paths = list(index.metadata["path"]) + ([] if against is None else list(against.metadata["path"]))
    offset = 0 if against is None else n_self
    rows = []
    with tempfile.TemporaryDirectory(prefix="stylegen-keypoints-", dir=keypoints_dir) as tmp:
        cache = keypoints if keypoints is not None else verify.KeypointCache(paths, folder=tmp)
        for a, b, sim in cand.sort_values(["a", "b"]).itertuples(index=False):
            v = cache.verify(int(a), int(b) + offset, mirror=sim >= verify.MIRROR_MIN_SIMILARITY,
                             min_inliers=min_inliers, min_coverage=min_coverage)
            if not v.copy:
                continue
            rows.append({"a": int(a), "b": int(b), "similarity": float(sim), "inliers": v.inliers,
                         "coverage": round(v.coverage, 4), "flip": bool(v.transform and v.transform["flip"]),
                         "transform": json.dumps(v.transform)})
        computed = cache.computed
        del cache  # its memory maps, before the folder goes
    t2 = time.perf_counter()
    cols = ["a", "b", "similarity", "inliers", "coverage", "flip", "transform"]
    pairs = pd.DataFrame(rows, columns=cols).sort_values(["inliers", "a", "b"], ascending=[False, True, True],
                                                         ignore_index=True)
    a, b = pairs["a"].to_numpy(np.int64), pairs["b"].to_numpy(np.int64)
    n_other = 0 if against is None else len(against)
    groups = group_pairs(n_self + n_other, a, b + offset)
    return Duplicates(pairs, groups, n_self, float(min_inliers), "both", "verified", len(cand),
                      {"candidates": round(t1 - t0, 3), "verify": round(t2 - t1, 3),
                       "keypoints_computed": computed, "centre_squares": int(centre is not None)})


def find_duplicates(index: Index, threshold: float = DEFAULT_THRESHOLD, by: str = "both",
                    against: Index | None = None, k: int = DEFAULT_K) -> Duplicates:
    """Vector-only near-duplicate pairs (similarity >= ``threshold`` on the ``by`` part) and their
    groups; :func:`verified_duplicates` verifies candidates with local features."""
    if not -1.0 <= threshold <= 1.0:
        raise StylegenError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    mine = index.part_vectors(index.vectors, by)
    queries = mine if against is None else comparable_vectors(index, against, by)
    exact = len(mine) < EXACT_LIMIT
    base = _search_base(mine, index, by, exact)
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
    member (with verification also the inliers and transform of its best verified pair),
    image, and the metadata columns people look at."""
    best: dict[int, tuple] = {}
    offset = dups.n_self if other is not None else 0
    verified = "inliers" in dups.pairs.columns
    cols = ["a", "b", "similarity", *(("inliers", "transform") if verified else ())]
    for a, b, s, *extra in dups.pairs[cols].itertuples(index=False):
        score = extra[0] if verified else s
        for node in (int(a), int(b) + offset):
            if node not in best or score > best[node][0]:
                best[node] = (score, float(s), *extra)
    rows = []
    for g, members in enumerate(dups.groups, 1):
        for node in members:
            node = int(node)
            mine = node < dups.n_self
            src = index if mine else other
            row = node if mine else node - dups.n_self
            meta = src.metadata.iloc[row]
            found = best.get(node, (None, float("nan"), None, None))
            extra = {"inliers": found[2], "transform": found[3]} if verified else {}
            rows.append({"group": g, "collection": str(src.root), "id": row, "similarity": round(found[1], 4), **extra,
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
                f"#{m['id']} · {m['similarity']:.3f}" + (f" · {m['inliers']} inliers" if _present(m.get("inliers")) else ""),
                Path(str(m.get("image", ""))).name,
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
