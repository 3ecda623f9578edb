#!/usr/bin/env python
"""API conformance: schemathesis against the served API of a small real index.

Builds a tiny index of generated covers (4 genres x 4, fp32, 8 + 8 PCA dims) with linear,
kNN and ensemble heads in a temporary folder (or uses ``--index``), serves it with uvicorn
on a free loopback port (the real ``Engine`` behind ``stylegen.apps.service.create_app``) and
runs ``st run http://127.0.0.1:PORT/openapi.json --checks all`` with a bounded number of
examples per operation. The server asks for a token, as ``stylegen serve --token`` does, and
schemathesis sends it (its ``ignored_auth`` check then tries each operation without it); the
rate limit is off, so that no request of the run is answered 429. Prints the number of
requests, the failures per check and the command; exits non-zero when schemathesis reports a
failure.

    pip install schemathesis            # or: pip install -e '.[conformance]'
    python scripts/schemathesis_run.py --max-examples 20 --max-time 300   # ~2,400 requests
    python scripts/schemathesis_run.py --also-accept 400,415              # see docs/benchmarks.md

``--also-accept`` adds statuses to what positive_data_acceptance expects from requests
schemathesis calls valid (PDF bytes as an image: 415; an image *and* an id copied from an
earlier response: 400); docs/benchmarks.md says why. Needs the ``st`` command (schemathesis
>= 4) on PATH; it runs in the temporary folder, so its ``.schemathesis/`` cache stays there.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

# schemathesis' default for positive_data_acceptance
POSITIVE_EXPECTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
GENRES = ("metal", "jazz", "pop", "electronic")
COLOURS = {"metal": (25, 20, 22), "jazz": (40, 70, 160), "pop": (235, 95, 170), "electronic": (40, 210, 190)}


def draw_cover(i: int, genre: str, size: int = 300):
    """A generated 'cover': a flat genre colour with a few lighter shapes."""
    from PIL import Image, ImageDraw

    rng = random.Random(i)
    base = COLOURS[genre]
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    accent = tuple(min(255, c + 60 + rng.randrange(40)) for c in base)
    for _ in range(3):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 10, size // 4)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=accent, width=5)
    return img


def build_index(root: Path, per_genre: int = 4) -> Path:
    """Generated covers embedded (fp32, 8 + 8 dims) with linear, kNN and ensemble heads."""
    import pandas as pd
    from threadpoolctl import threadpool_limits

    import stylegen
    from stylegen.config import CompressionConfig, EmbedConfig
    from stylegen.heads.train import train

    (root / "covers").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(per_genre * len(GENRES)):
        genre = GENRES[i % len(GENRES)]
        name = f"covers/cover_{i:02d}.jpg"
        draw_cover(i, genre).save(root / name, quality=90)
        rows.append({"image": name, "genre": genre, "artist": f"Artist {i}", "album": f"Album {i}"})
    pd.DataFrame(rows).to_csv(root / "covers.csv", index=False)
    cfg = EmbedConfig(compression=CompressionConfig(dims={"style": 8, "content": 8}))
    stylegen.embed(root / "covers.csv", root / "idx", cfg, workers=0, progress=False, precision="fp32")
    with threadpool_limits(1):
        train(root / "idx", heads=("linear", "knn", "ensemble"), validate=False)
    return root / "idx"


def start_server(index: Path, token: str) -> tuple[str, object, threading.Thread]:
    """The real engine behind the app (asking for ``token``, no rate limit), uvicorn in a
    thread on a free loopback port."""
    import uvicorn

    from stylegen.apps.service import create_app
    from stylegen.query.engine import Engine

    engine = Engine.open(index, device="cpu")
    engine.featurizer  # noqa: B018  (load the model before the first request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY on accepted sockets
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine, token=token, rate_limit=None)
    config = uvicorn.Config(app, log_level="error", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def count(ndjson: Path) -> tuple[int, Counter, Counter]:
    """(requests sent, failures per check, passes per check) from schemathesis' NDJSON events."""
    requests = 0
    failed: Counter = Counter()
    passed: Counter = Counter()
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        recorder = (event.get("ScenarioFinished") or {}).get("recorder") or {}
        requests += len(recorder.get("interactions", {}))
        for checks in recorder.get("checks", {}).values():
            for check in checks:
                if check.get("status") == "success":
                    passed[check["name"]] += 1
                elif check.get("status") != "skip":
                    failed[check["name"]] += 1
    return requests, failed, passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="serve this index instead of building a tiny one")
    parser.add_argument("--max-examples", type=int, default=100, help="per operation and phase")
    parser.add_argument("--max-time", type=int, default=900, help="seconds for the whole st run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", default="1")
    parser.add_argument("--report-dir", type=Path, default=None, help="keep schemathesis' reports here")
    parser.add_argument("--also-accept", default="",
                        help="statuses (e.g. 400,415) positive_data_acceptance also accepts from "
                             "requests schemathesis calls valid; see docs/benchmarks.md for why")
    parser.add_argument("st_args", nargs="*", help="more arguments for `st run` (after --)")
    args = parser.parse_args(argv)
    st = shutil.which("st")
    if st is None:
        raise SystemExit("the `st` command is missing: pip install schemathesis")

    with tempfile.TemporaryDirectory(prefix="stylegen-st-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        index = args.index or build_index(tmp_path)
        print(f"index {index} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        token = secrets.token_urlsafe(16)
        url, server, thread = start_server(index, token)
        report_dir = args.report_dir or tmp_path / "report"
        command = [st]
        if args.also_accept:
            statuses = [*POSITIVE_EXPECTED, *args.also_accept.split(",")]
            config = tmp_path / "schemathesis.toml"
            config.write_text("[checks.positive_data_acceptance]\nexpected-statuses = "
                              + json.dumps(statuses) + "\n")
            command += ["--config-file", str(config)]
        command += ["run", f"{url}/openapi.json", "--checks", "all",
                   "--max-examples", str(args.max_examples), "--max-time", str(args.max_time),
                   "--seed", str(args.seed), "--workers", str(args.workers), "--no-color",
                   "--generation-database", "none", "--report", "ndjson",
                   "--report-dir", str(report_dir), "--header", f"Authorization: Bearer {token}",
                   *args.st_args]
        print("$ " + " ".join(command).replace(token, "TOKEN"), flush=True)
        try:
            t0 = time.perf_counter()
            run = subprocess.run(command, check=False, cwd=tmp_path)  # its .schemathesis/ cache stays there
            wall = time.perf_counter() - t0
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        files = sorted(report_dir.glob("*.ndjson"))
        if not files:
            print("no schemathesis report was written", file=sys.stderr)
            return 1
        requests, failed, passed = count(files[-1])
    print(f"\nschemathesis: {requests} requests in {wall:.0f} s, exit code {run.returncode}")
    print("| check | passed | failed |\n|---|---:|---:|")
    for name in sorted(set(failed) | set(passed)):
        print(f"| {name} | {passed[name]} | {failed[name]} |")
    print(f"failures: {sum(failed.values())}")
    return 1 if run.returncode or failed else 0


if __name__ == "__main__":
    sys.exit(main())
