#!/usr/bin/env python
"""Loopback load test of the stylegen service.

Starts the service in this process (uvicorn in a thread, 127.0.0.1 only), sends N requests
at a fixed concurrency, alternately to /similar and /classify, each uploading a real cover,
and prints a markdown report: p50/p95 latency per endpoint, throughput, errors and this
process's resident memory before and after.

    python scripts/load_test.py --index indexes/covers --covers ../shared/data/discogs-styles/covers.csv
    python scripts/load_test.py --fake -n 200 --concurrency 8     # service overhead only
    python scripts/load_test.py --index indexes/covers --covers ../shared/data/discogs-styles/covers.csv \
        --compare --concurrency 1,4,16 -n 400                     # unbatched vs batched, same run

Uploads the index already holds (same bytes) are answered from stored vectors by hash, which
flatters the figures, so they are left out (and counted) unless ``--include-indexed``: load
test with covers the index does not hold. ``--compare`` runs, for each concurrency, the
service one request at a time (``batch_size=1``, the baseline) and micro-batched, alternately,
and prints the ratio. ``--sweep-window`` / ``--sweep-batch`` try other batching settings.
Client and server share one process (and its GIL), so latencies include client overhead.
"""

from __future__ import annotations

import argparse
import csv
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench_coldstart import cpu_line

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COVERS = REPO.parent / "shared" / "data" / "covers" / "covers.csv"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
ENDPOINTS = ("/similar", "/classify")


# --------------------------------------------------------------------------- inputs


def list_covers(source: Path, limit: int) -> list[Path]:
    """Up to ``limit`` image files from a folder or a CSV manifest (``image`` column)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8") as f:
            files = [source.parent / row["image"] for row in csv.DictReader(f)]
    else:
        raise SystemExit(f"covers must be a folder or a .csv manifest: {source}")
    files = [p for p in files if p.is_file()][:limit]
    if not files:
        raise SystemExit(f"no cover images found in {source}")
    return files


class FakeEngine:
    """A stand-in engine for measuring the service alone: cheap, deterministic answers.

    Implements what ``stylegen.apps.service.create_app`` needs (``query``, ``cover_path``,
    ``info``); an upload is opened and shrunk, as a model's preprocessing would.
    """

    GENRES = ("rock", "metal", "jazz", "pop", "electronic", "hip-hop")

    def __init__(self, covers: list[Path]) -> None:
        self.covers = covers

    def _row(self, cover_id: int) -> int:
        from stylegen.errors import UnknownCoverError

        if not 0 <= cover_id < len(self.covers):
            raise UnknownCoverError(f"unknown cover id {cover_id}")
        return cover_id

    def _genres(self, seed: int, top: int) -> list[dict]:
        weights = [((seed * 31 + i * 17) % 97) + 1 for i in range(len(self.GENRES))]
        total = sum(weights)
        ranked = sorted(zip(self.GENRES, weights, strict=True), key=lambda gw: -gw[1])[:top]
        return [{"genre": g, "probability": w / total, "path": [g]} for g, w in ranked]

    def _neighbours(self, seed: int, k: int, query: int | None) -> list[dict]:
        n = len(self.covers)
        ids = [(seed + 7 * i) % n for i in range(min(k, n))]
        return [{"id": i, "similarity": 1.0 - r / (2 * k), "genres": [self.GENRES[i % 6]],
                 "artist": "", "album": self.covers[i].stem, "is_query": i == query}
                for r, i in enumerate(ids)]

    def query(self, item, *, top: int = 3, method: str | None = None, k: int = 0,
              by: str = "both", classify: bool = True, label: str | None = None, explain: bool = False):
        from types import SimpleNamespace

        from stylegen.sources.images import open_image

        row, size = None, None
        if isinstance(item, int):
            row = self._row(item)
            seed = row
        else:
            image = open_image(item, draft_size=224)
            image.resize((64, 64))  # touch the pixels, as a model would
            size = image.size
            seed = sum(size)
        return SimpleNamespace(
            row=row, size=size, method="head" if classify else None,
            genres=self._genres(seed, top) if classify else [], levels={},
            neighbours=self._neighbours(seed, k, row) if k else [])

    def cover_path(self, cover_id: int) -> Path:
        return self.covers[self._row(cover_id)]

    def info(self) -> dict:
        return {"count": len(self.covers), "backbone": "fake", "parts": [],
                "genres": list(self.GENRES)}


# --------------------------------------------------------------------------- measuring


def resident_bytes() -> int | None:
    """This process's resident memory (psutil if installed, else /proc/self/status)."""
    try:
        import psutil
    except ImportError:
        try:
            return parse_vmrss(Path("/proc/self/status").read_text())
        except OSError:
            return None
    return psutil.Process().memory_info().rss


def parse_vmrss(status: str) -> int | None:
    """Bytes from the ``VmRSS:   123456 kB`` line of /proc/<pid>/status."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            return int(value) * {"kB": 1024, "mB": 1024**2}.get(unit, 1)
    return None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def new_covers(engine, payloads: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], int]:
    """The uploads whose bytes the index does not hold, and how many it does hold."""
    from stylegen.sources.images import hash_bytes

    rows = engine.index.lookup_hashes([hash_bytes(data) for _, data in payloads])
    fresh = [p for p, row in zip(payloads, rows, strict=True) if row is None]
    return fresh, len(payloads) - len(fresh)


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    messages: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, endpoint: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.latencies[endpoint].append(seconds)
            if error:
                self.errors[endpoint] += 1
                self.messages[error] = self.messages.get(error, 0) + 1


def run_load(base_url: str, payloads: list[tuple[str, bytes]], *, requests: int,
             concurrency: int, max_seconds: float, k: int, top: int, by: str) -> tuple[Tally, float]:
    """Send ``requests`` requests (or stop at ``max_seconds``); returns the tally and wall time."""
    tally = Tally()
    counter = iter(range(requests))
    counter_lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    with httpx.Client(base_url=base_url, timeout=60, limits=limits) as client:
        def worker() -> None:
            while time.perf_counter() < deadline:
                with counter_lock:
                    i = next(counter, None)
                if i is None:
                    return
                endpoint = ENDPOINTS[i % 2]
                name, data = payloads[(i // 2) % len(payloads)]
                params = {"k": k, "by": by} if endpoint == "/similar" else {"top": top}
                t0 = time.perf_counter()
                try:
                    r = client.post(endpoint, files={"image": (name, data)}, data=params)
                    error = None if r.status_code == 200 else f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                tally.add(endpoint, time.perf_counter() - t0, error)

        with ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(concurrency)]:
                future.result()
    return tally, time.perf_counter() - started


def all_latencies(tally: Tally) -> list[float]:
    return [x for lat in tally.latencies.values() for x in lat]


def report(tally: Tally, wall: float, rss_before: int | None, rss_after: int | None,
           settings: str) -> str:
    """The markdown report."""
    def ms(seconds: float) -> str:
        return f"{1000 * seconds:.1f}"

    def mib(n: int | None) -> str:
        return "n/a" if n is None else f"{n / 2**20:.0f} MiB"

    lines = [f"**Load test** ({settings})", "",
             "| endpoint | requests | errors | p50 ms | p95 ms | max ms | mean ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    total = 0
    for endpoint in ENDPOINTS:
        lat = tally.latencies[endpoint]
        total += len(lat)
        if lat:
            lines.append(f"| {endpoint} | {len(lat)} | {tally.errors[endpoint]} | "
                         f"{ms(percentile(lat, 50))} | {ms(percentile(lat, 95))} | "
                         f"{ms(max(lat))} | {ms(statistics.fmean(lat))} |")
        else:
            lines.append(f"| {endpoint} | 0 | 0 | - | - | - | - |")
    errors = sum(tally.errors.values())
    lines += ["", "| total requests | errors | wall s | throughput req/s | RSS before | RSS after |",
              "|---:|---:|---:|---:|---:|---:|",
              (f"| {total} | {errors} | {wall:.1f} | {total / wall if wall else 0:.1f} | "
               f"{mib(rss_before)} | {mib(rss_after)} |")]
    if tally.messages:
        lines += ["", "Errors:"] + [f"- {n} x {m}" for m, n in sorted(tally.messages.items())]
    return "\n".join(lines)


# --------------------------------------------------------------------------- server


def start_server(app) -> tuple[str, object, threading.Thread]:
    """uvicorn in a daemon thread on a free loopback port; returns (url, server, thread)."""
    import uvicorn

    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says TCP; with proto 0 every keep-alive response waited ~40 ms for
    # the client's delayed ACK (Nagle), which `stylegen serve` (uvicorn binding itself) never did
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def parse_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def run_one(engine, payloads, settings: dict, concurrency: int, args) -> dict:
    """One server with ``settings``, a warm-up, then ``args.requests`` requests; the figures."""
    from stylegen.apps.service import create_app

    app = create_app(engine, rate_limit=None, **settings)  # measures throughput, not the limiter
    url, server, thread = start_server(app)
    try:
        httpx.get(f"{url}/healthz", timeout=10).raise_for_status()
        run_load(url, payloads[-2 * concurrency:], requests=2 * concurrency, concurrency=concurrency,
                 max_seconds=30, k=args.k, top=args.top, by=args.by)  # warm-up, not counted
        batcher = app.state.service.batcher
        batches0, answered0 = batcher.batches, batcher.answered
        rss_before = resident_bytes()
        tally, wall = run_load(url, payloads, requests=args.requests, concurrency=concurrency,
                               max_seconds=args.max_seconds, k=args.k, top=args.top, by=args.by)
        rss_after = resident_bytes()
        batches, answered = batcher.batches - batches0, batcher.answered - answered0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    lat = all_latencies(tally)
    return {"tally": tally, "wall": wall, "rss": (rss_before, rss_after), "n": len(lat),
            "errors": sum(tally.errors.values()), "rate": len(lat) / wall if wall else 0.0,
            "p50": percentile(lat, 50), "p95": percentile(lat, 95),
            "mean_batch": answered / batches if batches else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", type=Path, help="index directory for stylegen.query.engine.Engine")
    source.add_argument("--fake", action="store_true", help="a fake engine: service overhead only")
    parser.add_argument("--covers", type=Path, default=DEFAULT_COVERS,
                        help="folder or CSV manifest of covers to upload (default: %(default)s)")
    parser.add_argument("-n", "--requests", type=int, default=500)
    parser.add_argument("--concurrency", default="8", help="one or more, comma-separated: 1,4,16")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--max-covers", type=int, default=400, help="distinct covers to upload")
    parser.add_argument("--include-indexed", action="store_true",
                        help="also upload covers the index holds (answered by hash: flattering)")
    parser.add_argument("-k", type=int, default=12)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--by", choices=("style", "content", "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=None, help="service micro-batch (default: the service's)")
    parser.add_argument("--batch-window-ms", type=float, default=None)
    parser.add_argument("--decode-slots", type=int, default=None)
    parser.add_argument("--forward-batch", type=int, default=None, help="featurizer chunk of a batch")
    parser.add_argument("--sweep-forward", default="", help="featurizer chunks to try, e.g. 1,4,16")
    parser.add_argument("--compare", action="store_true", help="also run one request at a time (batch size 1)")
    parser.add_argument("--sweep-window", default="", help="batch windows to try, ms, e.g. 0,2,5,10,20")
    parser.add_argument("--sweep-batch", default="", help="batch sizes to try, e.g. 4,8,16,32")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting (alternating); best kept")
    args = parser.parse_args(argv)
    concurrencies = parse_list(args.concurrency)
    if args.requests < 1 or not concurrencies or min(concurrencies) < 1 or args.max_seconds <= 0:
        parser.error("--requests, --concurrency and --max-seconds must be positive")

    files = list_covers(args.covers, 100_000 if not args.fake else args.max_covers)
    payloads = [(p.name, p.read_bytes()) for p in files]
    held = 0
    if args.fake:
        engine = FakeEngine(files)
    else:
        from stylegen.query.engine import Engine

        engine = Engine.open(args.index)
        engine.featurizer  # noqa: B018  (loaded before any timing)
        if not args.include_indexed:
            payloads, held = new_covers(engine, payloads)
            if not payloads:
                raise SystemExit(f"every cover of {args.covers} is in the index: upload covers it does not hold "
                                 "(e.g. --covers ../shared/data/discogs-styles/covers.csv), or --include-indexed")
    payloads = payloads[: args.max_covers]
    base = {k: v for k, v in (("batch_size", args.batch_size), ("batch_window_ms", args.batch_window_ms),
                               ("decode_slots", args.decode_slots), ("forward_batch", args.forward_batch))
            if v is not None}
    variants: list[tuple[str, dict]] = []
    if args.compare:
        variants.append(("one at a time", {**base, "batch_size": 1, "batch_window_ms": 0}))
    variants.append(("batched", base))
    for w in parse_list(args.sweep_window, float):
        variants.append((f"window {w:g} ms", {**base, "batch_window_ms": w}))
    for b in parse_list(args.sweep_batch):
        variants.append((f"batch {b}", {**base, "batch_size": b}))
    for b in parse_list(args.sweep_forward):
        variants.append((f"forward chunk {b}", {**base, "forward_batch": b}))

    print(cpu_line())
    engine_name = "fake engine" if args.fake else f"index {args.index}"
    print(f"{engine_name}; {len(payloads)} distinct uploads from {args.covers}"
          + ("" if args.fake or args.include_indexed else f" that the index does not hold ({held} it holds left out)")
          + f"; {args.requests} requests per run, alternately /similar (k={args.k}, by={args.by}) and "
            f"/classify (top={args.top}); best of {args.repeats}\n")
    results: dict[tuple[str, int], dict] = {}
    for concurrency in concurrencies:
        for _ in range(args.repeats):
            for name, settings in variants:
                r = run_one(engine, payloads, settings, concurrency, args)
                key = (name, concurrency)
                if key not in results or r["rate"] > results[key]["rate"]:
                    results[key] = r
    print("| service | concurrency | requests | errors | uploads/s | x one at a time | p50 ms | p95 ms "
          "| mean batch |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in concurrencies:
        ref = results.get(("one at a time", concurrency))
        for name, _ in variants:
            r = results[(name, concurrency)]
            ratio = f"{r['rate'] / ref['rate']:.2f}" if ref else "-"
            print(f"| {name} | {concurrency} | {r['n']} | {r['errors']} | {r['rate']:.1f} | {ratio} | "
                  f"{1000 * r['p50']:.0f} | {1000 * r['p95']:.0f} | {r['mean_batch']:.1f} |")
    if len(variants) == 1 and len(concurrencies) == 1:
        r = results[(variants[0][0], concurrencies[0])]
        print()
        print(report(r["tally"], r["wall"], *r["rss"], f"{engine_name}, concurrency {concurrencies[0]}"))
    print()
    print(cpu_line())
    errors = sum(r["errors"] for r in results.values())
    messages: dict[str, int] = {}
    for r in results.values():
        for m, n in r["tally"].messages.items():
            messages[m] = messages.get(m, 0) + n
    if messages:
        print("\nErrors:\n" + "\n".join(f"- {n} x {m}" for m, n in sorted(messages.items())))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
