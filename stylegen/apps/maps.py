"""A 2-D map of the collection: layout, a self-contained HTML page, a PNG.

Layout: UMAP (``umap-learn``, the ``map`` extra) when installed, else PCA to 50 dims +
t-SNE from scikit-learn, on the L2-normalised vectors of the chosen part (so distances are
cosines). Large collections:

* the layout is fitted on at most ``MAX_FIT`` covers (a seeded uniform sample); every other
  cover is placed at the similarity-weighted mean position of its 5 nearest fitted covers
  (FAISS inner-product search), so a 100k collection costs one 20k layout plus a k-NN pass;
* the page draws at most ``MAX_DRAWN`` covers as dots (a seeded sample); every cover,
  drawn or not, is counted in a ``BINS`` x ``BINS`` density grid painted beneath the dots;
* thumbnails (``THUMB`` px, in JPEG sprite sheets) are inlined for at most ``MAX_THUMBS``
  of the drawn dots; the served page loads them from ``/covers/{id}`` instead.

The page itself is ``static/map.js`` + ``static/map.css`` (plain canvas, no dependencies);
the standalone file inlines both and the data, the served page (``/map``) fetches
``/api/map``. Clicking a dot opens ``/?id=N`` (the cover's similar covers) on the server.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stylegen.errors import StylegenError
from stylegen.index.store import Index

MAX_FIT = 20_000
MAX_DRAWN = 20_000
MAX_THUMBS = 6_000
BINS = 160
THUMB = 40
SHEET = 40  # thumbnails per sprite row and column (one sheet holds SHEET**2)
NEIGHBOURS = 5
UNLABELLED = "(none)"
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000",
           "#ffd8b1", "#000075")
OTHER_COLOUR = "#a9a9a9"


@dataclass(frozen=True)
class Layout:
    xy: np.ndarray  # (n, 2) float32 in [0, 1]
    method: str  # "umap" or "tsne" (+ "+knn" when some covers were placed by neighbours)
    fitted: int
    seconds: float


def layout(vectors: np.ndarray, method: str = "auto", seed: int = 0, max_fit: int = MAX_FIT) -> Layout:
    """2-D positions in [0, 1]² for the rows of ``vectors`` (see the module doc)."""
    t0 = time.perf_counter()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    if method == "auto":
        method = "umap" if _has_umap() else "tsne"
    if method not in ("umap", "tsne"):
        raise StylegenError(f"layout method must be auto, umap or tsne, got {method!r}")
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(n, max_fit, replace=False)) if n > max_fit else np.arange(n)
    xy = np.zeros((n, 2), np.float32)
    if len(fit) >= 4:
        xy[fit] = _umap(x[fit], seed) if method == "umap" else _tsne(x[fit], seed)
    else:  # too few covers for a layout: a line
        xy[fit, 0] = np.arange(len(fit))
    rest = np.setdiff1d(np.arange(n), fit)
    if len(rest):
        xy[rest] = _place(x[fit], xy[fit], x[rest])
        method += "+knn"
    lo, hi = xy.min(0), xy.max(0)
    xy = (xy - lo) / np.maximum(hi - lo, 1e-9)
    return Layout(xy.astype(np.float32), method, len(fit), time.perf_counter() - t0)


def _has_umap() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import umap

    reducer = umap.UMAP(n_neighbors=min(15, len(x) - 1), min_dist=0.1, random_state=seed, n_jobs=1)
    return reducer.fit_transform(x)


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = float(min(30, max(2, (len(x) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _place(fit_x: np.ndarray, fit_xy: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """Similarity-weighted mean position of each row's nearest fitted covers."""
    import faiss

    index = faiss.IndexFlatIP(fit_x.shape[1])
    index.add(fit_x)
    sims, ids = index.search(np.ascontiguousarray(rest), min(NEIGHBOURS, len(fit_x)))
    w = np.exp((sims - sims[:, :1]) / 0.05)
    return (fit_xy[ids] * w[..., None]).sum(1) / w.sum(1, keepdims=True)


def genre_labels(index: Index) -> list[str]:
    """One label per cover: its single genre, else its first genre, else ``(none)``."""
    meta = index.metadata
    single = meta["genre"] if "genre" in meta else [None] * len(meta)
    multi = meta["genres"] if "genres" in meta else [None] * len(meta)
    out = []
    for g, gs in zip(single, multi, strict=True):
        first = str(gs).split("|")[0] if _present(gs) else None
        out.append(str(g) if _present(g) else first if first and first != "None" else UNLABELLED)
    return out


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) not in ("", "nan")


def _codes(labels: list[str], classes: list[str]) -> list[int]:
    pos = {c: i for i, c in enumerate(classes)}
    return [pos[v] for v in labels]


def palette(classes: list[str]) -> list[str]:
    """One colour per class, most frequent classes first get the distinct colours."""
    return [OTHER_COLOUR if c == UNLABELLED else PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)]


def sprite_sheets(paths: list[str], size: int = THUMB) -> list[str]:
    """JPEG sprite sheets (data URIs) holding one ``size`` px thumbnail per path, row-major."""
    sheets = []
    per = SHEET * SHEET
    for start in range(0, len(paths), per):
        chunk = paths[start:start + per]
        cols = min(SHEET, len(chunk))
        rows = (len(chunk) + SHEET - 1) // SHEET
        sheet = Image.new("RGB", (cols * size, rows * size), (40, 40, 40))
        for i, p in enumerate(chunk):
            try:
                with Image.open(p) as im:
                    im.draft("RGB", (size * 2, size * 2))
                    thumb = im.convert("RGB").resize((size, size), Image.BILINEAR)
                sheet.paste(thumb, ((i % SHEET) * size, (i // SHEET) * size))
            except (OSError, ValueError):
                continue  # an unreadable file keeps the grey tile
        buf = io.BytesIO()
        sheet.save(buf, "JPEG", quality=70, optimize=True)
        sheets.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return sheets


def build_map(index: Index, by: str = "both", predicted: list[str] | None = None, color: str = "genre",
              thumbs: bool = True, link: str = "/?id=", seed: int = 0, method: str = "auto",
              max_drawn: int = MAX_DRAWN, max_thumbs: int = MAX_THUMBS, max_fit: int = MAX_FIT) -> dict[str, Any]:
    """Everything the page needs: positions, colours, titles, density bins, thumbnails."""
    if color not in ("genre", "predicted"):
        raise StylegenError(f"--color must be genre or predicted, got {color!r}")
    if color == "predicted" and predicted is None:
        raise StylegenError("colour by predicted genre needs trained heads (run `stylegen train`)")
    n = len(index)
    if n == 0:
        raise StylegenError(f"index {index.root} is empty")
    lay = layout(index.part_vectors(index.vectors, by), method, seed, max_fit)
    rng = np.random.default_rng(seed + 1)
    drawn = np.sort(rng.choice(n, max_drawn, replace=False)) if n > max_drawn else np.arange(n)
    genres = genre_labels(index)
    counts: dict[str, int] = {}
    for g in genres + (predicted or []):
        counts[g] = counts.get(g, 0) + 1
    classes = sorted(counts, key=lambda c: (c == UNLABELLED, -counts[c], c))
    meta = index.rows(drawn)
    titles = [" — ".join(str(v) for v in (a, b) if _present(v)) or Path(str(im)).name
              for a, b, im in zip(meta.get("artist", [None] * len(meta)), meta.get("album", [None] * len(meta)),
                                  meta["image"], strict=True)]
    hist, _, _ = np.histogram2d(lay.xy[:, 1], lay.xy[:, 0], bins=BINS, range=[[0, 1], [0, 1]])
    g_codes = np.asarray(_codes(genres, classes))
    payload: dict[str, Any] = {
        "count": n, "drawn": len(drawn), "by": by, "method": lay.method, "fitted": lay.fitted,
        "layout_seconds": round(lay.seconds, 2), "color": color, "link": link,
        "classes": classes, "palette": palette(classes),
        "id": drawn.tolist(), "x": np.round(lay.xy[drawn, 0], 4).tolist(),
        "y": np.round(lay.xy[drawn, 1], 4).tolist(),
        "genre": g_codes[drawn].tolist(), "title": titles,
        "predicted": np.asarray(_codes(predicted, classes))[drawn].tolist() if predicted else None,
        "bins": {"size": BINS, "counts": hist.astype(int).ravel().tolist()} if n > len(drawn) else None,
        "thumbs": None,
    }
    if thumbs:
        with_thumb = drawn[:max_thumbs]
        paths = [str(p) for p in index.rows(with_thumb)["path"]]
        payload["thumbs"] = {"size": THUMB, "cols": SHEET, "count": len(with_thumb),
                             "sheets": sprite_sheets(paths)}
    return payload


def predicted_labels(engine: Any) -> list[str] | None:
    """The default method's predicted genre of every cover (its own vote left out), or None
    when the index has no trained heads."""
    from stylegen.errors import ModelNotFoundError

    try:
        n = len(engine.index)
        out: list[str] = []
        for start in range(0, n, 4096):
            rows = list(range(start, min(n, start + 4096)))
            proba, classes, _ = engine.predict_proba(np.asarray(engine.index.vectors[rows], np.float32), rows=rows)
            out += [classes[i] for i in np.argmax(proba, axis=1)]
        return out
    except ModelNotFoundError:
        return None


def map_for_engine(engine: Any, by: str = "both") -> dict[str, Any]:
    """The served page's map: thumbnails come from ``/covers/{id}``, links stay on the server."""
    if not hasattr(engine, "index"):
        raise StylegenError("this server's engine has no index to map")
    return build_map(engine.index, by, predicted_labels(engine), thumbs=False, link="/?id=")


def _static(name: str) -> str:
    return resources.files("stylegen").joinpath("static", name).read_text(encoding="utf-8")


def map_html(payload: dict[str, Any], title: str = "stylegen map") -> str:
    """One self-contained page: CSS, JS and data inline (no network).

    Every ``<`` of the data is written ``\\u003c`` (and ``>``, ``&`` likewise), so no title or
    artist can close the data's script element or open a comment (``<!--<script>``) in it."""
    data = (json.dumps(payload, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    title = html.escape(title)
    body = _static("map.html").split("<body>", 1)[1].split("</body>", 1)[0]
    body = body.replace('<script src="/static/map.js" defer></script>', "")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_static('map.css')}</style></head><body>{body}"
            f"<script id='map-data' type='application/json'>{data}</script>"
            f"<script>{_static('map.js')}</script></body></html>")


def map_png(payload: dict[str, Any], path: Path, color: str | None = None) -> None:
    """A scatter plot of the drawn covers (density of the rest in grey), legend by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = color or payload["color"]
    codes = np.asarray(payload["predicted"] if color == "predicted" else payload["genre"])
    x, y = np.asarray(payload["x"]), np.asarray(payload["y"])
    fig, ax = plt.subplots(figsize=(9, 8), dpi=110)
    if payload["bins"]:
        b = payload["bins"]["size"]
        grid = np.asarray(payload["bins"]["counts"]).reshape(b, b)
        ax.imshow(np.log1p(grid), origin="lower", extent=(0, 1, 0, 1), cmap="Greys", alpha=0.5)
    size = max(1.0, min(12.0, 4000 / max(1, len(x))))
    for c, (name, col) in enumerate(zip(payload["classes"], payload["palette"], strict=True)):
        m = codes == c
        if m.any():
            ax.scatter(x[m], y[m], s=size, c=col, label=f"{name} ({m.sum()})", linewidths=0, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{payload['count']:,} covers by {payload['by']} ({payload['method']}), coloured by {color}")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
