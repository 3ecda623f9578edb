"""The one decoding path (:func:`stylegen.sources.images.prepare`): geometry and colour modes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stylegen.config import Preprocess
from stylegen.sources import images

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _bands(size: tuple[int, int], horizontal: bool) -> Image.Image:
    """Three equal bands, red | blue | green, side by side (or stacked)."""
    w, h = size
    img = Image.new("RGB", size, RED)
    third = (w if horizontal else h) // 3
    for colour, start in ((BLUE, third), (GREEN, 2 * third)):
        box = (start, 0, start + third, h) if horizontal else (0, start, w, start + third)
        img.paste(colour, box)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(90, 30), (30, 90)])
@pytest.mark.parametrize("target", [30, 60])
def test_the_shorter_side_is_resized_and_the_centre_square_kept(size, target):
    out = images.prepare(_png(_bands(size, horizontal=size[0] > size[1])), Preprocess(size=target))
    assert out.shape == (target, target, 3) and out.dtype == np.uint8
    inner = out[2:-2] if size[1] > size[0] else out[:, 2:-2]  # away from the blended band edges
    assert (inner == BLUE).all()  # the side bands are cropped away, nothing is squashed


@pytest.mark.parametrize("target", [16, 40, 64])  # smaller, equal, larger than the image
def test_a_square_image_is_resized_whole(target):
    img = _bands((40, 40), horizontal=True)
    out = images.prepare(_png(img), Preprocess(size=target))
    expected = np.asarray(img.resize((target, target), Image.BILINEAR, reducing_gap=2.0))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_every_colour_mode_arrives_as_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16")
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG"))
    out = images.prepare(buf.getvalue(), Preprocess(size=24, draft=False))
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    assert out.shape == (24, 24, 3)
    np.testing.assert_array_equal(out, np.asarray(decoded.convert("RGB")))
    if mode in ("L", "LA"):
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
