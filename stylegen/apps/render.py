"""Similar covers as text and as a self-contained HTML contact sheet."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from stylegen.errors import BadImageError
from stylegen.sources.images import open_image

THUMB = 200


def thumbnail_data_uri(image: Image.Image | str | Path, size: int = THUMB) -> str:
    """A JPEG thumbnail as a data: URI (so the page opens offline, with no other files)."""
    try:
        img = image if isinstance(image, Image.Image) else open_image(image)  # audio files: their cover
        img = img.convert("RGB")
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
    except (OSError, BadImageError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def format_neighbours(neighbours: Sequence[dict[str, Any]]) -> str:
    """One line per neighbour: rank, similarity, genres, artist – album, file."""
    lines = []
    for rank, n in enumerate(neighbours, 1):
        who = " – ".join(x for x in (n.get("artist"), n.get("album")) if x)
        mark = "  (the query itself)" if n.get("is_query") else ""
        if n.get("verified") and not n.get("is_query"):  # similar --verify
            mark = f"  (verified copy: {n['inliers']} inliers{', mirrored' if (n.get('transform') or {}).get('flip') else ''})"
        lines.append(f"{rank:3d}. {n['similarity']:.3f}  {'|'.join(n['genres']) or '-':<18} "
                     f"{who or '-':<40.40} {n['image']}{mark}")
    return "\n".join(lines)


def contact_sheet(query: Image.Image, title: str, neighbours: Sequence[dict[str, Any]],
                  paths: Sequence[Path], by: str) -> str:
    """HTML page: the query and its neighbours as captioned thumbnails, images inlined."""
    cards = []
    for n, path in zip(neighbours, paths, strict=True):
        caption = "<br>".join(html.escape(x) for x in (
            f"{n['similarity']:.3f}" + (" · query" if n.get("is_query") else " · verified copy" if n.get("verified") else ""),
            ", ".join(n["genres"]) or "no genre",
            " – ".join(x for x in (n.get("artist"), n.get("album")) if x) or Path(n["image"]).name,
        ))
        cls = "card query" if n.get("is_query") else "card"
        cards.append(f'<figure class="{cls}"><img src="{thumbnail_data_uri(path)}" alt="">'
                     f"<figcaption>{caption}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;background:#111;color:#eee;margin:2em}"
             ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:14px}"
             "figure{margin:0;background:#1d1d1d;padding:8px;border-radius:6px}"
             "img{width:100%;aspect-ratio:1;object-fit:cover;border-radius:4px}"
             "figcaption{font-size:13px;line-height:1.4;margin-top:6px}"
             ".query{outline:2px solid #e9a23b}.q img{width:240px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Similar to {html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>Covers like {html.escape(title)}</h1>"
            f"<figure class='q'><img src='{thumbnail_data_uri(query, 240)}' alt='query'>"
            f"<figcaption>query · matched by {html.escape(by)}</figcaption></figure>"
            f"<h2>{len(neighbours)} nearest covers</h2><div class='grid'>{''.join(cards)}</div></body></html>")


def write_contact_sheet(out: Path, engine: Any, query: Path, result: Any, by: str) -> Path:
    """Write the contact sheet of ``result`` (a :class:`~stylegen.query.engine.QueryResult`)."""
    paths = [engine.cover_path(n["id"]) for n in result.neighbours]
    page = contact_sheet(open_image(query), query.name, result.neighbours, paths, by)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
