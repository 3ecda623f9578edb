"""List a SOURCE (folder or CSV manifest), hash its files and decode images.

Bad files never stop a run: the functions here return a reason instead of raising,
and the caller lists them in the run's report.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from stylegen.config import Preprocess
from stylegen.errors import BadImageError, ImageTooLargeError, SourceError, UnsupportedImageError
from stylegen.sources import audioart

DEFAULT_MAX_PIXELS = 40_000_000  # absurdly large images are refused (collection and queries alike)
MAX_FILE_BYTES = 100 * 1024 * 1024


def list_source(source: str | Path) -> pd.DataFrame:
    """Rows of images to embed, with columns ``image`` (as given), ``path`` (absolute),
    ``genre``/``genres`` where known and every other manifest column as metadata.

    A folder is flat or has one subfolder per genre (the subfolder becomes the label);
    a folder holding audio files is a music library, one row per album
    (:func:`stylegen.sources.audioart.album_rows`); a ``.csv`` is a manifest with an ``image``
    column relative to the CSV.
    """
    src = Path(source)
    if not src.exists():
        raise SourceError(f"source not found: {src}")
    if src.is_dir():
        if audioart.has_audio(src):  # a music library: one row per album, its cover art
            return audioart.album_rows(src)
        return _list_folder(src)
    if src.suffix.lower() == ".csv":
        return _read_manifest(src)
    raise SourceError(f"source must be a folder of images or a .csv manifest: {src}")


def _list_folder(folder: Path) -> pd.DataFrame:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    rows = []
    for p in files:
        rel = p.relative_to(folder)
        # every file is listed: one that is not an image is reported, not silently ignored
        genre = rel.parts[0] if len(rel.parts) > 1 else None
        rows.append({"image": str(rel), "path": str(p.resolve()), "genre": genre, "genres": genre})
    if not rows:
        raise SourceError(f"no image files in folder: {folder}")
    return pd.DataFrame(rows)


def _read_manifest(csv: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SourceError(f"cannot read manifest {csv}: {str(exc).splitlines()[0]}") from None
    if "image" not in df.columns:
        raise SourceError(f"manifest {csv} has no 'image' column (columns: {', '.join(df.columns)})")
    if "path" in df.columns:
        df = df.rename(columns={"path": "path_in_manifest"})
    base = csv.resolve().parent
    df["path"] = [str((base / p).resolve()) if p else "" for p in df["image"]]
    for col in ("genre", "genres"):
        if col in df.columns:
            df[col] = df[col].replace("", None)
    if "genres" not in df.columns and "genre" in df.columns:
        df["genres"] = df["genre"]
    return df.reset_index(drop=True)


def read_bytes(path: str | Path) -> bytes:
    """The image bytes behind a SOURCE row's ``path``: an image file's contents, or the
    front cover embedded in an audio file (:func:`stylegen.sources.audioart.embedded_cover`).

    Every reader (hashing, decoding, queries) goes through this function, so an item is
    hashed and decoded from the same bytes. Raises :class:`BadImageError` with the reason.
    """
    p = Path(path)
    try:
        if not p.is_file():
            raise BadImageError("file not found" if not p.exists() else "not a file")
        if audioart.is_audio(p):
            return audioart.embedded_cover(p)
        size = p.stat().st_size
        if size == 0:
            raise BadImageError("empty file")
        if size > MAX_FILE_BYTES:
            raise ImageTooLargeError(f"file too large ({size} bytes)")
        return p.read_bytes()
    except OSError as exc:
        raise BadImageError(f"unreadable: {exc.strerror or exc}") from None


def hash_bytes(data: bytes) -> str:
    """The content hash that identifies a cover (sha1 of its image bytes)."""
    return hashlib.sha1(data).hexdigest()


def hash_file(path: str | Path) -> tuple[str | None, str | None]:
    """(content hash, None) or (None, reason the file cannot be used)."""
    try:
        return hash_bytes(read_bytes(path)), None
    except BadImageError as exc:
        return None, str(exc)


def hash_files(paths: list[str], workers: int = 4) -> list[tuple[str | None, str | None]]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(hash_file, paths))


ImageInput = str | Path | bytes | Image.Image
_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def open_image(source: str | Path | bytes, draft_size: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file or bytes to RGB; JPEGs at the smallest draft scale whose sides are all
    at least ``draft_size`` (None: full size).

    The size in the header is checked before any pixel is decoded. Raises
    :class:`BadImageError` for anything that is not a decodable, sane image.
    """
    if isinstance(source, bytes) and not source:
        raise BadImageError("empty file")
    fp = io.BytesIO(source if isinstance(source, bytes) else read_bytes(source))  # audio: its cover
    try:
        img = Image.open(fp)
        w, h = img.size  # from the header: checked before any pixel is decoded
        if w * h > pixel_limit(max_pixels):
            raise ImageTooLargeError(f"image too large ({w}x{h} = {w * h:,} pixels; the limit is {pixel_limit(max_pixels):,})")
        if w < 1 or h < 1:
            raise BadImageError("image has no pixels")
        if img.format == "JPEG" and draft_size:
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        if img.mode != "RGB":  # convert() of an RGB image would only copy it
            img = img.convert("RGB")
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except UnidentifiedImageError:
        raise UnsupportedImageError("not a readable image (not an image file, or an unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large ({type(exc).__name__})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"corrupt or truncated image: {str(exc).splitlines()[0]}") from None
    return img


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header without decoding pixels; None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def pixel_limit(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The effective pixel limit: ours, or PIL's bomb-warning threshold if that is lower."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pil_limit) if pil_limit else max_pixels


BORDER_TOLERANCE = 40  # a border pixel differs from the border colour by at most this (sum over RGB; JPEG noise)
BORDER_FILL = 0.98  # share of a line's pixels that must be the border colour
BORDER_MAX = 0.30  # at most this share of a side is cut from each edge
BORDER_MIN = 0.02  # thinner edges are left alone (JPEG ringing, a hairline)


def border_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    """The box inside a uniform frame or letterbox bars, or None when there is none.

    The border colour is the median of the outermost ring of pixels. An edge is cut while its
    lines are (nearly) all that colour, by up to :data:`BORDER_MAX` of the side; opposite edges
    are cut only together and by similar amounts (a frame or bars, not a plain background
    around an off-centre motif), at least :data:`BORDER_MIN` of the side.
    """
    a = np.asarray(img.convert("RGB"), np.int16)
    h, w = a.shape[:2]
    if min(h, w) < 16:
        return None
    ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    colour = np.median(ring, axis=0)
    near = np.abs(a - colour).sum(axis=2) <= BORDER_TOLERANCE  # (h, w) bool
    rows, cols = near.mean(axis=1) >= BORDER_FILL, near.mean(axis=0) >= BORDER_FILL

    def run(flags: np.ndarray, limit: int) -> int:
        n = int(np.argmin(flags[:limit])) if not flags[:limit].all() else limit
        return n

    top, bottom = run(rows, int(BORDER_MAX * h)), run(rows[::-1], int(BORDER_MAX * h))
    left, right = run(cols, int(BORDER_MAX * w)), run(cols[::-1], int(BORDER_MAX * w))

    def pair(x: int, y: int, side: int) -> tuple[int, int]:
        lo, hi = min(x, y), max(x, y)
        return (x, y) if lo >= BORDER_MIN * side and lo >= 0.5 * hi else (0, 0)

    top, bottom = pair(top, bottom, h)
    left, right = pair(left, right, w)
    if not (top or left):
        return None
    return left, top, w - right, h - bottom


def trim_border(img: Image.Image) -> Image.Image:
    """``img`` without its uniform frame or letterbox bars (:func:`border_box`), else itself."""
    box = border_box(img)
    return img if box is None else img.crop(box)


def resize_center(img: Image.Image, size: int, flip: bool = False, resize_filter: str = "bilinear") -> np.ndarray:
    """Shorter side to ``size``, center crop to ``size``x``size``; uint8 HWC array."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), _FILTERS[resize_filter], reducing_gap=2.0)
    if (nw, nh) != (size, size):  # a square image needs no crop (and no copy)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def prepare(source: ImageInput, spec: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The backbone's uint8 (S, S, 3) input for a file, its bytes or a decoded image.

    This is the one decoding path of stylegen: the collection (``stylegen embed``) and
    every query (CLI, service, evaluation, music libraries) go through it with the index's
    own :class:`~stylegen.config.Preprocess`. A path and its bytes give identical pixels; an
    already decoded PIL image skips only the JPEG draft step.
    """
    if isinstance(source, str | Path):
        source = read_bytes(source)
    if isinstance(source, Image.Image):
        w, h = source.size
        if w * h > pixel_limit(max_pixels):
            raise ImageTooLargeError(f"image too large ({w}x{h} pixels)")
        img = source.convert("RGB")
    else:
        img = open_image(source, spec.size if spec.draft else None, max_pixels)
    if spec.trim_border:
        img = trim_border(img)
    return resize_center(img, spec.size, resize_filter=spec.resize_filter)


@dataclass(frozen=True)
class Decoded:
    """One item from the reader: its row, a uint8 HWC array or the reason it failed."""

    row: int
    pixels: np.ndarray | None
    error: str | None


def decode(row: int, path: str, spec: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """:func:`prepare` for the batch reader: the failure is returned, not raised."""
    try:
        return Decoded(row, prepare(read_bytes(path), spec, max_pixels), None)
    except BadImageError as exc:
        return Decoded(row, None, str(exc))
