"""Is this candidate the same cover? Local features matched under a homography.

The vector search proposes candidates ("looks alike"); this module decides "is a copy of":
keypoints of both images (SIFT on the grey image, longer side scaled to
:data:`WORK_SIDE`) are matched (nearest neighbour, Lowe's ratio test), a homography is fitted
with RANSAC, and the pair is a copy when enough matches agree with it (``inliers``) and the
agreeing points spread over a real part of both images (``coverage``: area of their convex
hull, in the image where it is larger; a shared logo or a line of text covers little). The mirror image is tried too (its
keypoints computed from the flipped image), so a mirrored reissue is found, with
``flip: true``.

The homography is described as a transform: ``scale``, ``rotation`` (degrees), ``flip``,
``crop`` (the share of each image the other one shows) and ``perspective`` (how far the
corners move from the nearest similarity transform, as a share of the side) — a photo of a
cover on a table is a perspective warp and a crop of its frame.

Keypoints are computed on demand (~30 ms per cover on one CPU core) and kept for one run
(:class:`KeypointCache`: memory-mapped files for a whole-collection scan, a small LRU for
queries); they are not stored with the index: at 66 KB a cover (500 SIFT descriptors as
uint8) they would be ~30x the index's own vectors, and a query verifies only its few
candidates (docs/results.md, "Verified near-duplicates").
OpenCV is imported on first use (it costs ~0.2 s).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stylegen.sources import images

WORK_SIDE = 256  # longer side the keypoints are found at (covers are read up or down to it)
MAX_KEYPOINTS = 500
RATIO = 0.8  # Lowe's ratio test
RANSAC_PX = 6.0  # reprojection error (pixels at WORK_SIDE) of an inlier
# The decision, set on a 40-cover pilot of planted copies. Tuning on the bench's tune split
# (best F1, every pair of two original covers counted false) asks for 40 / 0.25, driven by
# real duplicates the data set kept; why 12 / 0.10 stays: docs/results.md, "Verified near-duplicates".
MIN_INLIERS = 12
MIN_COVERAGE = 0.10  # convex hull of the inliers, as a share of the image (the larger of the two)
# The mirror image is tried only for candidates at least this similar by style + content: the
# vectors are nearly mirror-blind (Gram matrices and pooled features), so a mirrored copy
# is always that close, and most candidates are spared a second detection.
MIRROR_MIN_SIMILARITY = 0.5
MIRROR_SKIP_INLIERS = 30  # a match this strong is not tried mirrored (independent of the thresholds)

ImageSource = str | Path | bytes | Image.Image


@dataclass(frozen=True)
class Keypoints:
    """One image's keypoints at the working size: ``xy`` (n, 2) float32, ``desc`` (n, 128)
    uint8 (SIFT's values are whole numbers 0-255) and the working size (w, h)."""

    xy: np.ndarray
    desc: np.ndarray
    size: tuple[int, int]


@dataclass(frozen=True)
class Verdict:
    """How one candidate pair held up: ``copy`` is the decision at the thresholds."""

    copy: bool
    inliers: int
    matches: int
    coverage: float  # the inliers' convex hull as a share of the image, the larger of the two
    transform: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"verified": self.copy, "inliers": self.inliers, "coverage": round(self.coverage, 3),
                "transform": self.transform}


def _cv2() -> Any:
    import cv2

    cv2.setNumThreads(1)  # pairs are many and small; threads would fight over 2 cores
    return cv2


def working_gray(source: ImageSource) -> np.ndarray:
    """The image as uint8 grey, longer side :data:`WORK_SIDE` (read by the one decoder)."""
    img = source if isinstance(source, Image.Image) else images.open_image(
        source if isinstance(source, bytes) else images.read_bytes(source), draft_size=WORK_SIDE)
    img = img.convert("L")
    w, h = img.size
    scale = WORK_SIDE / max(w, h)
    if scale != 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return np.asarray(img, np.uint8)


def detect(gray: np.ndarray) -> Keypoints:
    cv2 = _cv2()
    sift = cv2.SIFT_create(nfeatures=MAX_KEYPOINTS)
    kps, desc = sift.detectAndCompute(gray, None)
    kps, desc = kps[:MAX_KEYPOINTS], None if desc is None else desc[:MAX_KEYPOINTS]
    xy = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
    desc = np.zeros((0, 128), np.uint8) if desc is None else np.clip(desc, 0, 255).astype(np.uint8)
    return Keypoints(xy, desc, (gray.shape[1], gray.shape[0]))


def keypoints(source: ImageSource) -> Keypoints:
    """Keypoints of an image file, its bytes or a decoded image."""
    return detect(working_gray(source))


def mirror_keypoints(source: ImageSource) -> Keypoints:
    """Keypoints of the mirror image of an image."""
    return detect(np.ascontiguousarray(working_gray(source)[:, ::-1]))


def _hull_share(pts: np.ndarray, size: tuple[int, int]) -> float:
    cv2 = _cv2()
    if len(pts) < 3:
        return 0.0
    return float(cv2.contourArea(cv2.convexHull(pts.astype(np.float32)))) / float(size[0] * size[1])


def match(a: Keypoints, b: Keypoints) -> tuple[int, int, float, np.ndarray | None]:
    """(inliers, ratio-test matches, coverage, homography mapping a's points onto b's)."""
    cv2 = _cv2()
    if len(a.desc) < 2 or len(b.desc) < 2:
        return 0, 0, 0.0, None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a.desc.astype(np.float32), b.desc.astype(np.float32), k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < max(4, MIN_INLIERS // 2):
        return 0, len(good), 0.0, None
    src = a.xy[[m.queryIdx for m in good]]
    dst = b.xy[[m.trainIdx for m in good]]
    H, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, RANSAC_PX, maxIters=2000, confidence=0.995)
    if H is None or mask is None:
        return 0, len(good), 0.0, None
    keep = mask.ravel().astype(bool)
    if not _sane(H, a.size, b.size):
        return 0, len(good), 0.0, None
    coverage = max(_hull_share(src[keep], a.size), _hull_share(dst[keep], b.size))
    return int(keep.sum()), len(good), coverage, H


def _sane(H: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int]) -> bool:
    """A homography a cover could have undergone: scale within 1/6..6, orientation kept (a mirror
    is matched as such, :func:`verify_pair`), and each image's frame maps to a convex
    quadrilateral in front of the camera (no corner sent through infinity)."""
    cv2 = _cv2()
    det = float(np.linalg.det(H[:2, :2] / H[2, 2]))
    if not 1 / 36 < det < 36:
        return False
    try:
        inv = np.linalg.inv(H)
    except np.linalg.LinAlgError:
        return False
    for M, size in ((H, size_a), (inv, size_b)):
        corners = np.c_[_quad(size), np.ones(4)]
        w = corners @ M[2]
        if np.any(w * np.sign(M[2, 2]) <= 1e-6):
            return False
        mapped = (corners @ M[:2].T) / w[:, None]
        if not cv2.isContourConvex(mapped.astype(np.float32)):
            return False
    return True


def _quad(size: tuple[int, int]) -> np.ndarray:
    w, h = size
    return np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)


def describe(H: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int], flip: bool) -> dict[str, Any]:
    """The homography a -> b (b mirrored first when ``flip``) in words: ``scale`` and
    ``rotation`` of the nearest similarity transform, ``crop`` (``a_in_b``: share of a that
    falls inside b's frame; ``b_in_a``: share of b's frame that a covers) and ``perspective``
    (largest corner offset from that similarity, as a share of the side, measured on the image
    that lies inside the other: a photo of a cover is a perspective warp of the cover)."""
    cv2 = _cv2()
    H = H / H[2, 2]
    mapped = cv2.perspectiveTransform(_quad(size_a)[None], H)[0]
    inter, _ = cv2.intersectConvexConvex(mapped, _quad(size_b))
    area_a = abs(float(cv2.contourArea(mapped)))
    a_in_b = inter / area_a if area_a > 0 else 0.0
    b_in_a = inter / float(size_b[0] * size_b[1])
    if b_in_a > a_in_b:  # b lies inside a (a photo or a frame around the cover): b's corners in a
        src, dst = _quad(size_b), cv2.perspectiveTransform(_quad(size_b)[None], np.linalg.inv(H))[0]
    else:
        src, dst = _quad(size_a), mapped
    M, _ = cv2.estimateAffinePartial2D(src, dst)
    if M is None:
        return {"scale": None, "rotation": None, "flip": flip, "crop": None, "perspective": None}
    side = float(np.sqrt(max(abs(float(cv2.contourArea(dst))), 1.0)))  # the inner image's side as it appears
    perspective = float(np.abs(src @ M[:, :2].T + M[:, 2] - dst).max()) / side
    if b_in_a > a_in_b:
        M = cv2.invertAffineTransform(M)  # report a -> b throughout
    scale = float(np.hypot(M[0, 0], M[1, 0]))
    rotation = float(np.degrees(np.arctan2(M[1, 0], M[0, 0])))
    return {"scale": round(scale, 3), "rotation": round(rotation, 1), "flip": flip,
            "crop": {"a_in_b": round(min(1.0, a_in_b), 3), "b_in_a": round(min(1.0, b_in_a), 3)},
            "perspective": round(perspective, 3)}


def verify_pair(a: Keypoints, b: Keypoints, b_mirror: Keypoints | Callable[[], Keypoints | None] | None = None,
                min_inliers: int = MIN_INLIERS, min_coverage: float = MIN_COVERAGE) -> Verdict:
    """Is ``b`` a copy of ``a``? Tries ``b``, then (unless that is already a copy) ``b``'s mirror
    image (``b_mirror``: its keypoints, a function giving them, or None to skip the mirror)."""
    inl, n, cov, H = match(a, b)
    flip = False
    if b_mirror is not None and inl < MIRROR_SKIP_INLIERS:
        kb = b_mirror() if callable(b_mirror) else b_mirror
        if kb is not None:
            m = match(a, kb)
            if m[0] > inl and m[3] is not None:
                (inl, n, cov, H), flip = m, True
    transform = None if H is None else describe(H, a.size, b.size, flip)  # flip: a -> mirror of b
    return Verdict(inl >= min_inliers and cov >= min_coverage, inl, n, cov, transform)


class KeypointCache:
    """Keypoints of the covers of one run, computed once each, on first use.

    ``folder``: keep them in memory-mapped files there (fixed :data:`MAX_KEYPOINTS` slots per
    cover, uint8 descriptors: 66 KB a cover, paged by the OS), as ``stylegen duplicates`` does
    for a whole collection; None: in memory, the ``max_items`` most recently used (a query
    session: the service's similar covers). Mirror keypoints are recomputed when asked for
    and kept in memory (few candidates need them: :data:`MIRROR_MIN_SIMILARITY`).
    """

    def __init__(self, paths: Any, folder: str | Path | None = None, max_items: int = 2048,
                 reuse: bool = False) -> None:
        self.paths = paths  # row -> image path (a sequence or a mapping)
        self.max_items = max_items
        self._lru: OrderedDict[tuple[int, bool], Keypoints | None] = OrderedDict()
        self.computed = 0
        self._disk: dict[str, np.ndarray] | None = None
        if folder is not None:
            n, folder = len(paths), Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            shapes = {"desc": ((n, MAX_KEYPOINTS, 128), np.uint8), "xy": ((n, MAX_KEYPOINTS, 2), np.float16),
                      "info": ((n, 3), np.int32)}  # info: keypoint count (-1: not yet, -2: bad image), w, h
            if reuse and all((folder / f"{k}.npy").is_file() for k in shapes):  # same paths, same rows
                self._disk = {k: np.load(folder / f"{k}.npy", mmap_mode="r+") for k in shapes}
                if any(self._disk[k].shape != shape for k, (shape, _) in shapes.items()):
                    raise ValueError(f"keypoint files in {folder} are for another collection")
            else:
                self._disk = {k: np.lib.format.open_memmap(folder / f"{k}.npy", "w+", dtype=t, shape=shape)
                              for k, (shape, t) in shapes.items()}
                self._disk["info"][:, 0] = -1

    def _compute(self, row: int) -> Keypoints | None:
        self.computed += 1
        try:
            return keypoints(str(self.paths[row]))
        except images.BadImageError:
            return None

    def _from_disk(self, row: int) -> Keypoints | None:
        d = self._disk
        assert d is not None
        n, w, h = (int(x) for x in d["info"][row])
        if n == -1:
            kp = self._compute(row)
            if kp is None:
                d["info"][row] = (-2, 0, 0)
                return None
            m = len(kp.xy)
            d["desc"][row, :m], d["xy"][row, :m], d["info"][row] = kp.desc, kp.xy, (m, *kp.size)
            return kp
        if n == -2:
            return None
        return Keypoints(d["xy"][row, :n].astype(np.float32), d["desc"][row, :n], (w, h))

    def get(self, row: int, mirror: bool = False) -> Keypoints | None:
        row = int(row)
        if self._disk is not None and not mirror:
            return self._from_disk(row)
        key = (row, mirror)
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        if mirror:
            try:
                kp = mirror_keypoints(str(self.paths[row]))
            except images.BadImageError:
                kp = None
            self.computed += 1
        else:
            kp = self._compute(row)
        self._lru[key] = kp
        if len(self._lru) > self.max_items:
            self._lru.popitem(last=False)
        return kp

    def verify(self, a: int, b: int, mirror: bool = True, **kw: Any) -> Verdict:
        """Is cover ``b`` a copy of cover ``a`` (``mirror``: also try ``b``'s mirror image)?"""
        ka, kb = self.get(a), self.get(b)
        if ka is None or kb is None:
            return Verdict(False, 0, 0, 0.0, None)
        return verify_pair(ka, kb, (lambda: self.get(b, mirror=True)) if mirror else None, **kw)


VERIFY_CANDIDATES = 20  # similar --verify: nearest covers verified, by the asked part, content and style
CENTRE_CROP = 0.65  # similar --verify also searches with the query's centre square of this share of its
# shorter side (one more forward pass): a photo of a cover on a table is mostly table, its centre mostly cover


def verify_neighbours(engine: Any, item: Any, vector: np.ndarray, hits: list[dict[str, Any]], k: int,
                      by: str = "both", candidates: int = VERIFY_CANDIDATES) -> list[dict[str, Any]]:
    """The ``k`` covers to show for one query of ``engine`` (a :class:`~stylegen.query.engine.Engine`),
    verified copies first (most inliers first), then the rest by similarity.

    ``hits``: its ``candidates`` nearest covers by ``by``; the ``candidates`` nearest by content
    and by style are added (a framed copy ranks higher by content, a photo by style), and,
    for a query that is not in the index, those of its centre square (:data:`CENTRE_CROP`). Each cover gets ``verified``,
    ``inliers`` and ``transform`` (query -> cover). ``item``: the query as given (path, bytes,
    PIL image or cover id), read for its keypoints.
    """
    if (given := getattr(item, "source", None)) is not None:  # an item the engine read: the query as given,
        item = given  # so keypoints come from its own pixels, not the preprocessed square (service = CLI)
    index = engine.index
    if engine._keypoints is None:
        engine._keypoints = KeypointCache(_Paths(index))
    cache: KeypointCache = engine._keypoints
    own = next((h["id"] for h in hits if h["is_query"]), None)
    seen = {h["id"] for h in hits}
    extra: list[dict[str, Any]] = []
    centre = _centre_vector(engine, item) if own is None else None
    for vec, part in ((vector, "content"), (vector, "style"), (centre, by), (centre, "style")):
        if vec is None or (part != "both" and part not in index.slices) or (vec is vector and part == by):
            continue
        for h in engine.neighbours(vec[None], candidates, part, [own])[0]:
            if h["id"] not in seen:
                seen.add(h["id"])
                extra.append(h)
    if extra:  # their similarity to the query itself by the asked part, like the others'
        q = index.part_vectors(vector[None], by)[0]
        base = index.part_vectors(np.asarray(index.vectors[[h["id"] for h in extra]]), by)
        for h, sim in zip(extra, base @ q, strict=True):
            h["similarity"] = round(float(sim), 6)
    hits = hits + extra
    query = _query_keypoints(item, cache)
    out = []
    for h in hits:
        h = dict(h)
        if h["is_query"]:
            h.update(verified=True, inliers=None, transform=None)
        else:
            kb = cache.get(h["id"])
            v = (verify_pair(query, kb, (lambda i=h["id"]: cache.get(i, mirror=True))
                             if h["similarity"] >= MIRROR_MIN_SIMILARITY else None)
                 if query is not None and kb is not None else Verdict(False, 0, 0, 0.0, None))
            h.update(verified=v.copy, inliers=v.inliers, transform=v.transform if v.copy else None)
        out.append(h)
    out.sort(key=lambda h: (not h["is_query"], not h["verified"], -(h["inliers"] or 0) if h["verified"] else 0,
                            -h["similarity"]))
    return out[:k]


def _centre_vector(engine: Any, item: Any) -> np.ndarray | None:
    """The index vector of the query's centre square (:data:`CENTRE_CROP`), embedded like any query."""
    crop = _centre_square(item)
    if crop is None:
        return None
    results, _ = engine.query_many([crop], classify=False)
    return results[0].vector if results else None


def _centre_square(item: Any) -> Image.Image | None:
    """The centre square (:data:`CENTRE_CROP` of the shorter side) of an image given as a PIL
    image, a path, bytes or decoded pixels; None when it cannot be read."""
    try:
        if isinstance(item, Image.Image):
            img = item.convert("RGB")
        elif isinstance(item, str | Path | bytes):
            img = images.open_image(item if isinstance(item, bytes) else images.read_bytes(item))
        elif getattr(item, "pixels", None) is not None:
            img = Image.fromarray(item.pixels)
        else:
            return None
    except images.BadImageError:
        return None
    w, h = img.size
    side = CENTRE_CROP * min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.crop((round(left), round(top), round(left + side), round(top + side)))


def centre_vectors(engine: Any, paths: Sequence[str], batch: int = 64) -> np.ndarray:
    """Index vectors of each image's centre square (one more forward pass per image), in the
    engine's vector space; a row of zeros where an image cannot be read (it proposes nothing).
    ``stylegen duplicates --photos`` proposes covers near these as candidates: a photo of a
    cover on a table is mostly table, its centre mostly cover."""
    out = np.zeros((len(paths), engine.index.vectors.shape[1]), np.float32)
    for a in range(0, len(paths), batch):
        crops = {i: _centre_square(paths[i]) for i in range(a, min(a + batch, len(paths)))}
        good = [i for i, c in crops.items() if c is not None]
        if good:
            results, _ = engine.query_many([crops[i] for i in good], classify=False, labels=[str(i) for i in good])
            for r in results:  # by label: one that fails to embed is left out, not misplaced
                out[int(r.label)] = r.vector
    return out


def _query_keypoints(item: Any, cache: KeypointCache) -> Keypoints | None:
    """Keypoints of a query: a cover id, a path, bytes, a PIL image, or an item the engine has
    read already (its index row, else its decoded pixels)."""
    if isinstance(item, int | np.integer):
        return cache.get(int(item))
    if isinstance(item, str | Path | bytes | Image.Image):
        return keypoints(item if isinstance(item, bytes | Image.Image) else images.read_bytes(item))
    if getattr(item, "row", None) is not None:
        return cache.get(int(item.row))
    pixels = getattr(item, "pixels", None)
    return None if pixels is None else keypoints(Image.fromarray(pixels))


class _Paths:
    """Row -> image path of an index, read from its metadata one row at a time."""

    def __init__(self, index: Any) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int) -> str:
        return str(self.index.rows([int(row)])["path"].iloc[0])
