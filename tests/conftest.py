"""Shared fixtures: generated images (never real covers), a seeded RNG, the real-data path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COVERS_CSV = REAL_DATA / "covers" / "covers.csv"
GTZAN_CSV = REAL_DATA / "gtzan" / "features_30_sec.csv"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_image(path: Path, kind: int, size: int = 64, seed: int = 0) -> Path:
    """A small synthetic 'cover': stripes, checks or a gradient per ``kind``, plus noise."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    if kind % 3 == 0:
        base = ((x // 8) % 2) * 200
    elif kind % 3 == 1:
        base = (((x // 8) + (y // 8)) % 2) * 200
    else:
        base = x * 255 // size
    rgb = np.stack([base, np.roll(base, kind * 5, axis=1), 255 - base], axis=-1)
    rgb = np.clip(rgb + r.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def planted_rows(root: Path, genres: list[str], per_genre: int, extra=lambda g, i: {}) -> list[dict]:
    """Manifest rows of generated images whose look depends on the genre (planted structure),
    with ``extra(genre_index, i)`` columns each."""
    rows = []
    for g, genre in enumerate(genres):
        for i in range(per_genre):
            p = make_image(root / "img" / f"{genre}{i}.png", kind=g, seed=100 * g + i)
            rows.append({"image": f"img/{p.name}", "genre": genre, **extra(g, i)})
    return rows


def embed_tiny(csv: Path, index_dir: Path) -> None:
    """Embed a small manifest quickly (fp32, inline decode, 8 + 8 PCA dims)."""
    import stylegen
    from stylegen.config import CompressionConfig, EmbedConfig

    cfg = EmbedConfig(compression=CompressionConfig(dims={"style": 8, "content": 8}))
    stylegen.embed(csv, index_dir, cfg, workers=0, progress=False, precision="fp32")


@pytest.fixture
def genre_folder(tmp_path: Path) -> Path:
    """A folder with one subfolder per genre, 3 generated images each."""
    root = tmp_path / "covers"
    for g, genre in enumerate(["jazz", "metal"]):
        for i in range(3):
            make_image(root / genre / f"{genre}{i}.jpg", kind=g, seed=10 * g + i)
    return root


def add_bad_files(folder: Path) -> dict[str, str]:
    """Write one of each kind of bad file; returns name -> expected reason fragment."""
    good = make_image(folder / "tmp_good.jpg", kind=2)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    Image.new("1", (9000, 9000)).save(folder / "huge.png")  # 81 Mpx, a few kB on disk
    return {"truncated.jpg": "truncated", "empty.jpg": "empty", "notes.txt": "not a readable image",
            "huge.png": "too large"}


def needs_real_data(path: Path = COVERS_CSV):
    return pytest.mark.skipif(not path.exists(), reason=f"real data not found at {path} (../shared/data)")


def write_index(root: Path, raw: dict[str, np.ndarray], metadata, dims: int = 8, **manifest) -> Path:
    """An index on disk from given raw part vectors (no model): PCA to ``dims`` per part,
    combined and written with the store's own writer. Manifest fields can be overridden."""
    from stylegen.config import CompressionConfig, EmbedConfig, FeatureConfig
    from stylegen.index.compress import Compressor, combine
    from stylegen.index.store import FORMAT_VERSION, choose_index_key, write_snapshot

    config = EmbedConfig(features=FeatureConfig(parts=tuple(raw)),
                         compression=CompressionConfig(dims={p: dims for p in raw}))
    compressor = Compressor.fit(raw, config.compression)
    vectors, slices = combine(compressor.transform(raw), config.features.weights)
    digest = str(abs(hash(tuple(float(p.mean.sum()) for p in compressor.parts.values()))))[:16]
    full = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "parts": list(slices),
            "slices": {p: list(s) for p, s in slices.items()}, "dims": compressor.dims,
            "dim": int(vectors.shape[1]), "count": len(vectors), "feature_id": digest,
            "index_key": choose_index_key(*vectors.shape), "metric": "inner_product",
            "backbone": {"name": "planted", "weights_id": "planted", "taps": [], "image_size": 32,
                         "mean": [0.5] * 3, "std": [0.5] * 3}, **manifest}
    return write_snapshot(root, full, vectors, metadata, compressor, raw)


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,1250",
)


def headless_chromium(tmp_path: Path, page_load_timeout: int = 30):
    """A Selenium driver for Debian's headless Chromium (profile under ``tmp_path``, browser
    console logs kept); skips the test with a reason when Chromium or Selenium is missing."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    drv.set_page_load_timeout(page_load_timeout)
    return drv
