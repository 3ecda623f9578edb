"""Cross-request micro-batching for the service (dynamic batching, as model servers do it).

Requests that arrive within a short window are answered as one batch: a request thread
reads and decodes its upload (in parallel with the batch being run), then :meth:`Batcher.call`
queues it and waits; one worker thread takes the first waiting request, then whatever else
arrives within ``window`` seconds of it, up to ``max_batch`` requests, and answers them with
one call of ``run`` (the engine's ``query_batch``: one forward pass, heads and search per
group). Under load the worker is busy while requests queue, so it takes up to ``max_batch``
of them at once without waiting; when idle, a lone request waits at most ``window``, and not
at all when it is the only one admitted (nothing else is being read or decoded that could join:
at concurrency 1 the window only added its 5 ms, docs/benchmarks.md).

The queue is bounded: at most ``max_pending`` requests are admitted and not yet answered
(decoding, queued or in the running batch); beyond that :meth:`Batcher.admit` refuses with
:class:`Overloaded`, which the service answers with 503 and ``Retry-After``.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from stylegen.errors import StylegenError

# Measured with scripts/load_test.py (docs/benchmarks.md, issue 24): a few milliseconds gather
# the requests of a small burst; under load the queue fills batches without waiting.
DEFAULT_MAX_BATCH = 16
DEFAULT_WINDOW_S = 0.005
DEFAULT_MAX_PENDING = 32  # below the server's 40 worker threads, so /healthz etc. still answer


class Overloaded(StylegenError):
    """The service's queue is full: answered 503 with ``Retry-After``."""

    http_status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Job:
    item: Any
    options: dict[str, Any]
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None


class Batcher:
    """Runs ``run(list of (item, options))`` -> one result or exception per request, from one
    worker thread (started on first use, a daemon), ``max_batch`` requests at a time."""

    def __init__(self, run: Callable[[Sequence[tuple[Any, dict[str, Any]]]], list[Any]], *,
                 max_batch: int = DEFAULT_MAX_BATCH, window: float = DEFAULT_WINDOW_S,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_batch < 1 or window < 0 or max_pending < 1:
            raise StylegenError("batch size and queue length must be >= 1 and the window >= 0")
        self.run = run
        self.max_batch = max_batch
        self.window = window
        self.max_pending = max_pending
        self.queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.pending = 0
        self.batches = 0  # batches run, and the requests they held (for tests and stats)
        self.answered = 0
        self.seconds_per_request = 0.05  # running estimate, for Retry-After
        self._guard = threading.Lock()
        self._worker: threading.Thread | None = None

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of the ``max_pending`` places while a request is read, queued and answered;
        :class:`Overloaded` when none is free."""
        with self._guard:
            if self.pending >= self.max_pending:
                wait = max(1, math.ceil(self.pending * self.seconds_per_request))
                raise Overloaded(f"the service is busy ({self.pending} requests waiting): try again in {wait} s",
                                 retry_after=wait)
            self.pending += 1
        try:
            yield
        finally:
            with self._guard:
                self.pending -= 1

    def call(self, item: Any, options: dict[str, Any]) -> Any:
        """The answer to one request, run in a batch with whatever else arrives (re-raises its error)."""
        self._start()
        job = _Job(item, options)
        self.queue.put(job)
        job.done.wait()
        if isinstance(job.result, BaseException):
            raise job.result
        return job.result

    def _start(self) -> None:
        with self._guard:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="stylegen-batcher", daemon=True)
                self._worker.start()

    def _take(self) -> list[_Job]:
        """The first waiting job, then more until ``max_batch`` or ``window`` after it arrived."""
        batch = [self.queue.get()]
        with self._guard:  # admitted through admit() and alone: nothing can join, run it at once
            alone = self.pending == 1 and self.queue.empty()
        deadline = batch[0].arrived + (0.0 if alone else self.window)
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            t0 = time.perf_counter()
            try:
                results = self.run([(j.item, j.options) for j in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} answers for {len(batch)} requests")
            except BaseException as exc:  # noqa: BLE001  (every waiting request hears of it)
                results = [exc] * len(batch)
            per = (time.perf_counter() - t0) / len(batch)
            with self._guard:
                self.batches += 1
                self.answered += len(batch)
                self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * per
            for job, result in zip(batch, results, strict=True):
                job.result = result
                job.done.set()
