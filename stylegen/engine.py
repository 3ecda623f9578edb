"""Query side: open an index once, embed new images exactly like the collection,
classify them with the trained heads and find similar covers.

``Engine`` is what the CLI's classify/similar/evaluate commands and the HTTP service
call; a notebook user can call it directly::

    engine = Engine.open("indexes/covers")
    engine.classify(PIL.Image.open("cover.jpg"))
    engine.similar(PIL.Image.open("cover.jpg"), k=12, by="style")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stylegen import images
from stylegen.compress import combine
from stylegen.errors import (
    BadImageError,
    DataError,
    IndexMismatchError,
    ModelNotFoundError,
    StylegenError,
)
from stylegen.features import Featurizer
from stylegen.labels import Taxonomy
from stylegen.store import Index

METHODS = ("head", "knn", "ensemble")
HEADS_DIR = "heads"


@dataclass
class Engine:
    """An opened index plus, lazily, its featurizer and trained heads."""

    index: Index
    device: str = "auto"
    _featurizer: Featurizer | None = field(default=None, repr=False)
    _heads: dict[str, Any] = field(default_factory=dict, repr=False)
    _head_config: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, index_dir: str | Path, device: str = "auto") -> Engine:
        return cls(Index.open(index_dir), device=device)

    # ---- embedding -------------------------------------------------------------------
    @property
    def featurizer(self) -> Featurizer:
        if self._featurizer is None:
            from stylegen.embed import load_featurizer

            cfg = self.index.config
            self._featurizer = load_featurizer(cfg, self.device, self.index.manifest.get("precision", "auto"))
            if self._featurizer.backbone.weights_id != self.index.manifest["backbone"]["weights_id"]:
                raise IndexMismatchError("the installed backbone weights differ from the index's")
        return self._featurizer

    def embed_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Final index vectors for uint8 (n, S, S, 3) images prepared by ``images.resize_center``."""
        out = []
        for i in range(0, len(pixels), batch_size):
            raw = self.featurizer(pixels[i : i + batch_size])
            parts = self.index.compressor.transform(raw)
            out.append(combine(parts, self.index.config.features.weights)[0])
        return np.concatenate(out) if out else np.zeros((0, self.index.manifest["dim"]), np.float32)

    def embed_images(self, imgs: Sequence[Image.Image]) -> np.ndarray:
        size = self.featurizer.backbone.image_size
        return self.embed_pixels(np.stack([images.resize_center(im.convert("RGB"), size) for im in imgs]))

    def embed_paths(self, paths: Sequence[str | Path]) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
        """Vectors of the readable images, their positions in ``paths``, and the bad ones."""
        good, pix, bad = [], [], []
        for i, p in enumerate(paths):
            d = images.decode(i, str(p), self.index.preprocess)
            if d.pixels is None:
                bad.append({"image": str(p), "reason": d.error or "unreadable"})
            else:
                good.append(i)
                pix.append(d.pixels)
        vecs = self.embed_pixels(np.stack(pix)) if pix else np.zeros((0, self.index.manifest["dim"]), np.float32)
        return vecs, good, bad

    # ---- heads -----------------------------------------------------------------------
    @property
    def head_config(self) -> dict[str, Any]:
        if self._head_config is None:
            path = self.index.root / HEADS_DIR / "heads.json"
            if not path.is_file():
                raise ModelNotFoundError(f"no trained heads in {self.index.root} (run `stylegen train --index {self.index.root}`)")
            cfg = json.loads(path.read_text())
            if cfg["feature_id"] != self.index.feature_id:
                raise IndexMismatchError("the heads were trained before the index changed; run `stylegen train` again")
            self._head_config = cfg
        return self._head_config

    def head(self, name: str) -> Any:
        if name not in self._heads:
            from stylegen.heads import load_head

            path = self.index.root / HEADS_DIR / f"{name}.joblib"
            if not path.is_file():
                raise ModelNotFoundError(f"head {name!r} is not trained in {self.index.root} (trained: {', '.join(self.head_config['heads'])})")
            self._heads[name] = load_head(path, expect_feature_id=self.index.feature_id)
        return self._heads[name]

    @property
    def taxonomy(self) -> Taxonomy | None:
        tree = self.head_config.get("taxonomy")
        return Taxonomy.from_tree(tree) if tree else None

    def predict_proba(self, vectors: np.ndarray, method: str | None = None, *,
                      rows: Sequence[int] | None = None, tabular: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
        """Genre probabilities (n, classes) and the class names.

        ``rows``: index row of each query when it is a cover of the index (its own vote is
        then left out of kNN), else None. ``tabular``: numeric features for hybrid heads.
        """
        method = method or self.head_config["default_method"]
        if method not in METHODS:
            raise StylegenError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        name = {"head": self.head_config["default_head"], "knn": "knn", "ensemble": "ensemble"}[method]
        head = self.head(name)
        kwargs: dict[str, Any] = {}
        if name in ("knn", "ensemble"):
            kwargs["exclude"] = self._exclude(rows, len(vectors))
        if self.head_config.get("tabular_columns") and name == "mlp":  # only the MLP reads the table
            if tabular is None:
                raise DataError(f"this head needs tabular columns: {', '.join(self.head_config['tabular_columns'])}")
            kwargs["tabular"] = tabular
        proba = head.predict_proba(vectors, **kwargs)
        return np.asarray(proba, np.float64), [str(c) for c in head.classes_]

    def _exclude(self, rows: Sequence[int] | None, n: int) -> np.ndarray:
        if rows is None:
            return np.full(n, -1)
        pos = {r: i for i, r in enumerate(self.head_config["train_rows"])}
        return np.array([pos.get(int(r), -1) if r is not None and r >= 0 else -1 for r in rows])

    def describe(self, proba: np.ndarray, classes: list[str], top: int = 3) -> dict[str, Any]:
        """Top genres with probabilities and hierarchical paths, plus every taxonomy level."""
        order = np.argsort(-proba)[:top]
        tax = self.taxonomy
        genres = [{"genre": classes[i], "probability": round(float(proba[i]), 4),
                   "path": tax.path(classes[i]) if tax and tax.level_of(classes[i]) is not None else [classes[i]]}
                  for i in order]
        out: dict[str, Any] = {"genres": genres}
        if tax is not None:
            top_p, top_c = tax.roll_up(proba[None], classes)
            idx = np.argsort(-top_p[0])[:top]
            out["levels"] = {"top": [{"genre": top_c[i], "probability": round(float(top_p[0, i]), 4)} for i in idx]}
        return out

    def classify(self, image: Image.Image, top: int = 3, method: str | None = None) -> dict[str, Any]:
        proba, classes = self.predict_proba(self.embed_images([image]), method)
        return self.describe(proba[0], classes, top)

    def classify_id(self, cover_id: int, top: int = 3, method: str | None = None) -> dict[str, Any]:
        row = self._row(cover_id)
        proba, classes = self.predict_proba(np.asarray(self.index.vectors[row : row + 1]), method, rows=[row])
        return self.describe(proba[0], classes, top)

    # ---- similar covers --------------------------------------------------------------
    def neighbours(self, vectors: np.ndarray, k: int = 12, by: str = "both",
                   rows: Sequence[int | None] | None = None) -> list[list[dict[str, Any]]]:
        sims, ids = self.index.search(vectors, k + 1, by=by)
        out = []
        for q, (s_row, i_row) in enumerate(zip(sims, ids, strict=True)):
            own = rows[q] if rows is not None else None
            hits = [self._cover(int(i), float(s), own) for s, i in zip(s_row, i_row, strict=True) if i >= 0]
            if own is None:  # an outside image that is byte-identical to a cover is marked too
                for h in hits:
                    h["is_query"] = h["similarity"] > 0.9999
            out.append(hits[:k])
        return out

    def similar(self, image: Image.Image, k: int = 12, by: str = "both") -> list[dict[str, Any]]:
        return self.neighbours(self.embed_images([image]), k, by)[0]

    def similar_id(self, cover_id: int, k: int = 12, by: str = "both") -> list[dict[str, Any]]:
        row = self._row(cover_id)
        return self.neighbours(np.asarray(self.index.vectors[row : row + 1]), k, by, rows=[row])[0]

    def _cover(self, row: int, sim: float, own: int | None) -> dict[str, Any]:
        meta = self.index.metadata.iloc[row]
        genres = [g for g in str(meta.get("genres") or "").split("|") if g and g != "None"]
        return {"id": row, "similarity": round(sim, 4), "genres": genres,
                "artist": _text(meta.get("artist")), "album": _text(meta.get("album")),
                "image": str(meta.get("image")), "is_query": own is not None and row == own}

    def _row(self, cover_id: int) -> int:
        if not 0 <= int(cover_id) < len(self.index):
            raise KeyError(cover_id)
        return int(cover_id)

    def cover_path(self, cover_id: int) -> Path:
        return Path(self.index.metadata.iloc[self._row(cover_id)]["path"])

    def find(self, path: str | Path) -> int | None:
        """Index row of the cover stored from this file (by content hash), if any."""
        digest, _ = images.hash_file(path)
        hits = np.flatnonzero(self.index.metadata["content_hash"].to_numpy() == digest)
        return int(hits[0]) if len(hits) else None

    def info(self) -> dict[str, Any]:
        m = self.index.manifest
        try:
            genres = list(self.head(self.head_config["default_head"]).classes_)
        except StylegenError:
            genres = []
        return {"count": len(self.index), "backbone": m["backbone"]["name"], "parts": m["parts"],
                "dims": m["dims"], "genres": [str(g) for g in genres]}


def _text(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) or v == "" else str(v)


def open_query_image(path: str | Path) -> Image.Image:
    """Decode a query image with the same checks as the collection (one-line errors)."""
    p = Path(path)
    if not p.is_file():
        raise BadImageError(f"image not found: {p}")
    try:
        return images.open_image(p, 4096)
    except BadImageError as exc:
        raise BadImageError(f"{p}: {exc}") from None
