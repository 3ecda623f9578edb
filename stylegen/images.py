"""List a SOURCE (folder or CSV manifest), hash its files and decode images.

Bad files never stop a run: the functions here return a reason instead of raising,
and the caller lists them in the run's report.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from stylegen.errors import BadImageError, SourceError

DEFAULT_MAX_PIXELS = 40_000_000  # absurdly large images are skipped, not decoded
MAX_FILE_BYTES = 100 * 1024 * 1024


def list_source(source: str | Path) -> pd.DataFrame:
    """Rows of images to embed, with columns ``image`` (as given), ``path`` (absolute),
    ``genre``/``genres`` where known and every other manifest column as metadata.

    A folder is flat or has one subfolder per genre (the subfolder becomes the label);
    a ``.csv`` is a manifest with an ``image`` column relative to the CSV.
    """
    src = Path(source)
    if not src.exists():
        raise SourceError(f"source not found: {src}")
    if src.is_dir():
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


def hash_file(path: str | Path) -> tuple[str | None, str | None]:
    """(sha1 of the file's bytes, None) or (None, reason it cannot be used)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            return None, "not a file"
        if size == 0:
            return None, "empty file"
        if size > MAX_FILE_BYTES:
            return None, f"file too large ({size} bytes)"
        return hashlib.sha1(p.read_bytes()).hexdigest(), None
    except FileNotFoundError:
        return None, "file not found"
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"


def hash_files(paths: list[str], workers: int = 4) -> list[tuple[str | None, str | None]]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(hash_file, paths))


def open_image(source: str | Path | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to RGB, using JPEG draft mode to decode at the smallest scale >= ``size``.

    Raises :class:`BadImageError` for anything that is not a decodable, sane image.
    """
    import io

    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        img = Image.open(fp)
        w, h = img.size  # from the header: checked before any pixel is decoded
        if w * h > min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
            raise BadImageError(f"image too large ({w}x{h} pixels)")
        if w < 1 or h < 1:
            raise BadImageError("image has no pixels")
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = img.convert("RGB")
        img.load()
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"not a readable image ({type(exc).__name__})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"corrupt or truncated image: {str(exc).splitlines()[0]}") from None
    return img


def resize_center(img: Image.Image, size: int, flip: bool = False) -> np.ndarray:
    """Shorter side to ``size``, center crop to ``size``x``size``; uint8 HWC array."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=2.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


@dataclass(frozen=True)
class Decoded:
    """One item from the reader: its row, a uint8 HWC array or the reason it failed."""

    row: int
    pixels: np.ndarray | None
    error: str | None


def decode(row: int, path: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    try:
        return Decoded(row, resize_center(open_image(path, size, max_pixels), size), None)
    except BadImageError as exc:
        return Decoded(row, None, str(exc))
