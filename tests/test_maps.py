"""The collection map: layout of planted clusters, sampling for large collections, the
self-contained page (checked in headless Chromium), the PNG, the CLI and the served tab."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from stylegen.apps.maps import build_map, layout, map_html, map_png
from stylegen.index.store import Index
from tests.conftest import headless_chromium, make_image, write_index

GENRES = ["jazz", "metal", "pop"]


def blobs(rng, per: int, dim: int = 24) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(len(GENRES), dim)) * 3
    labels = np.repeat(np.arange(len(GENRES)), per)
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def nn_agreement(xy: np.ndarray, labels: np.ndarray) -> float:
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


def test_tsne_layout_keeps_planted_clusters_apart(rng):
    x, labels = blobs(rng, 30)
    lay = layout(x, method="tsne")
    assert lay.xy.shape == (90, 2) and lay.method == "tsne" and lay.fitted == 90
    assert lay.xy.min() == 0 and lay.xy.max() == 1
    assert nn_agreement(lay.xy, labels) >= 0.95


def test_large_collections_fit_a_sample_and_place_the_rest(rng):
    x, labels = blobs(rng, 80)
    lay = layout(x, method="tsne", max_fit=60)
    assert lay.fitted == 60 and lay.method == "tsne+knn"
    assert nn_agreement(lay.xy, labels) >= 0.9  # placed covers land in their cluster


@pytest.fixture
def planted_index(tmp_path: Path, rng) -> Index:
    """An index of 45 generated covers in 3 genres whose vectors form 3 clusters."""
    x, labels = blobs(rng, 15, dim=40)
    paths = [make_image(tmp_path / "img" / f"{i}.png", kind=int(g), seed=i) for i, g in enumerate(labels)]
    meta = pd.DataFrame({"image": [p.name for p in paths], "path": [str(p) for p in paths],
                         "genre": [GENRES[g] for g in labels], "artist": [f"artist {i}" for i in range(len(x))],
                         "content_hash": [str(i) for i in range(len(x))]})
    write_index(tmp_path / "idx", {"style": x, "content": x[:, ::-1].copy()}, meta, dims=8)
    return Index.open(tmp_path / "idx")


def test_payload_samples_points_and_bins_all_of_them(planted_index: Index):
    full = build_map(planted_index, method="tsne")
    assert full["drawn"] == 45 and full["bins"] is None
    assert full["classes"] == GENRES  # 15 each: ties broken by name
    assert [full["classes"][g] for g in full["genre"]] == list(planted_index.metadata["genre"])
    assert full["thumbs"]["count"] == 45 and len(full["thumbs"]["sheets"]) == 1
    small = build_map(planted_index, method="tsne", max_drawn=20, max_thumbs=5)
    assert small["drawn"] == 20 and len(set(small["id"])) == 20
    assert sum(small["bins"]["counts"]) == 45  # every cover is in the density grid
    assert small["thumbs"]["count"] == 5


def test_html_is_self_contained_and_png_is_written(planted_index: Index, tmp_path: Path):
    payload = build_map(planted_index, method="tsne", link="http://127.0.0.1:8000/?id=")
    page = map_html(payload)
    assert "/static/" not in page and "<script src" not in page and "<link" not in page
    assert page.count("data:image/jpeg;base64,") == 1  # one sprite sheet
    map_png(payload, tmp_path / "map.png")
    from PIL import Image

    with Image.open(tmp_path / "map.png") as im:
        assert im.size[0] > 500 and len(set(im.convert("RGB").getdata())) > 10


def test_cli_map_and_its_errors(planted_index: Index, tmp_path: Path):
    from stylegen.apps.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["map", "--index", str(planted_index.root), "--out", str(tmp_path / "m.html"),
                              "--png", str(tmp_path / "m.png"), "--method", "tsne", "--by", "style"])
    assert out.exit_code == 0, out.output
    assert "45 covers laid out by style with tsne" in out.output and (tmp_path / "m.png").is_file()
    bad = runner.invoke(app, ["map", "--index", str(planted_index.root), "--out", str(tmp_path / "x.html"),
                              "--color", "predicted"])
    assert bad.exit_code != 0 and "trained heads" in str(bad.exception)


def test_served_map_tab(planted_index: Index):
    from fastapi.testclient import TestClient

    from stylegen.apps.service import create_app
    from stylegen.query.engine import Engine

    client = TestClient(create_app(Engine(planted_index)), base_url="http://127.0.0.1")
    data = client.get("/api/map", params={"by": "content"}).json()
    assert data["count"] == 45 and data["by"] == "content" and data["thumbs"] is None
    assert data["link"] == "/?id="
    page = client.get("/map")
    assert page.status_code == 200 and "/static/map.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/map.js").status_code == 200
    assert 'href="/map"' in client.get("/").text


# ---------------------------------------------------------------- headless Chromium

def _hex(c: str) -> tuple[int, int, int]:
    return tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))


def check_map_page(driver, url: str, shot: Path) -> dict:
    """Open a map page and check points, their colours, a hover card, zoom; save a screenshot."""
    import time

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.get(url)
    deadline = time.monotonic() + 60
    while not driver.execute_script("return window.stylegenMap && window.stylegenMap.state().ready"):
        assert time.monotonic() < deadline, "the map did not load"
        time.sleep(0.1)
    state = driver.execute_script("return window.stylegenMap.state()")
    data = driver.execute_script("return JSON.parse(document.getElementById('map-data').textContent)")
    assert state["points"] == data["drawn"] > 0
    # colours: the canvas pixel at isolated points is the colour of their class
    probe = driver.execute_script("""
        const m = window.stylegenMap, c = document.getElementById('map-canvas');
        const ctx = c.getContext('2d'), dpr = window.devicePixelRatio || 1, codes = m.codes();
        const pts = codes.map((k, i) => [i, ...m.screenOf(i)]);
        const out = [];
        for (const [i, x, y] of pts) {
          const alone = pts.every(([j, u, v]) => j === i || codes[j] === codes[i] || (u-x)**2 + (v-y)**2 > 144);
          if (!alone) continue;
          const p = ctx.getImageData(Math.round(x * dpr), Math.round(y * dpr), 1, 1).data;
          out.push({i, code: codes[i], rgb: [p[0], p[1], p[2]], x, y});
          if (out.length >= 40) break;
        }
        return out;""")
    assert len(probe) >= min(10, data["drawn"])
    palette = [_hex(c) for c in data["palette"]]
    for p in probe:
        assert max(abs(a - b) for a, b in zip(p["rgb"], palette[p["code"]], strict=True)) <= 8, p
    assert len({p["code"] for p in probe}) >= 2  # more than one colour on the page
    # hover card: title, genre and the thumbnail drawn from the sprite sheet
    target = probe[0]
    canvas = driver.find_element(By.ID, "map-canvas")
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", canvas)
    ActionChains(driver).move_to_element_with_offset(canvas, int(target["x"] - rect[0] / 2),
                                                     int(target["y"] - rect[1] / 2)).perform()
    deadline = time.monotonic() + 10
    while driver.execute_script("return document.getElementById('map-card').dataset.thumb") != "loaded":
        assert time.monotonic() < deadline, "no thumbnail in the hover card"
        time.sleep(0.05)
    card = driver.find_element(By.ID, "map-card")
    assert card.is_displayed()
    assert card.get_attribute("data-id") == str(data["id"][target["i"]])
    assert driver.find_element(By.ID, "map-card-title").text == data["title"][target["i"]]
    assert data["classes"][target["code"]] in driver.find_element(By.ID, "map-card-genre").text
    colours = driver.execute_script("""
        const d = document.getElementById('map-thumb').getContext('2d').getImageData(0, 0, 96, 96).data;
        const s = new Set(); for (let i = 0; i < d.length; i += 4 * 37) s.add(d[i] + ',' + d[i+1] + ',' + d[i+2]);
        return s.size;""")
    assert colours > 5
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    # zoom in with the wheel
    driver.execute_script("""arguments[0].dispatchEvent(new WheelEvent('wheel',
        {deltaY: -400, clientX: 300, clientY: 300, bubbles: true, cancelable: true}));""", canvas)
    assert driver.execute_script("return window.stylegenMap.state().view.scale") > 1.5
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    return {"points": state["points"], "probed": len(probe)}


@pytest.mark.browser
def test_map_page_in_headless_chromium(planted_index: Index, tmp_path: Path):
    page = Path(os.environ.get("STYLEGEN_MAP_HTML", ""))  # a map of real covers, for the record
    if not page.is_file():
        page = tmp_path / "map.html"
        page.write_text(map_html(build_map(planted_index, method="tsne")), encoding="utf-8")
    driver = headless_chromium(tmp_path, page_load_timeout=60)
    try:
        check_map_page(driver, page.as_uri(), tmp_path / "map.png")
    finally:
        driver.quit()


