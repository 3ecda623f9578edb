"""End to end: the web page in headless Chromium against a live server on 127.0.0.1.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and ``pip install selenium``;
skipped otherwise. No browser is ever downloaded (the driver path is given explicitly, so
Selenium Manager is not run). The screenshot lands in ``tmp_path`` (never in the repository).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from stylegen.apps.service import create_app
from tests.conftest import headless_chromium

pytestmark = pytest.mark.browser

K = 12  # the page's default number of similar covers


@pytest.fixture(scope="module")
def browser_engine(tmp_path_factory):
    """The real engine behind the page: a small index of real covers (generated ones when
    ../shared/data is absent) with trained heads, the model loaded once."""
    import pandas as pd
    from threadpoolctl import threadpool_limits

    import stylegen
    from stylegen.config import CompressionConfig, EmbedConfig
    from stylegen.heads.train import train
    from stylegen.query.engine import Engine
    from tests.conftest import COVERS_CSV, make_image

    root = tmp_path_factory.mktemp("browser")
    if COVERS_CSV.exists():
        rows = pd.read_csv(COVERS_CSV)
        rows = rows[rows["genre"].notna()].groupby("genre").head(6).reset_index(drop=True)
        rows["image"] = [str(COVERS_CSV.parent / p) for p in rows["image"]]
    else:
        paths = [make_image(root / "img" / f"{g}{i}.png", kind=k, seed=10 * k + i)
                 for k, g in enumerate(["jazz", "metal", "pop"]) for i in range(6)]
        rows = pd.DataFrame({"image": [str(p) for p in paths], "genre": [p.stem[:-1] for p in paths]})
    rows.to_csv(root / "covers.csv", index=False)
    config = EmbedConfig(compression=CompressionConfig(dims={"style": 16, "content": 16}))
    stylegen.embed(root / "covers.csv", root / "idx", config, workers=0, progress=False)
    with threadpool_limits(1):
        train(root / "idx", heads=("linear", "knn", "ensemble"), validate=False)
    engine = Engine.open(root / "idx")
    engine.featurizer  # noqa: B018  (load the model before the browser starts its clock)
    return engine


@pytest.fixture
def live_server(browser_engine):
    """The app under uvicorn in a thread, on a loopback port chosen by the OS."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY on accepted sockets
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(browser_engine), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def driver(tmp_path: Path):
    drv = headless_chromium(tmp_path)
    yield drv
    drv.quit()


def page_state(drv) -> dict:
    """What the test looks at, read in one round trip."""
    return drv.execute_script("""
        const status = document.querySelector('#status');
        const grid = document.querySelector('#similar-grid');
        const cards = [...document.querySelectorAll('#similar-grid .cover-card')];
        return {
          state: status.dataset.state, status: status.textContent,
          bars: [...document.querySelectorAll('#genre-bars .genre-bar .bar-label')]
                  .map(e => e.textContent),
          cards: cards.map(c => Number(c.dataset.id)),
          query: grid.dataset.query || '',
          thumbsLoaded: cards.every(c => { const i = c.querySelector('img');
                                          return i.complete && i.naturalWidth > 0; }),
          preview: document.querySelector('#query-preview').getAttribute('src') || '',
        };""")


def wait_for(drv, condition, what: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = page_state(drv)
        if condition(state):
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; page state: {state}")
        time.sleep(0.05)


def expected_labels(genres: list[dict]) -> list[str]:
    return [" › ".join(g.get("path") or [g["genre"]]) for g in genres]


def test_upload_then_browse_similar_covers(driver, live_server, browser_engine, tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    api = httpx.Client(base_url=live_server, timeout=30)
    driver.get(live_server + "/")
    wait_for(driver, lambda s: s["state"] == "ready", "the page to load the index info")
    assert driver.find_element(By.ID, "drop-zone").is_displayed()
    file_input = driver.find_element(By.ID, "file-input")

    # an error from the API is shown in #status, and the page keeps working
    not_a_cover = tmp_path / "notes.txt"
    not_a_cover.write_text("these are not the covers you are looking for\n")
    file_input.send_keys(str(not_a_cover))
    state = wait_for(driver, lambda s: s["state"] == "error", "the error message")
    assert "not an image" in state["status"]

    # upload a cover: genre bars and at least K similar covers, as the API says
    cover = Path(browser_engine.cover_path(0))
    file_input.send_keys(str(cover))
    state = wait_for(driver, lambda s: s["state"] == "ok" and s["bars"] and len(s["cards"]) >= K
                     and s["thumbsLoaded"], "genres and similar covers")
    with cover.open("rb") as f:
        genres = api.post("/classify", files={"image": f}, data={"top": 5}).json()["genres"]
    with cover.open("rb") as f:
        similar = api.post("/similar", files={"image": f}, data={"k": K}).json()["neighbours"]
    assert state["bars"] == expected_labels(genres)
    assert state["cards"] == [n["id"] for n in similar]
    assert state["query"] == "upload" and state["preview"].startswith("blob:")

    # click a neighbour: the grid refreshes from that cover
    target = state["cards"][-1]
    driver.find_element(By.CSS_SELECTOR, f'#similar-grid .cover-card[data-id="{target}"]').click()
    state = wait_for(driver, lambda s: s["state"] == "ok" and s["query"] == f"id:{target}"
                     and len(s["cards"]) >= K and s["thumbsLoaded"], "the grid to refresh")
    expected = api.post("/similar", data={"id": target, "k": K}).json()["neighbours"]
    assert state["cards"] == [n["id"] for n in expected]
    assert state["preview"] == f"/covers/{target}"

    # the by selector asks again, by style
    Select(driver.find_element(By.ID, "by")).select_by_value("style")
    state = wait_for(driver, lambda s: s["state"] == "ok" and "by style" in s["status"],
                     "the style search")
    by_style = api.post("/similar", data={"id": target, "k": K, "by": "style"}).json()
    assert state["cards"] == [n["id"] for n in by_style["neighbours"]]

    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
    shot = tmp_path / "page.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # no script errors or CSP violations (the 415 of the bad upload is expected)
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and "status of 415" not in e["message"]]
    assert severe == []
