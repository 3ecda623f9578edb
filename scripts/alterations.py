"""Altered copies of a cover, for the near-duplicate benchmarks (seeded; never imported by the package).

The eight of ``scripts/bench_duplicates.py`` (issue 13) plus those of issue 22: a heavy text
overlay, a mirror image, a white border saved at JPEG quality 20, and a photo of the printed
cover lying on a table (perspective, lighting, blur, noise).
"""

from __future__ import annotations

import numpy as np
from bench_duplicates import ALTERATIONS as ISSUE13
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

WORDS = ("DELUXE EDITION", "REMASTERED", "LIVE AT THE ROYAL HALL", "GREATEST HITS", "FEAT. SPECIAL GUESTS",
         "EXPLICIT", "VOL. 2", "THE COLLECTION", "ANNIVERSARY", "BONUS TRACKS")


def text_overlay(im: Image.Image, r: np.random.Generator) -> Image.Image:
    """Three lines of big bold text over the cover, a third of them on a dark band."""
    out = im.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    size = max(10, int(0.11 * h))
    font = ImageFont.load_default(size=size)
    ys = np.sort(r.choice(np.arange(0.05, 0.85, 0.1), 3, replace=False))
    for i, y in enumerate(ys):
        text = WORDS[int(r.integers(len(WORDS)))]
        y0 = int(y * h)
        if i == 1:
            draw.rectangle((0, y0 - 2, w, y0 + size + 6), fill=(15, 15, 15))
        fill = tuple(int(v) for v in r.choice([(255, 255, 255), (255, 220, 0), (230, 30, 40)]))
        draw.text((int(0.04 * w), y0), text, font=font, fill=fill, stroke_width=max(1, size // 12),
                  stroke_fill=(0, 0, 0))
    return out


def mirror(im: Image.Image, r: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(im)


def border_q20(im: Image.Image, r: np.random.Generator) -> Image.Image:
    return ISSUE13["border"](im, r)  # saved at JPEG quality 20 (see QUALITY)


def _table(w: int, h: int, r: np.random.Generator) -> np.ndarray:
    """A wooden-looking table top: brown tones with grain."""
    base = np.array(r.choice([(120, 80, 45), (150, 110, 70), (90, 60, 40), (170, 150, 120)]), np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    grain = np.sin(y / 3.0 + 4.0 * np.sin(x / 40.0 + r.uniform(0, 6))) * 12 + r.normal(0, 6, (h, w))
    return np.clip(base[None, None, :] + grain[..., None], 0, 255)


def photo(im: Image.Image, r: np.random.Generator) -> Image.Image:
    """The cover photographed on a table: perspective, uneven light, slight blur, sensor noise."""
    import cv2

    src = np.asarray(im.convert("RGB"), np.float32)
    h0, w0 = src.shape[:2]
    W, H = 400, 320
    side = r.uniform(0.62, 0.78) * H
    cx, cy = W / 2 + r.uniform(-25, 25), H / 2 + r.uniform(-15, 15)
    square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32) * side / 2
    angle = np.deg2rad(r.uniform(-8, 8))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    dst = square @ rot.T + np.array([cx, cy], np.float32)
    shrink = r.uniform(0.08, 0.16) * side  # the far edge looks shorter (camera tilted)
    dst[0, 0] += shrink
    dst[1, 0] -= shrink
    dst += r.normal(0, 3, dst.shape).astype(np.float32)
    M = cv2.getPerspectiveTransform(np.array([[0, 0], [w0, 0], [w0, h0], [0, h0]], np.float32), dst)
    warped = cv2.warpPerspective(src, M, (W, H), flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.ones((h0, w0), np.float32), M, (W, H), flags=cv2.INTER_LINEAR)[..., None]
    scene = warped * mask + _table(W, H, r) * (1 - mask)
    light = np.linspace(r.uniform(0.75, 0.95), r.uniform(1.0, 1.15), W, dtype=np.float32)[None, :, None]
    scene = scene * light * np.array([1.0, r.uniform(0.95, 1.0), r.uniform(0.85, 0.95)], np.float32)
    scene = np.clip(scene + r.normal(0, 4, scene.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(scene).filter(ImageFilter.GaussianBlur(0.8))


ALTERATIONS = {**ISSUE13, "text": text_overlay, "mirror": mirror, "border_q20": border_q20, "photo": photo}
QUALITY = {"jpeg15": 15, "border_q20": 20, "photo": 80}  # JPEG quality of the saved copy (others: 92)


def save(im: Image.Image, name: str, path) -> None:
    im.save(path, "JPEG", quality=QUALITY.get(name, 92))
