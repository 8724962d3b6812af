"""Dynamic batching: many concurrent callers, a few model threads, model calls of up to N items.

Callers hand in a stacked tensor of their items and get a future; ``workers`` worker threads
(one by default) take queued items up to ``max_batch_size`` (splitting a large submission across
model calls, merging small ones), run the model once per batch and route each output row back
to its caller. Nothing here knows about images, gRPC or the particular model. With two workers
one batch is computed while the next is gathered and the last one's rows are handed back; each
worker should then get its share of the cores (``on_worker_start`` sets its torch threads).

When the worker is idle and the first item arrives it may wait up to ``max_wait_s`` for more,
but only while callers have announced items still on their way (``reserve``: a request whose
images are being decoded). With no one else in flight it runs at once, so a lone caller never
pays the batching delay.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

#: The model: a batch (B, ...) in, a tuple of arrays with B rows each out.
RunBatch = Callable[[torch.Tensor], Sequence[np.ndarray]]


class BatchObserver(Protocol):
    """Told about every model call that succeeded (metrics, `services.embedder.metrics`)."""

    def batch_done(self, size: int, model_seconds: float, queue_waits: Sequence[float]) -> None:
        """``size`` items ran in ``model_seconds``; ``queue_waits``: for each submission that
        reached the model for the first time in this batch, seconds from submit to model call."""


class BatcherClosed(RuntimeError):
    """The batcher was shut down before this work could run."""


@dataclass
class _Job:
    inputs: torch.Tensor
    future: Future
    outputs: list[np.ndarray] | None = None
    taken: int = 0  # rows handed to the worker so far
    done: int = 0  # rows whose outputs are in place
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class BatcherStats:
    """Counters since start; ``mean_batch`` = items / batches."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    histogram: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class Reservation:
    """Items a caller has announced and will submit (or cancel); see ``DynamicBatcher.reserve``."""

    def __init__(self, batcher: "DynamicBatcher", count: int) -> None:
        self._batcher = batcher
        self._count = count

    def submit(self, inputs: torch.Tensor) -> Future:
        count, self._count = self._count, 0
        return self._batcher._submit(inputs, release=count)

    def cancel(self) -> None:
        count, self._count = self._count, 0
        if count:
            self._batcher._release(count)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc_info) -> None:
        self.cancel()


class DynamicBatcher:
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_wait_s: float,
        name: str = "batcher",
        on_worker_start: Callable[[], None] | None = None,
        workers: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._on_worker_start = on_worker_start
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # rows submitted and not yet taken by the worker
        self._reserved = 0  # rows announced and not yet submitted
        self._closed = False
        self._cond = threading.Condition()
        self.stats = BatcherStats()
        self.observer: BatchObserver | None = None
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    # ------------------------------------------------------------------ callers

    def reserve(self, count: int) -> Reservation:
        """Announce ``count`` items that will be submitted soon, so an idle worker waits for them
        (at most ``max_wait_s``) instead of running a smaller batch right away."""
        with self._cond:
            self._reserved += count
        return Reservation(self, count)

    def submit(self, inputs: torch.Tensor) -> Future:
        """Queue ``inputs`` (B, ...); the future gives a tuple of arrays with B rows each."""
        return self._submit(inputs, release=0)

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the batch in progress, fail everything still queued, stop the worker."""
        with self._cond:
            self._closed = True
            pending = list(self._jobs)
            self._jobs.clear()
            self._queued = 0
            self._cond.notify_all()
        for job in pending:
            _settle(job.future, error=BatcherClosed("the embedder is shutting down"))
        for worker in self._workers:
            if threading.current_thread() is not worker:
                worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ internals

    def _submit(self, inputs: torch.Tensor, *, release: int) -> Future:
        future: Future = Future()
        if inputs.ndim < 1 or inputs.shape[0] == 0:
            if release:
                self._release(release)
            future.set_result(())
            return future
        with self._cond:
            self._reserved -= release
            if self._closed:
                future.set_exception(BatcherClosed("the embedder is shutting down"))
                return future
            self._jobs.append(_Job(inputs, future))
            self._queued += int(inputs.shape[0])
            self._cond.notify_all()
        return future

    def _release(self, count: int) -> None:
        with self._cond:
            self._reserved -= count
            self._cond.notify_all()

    def _take_batch(self) -> list[tuple[_Job, int, int]] | None:
        """Block until there is work; return (job, start, stop) slices totalling <= max size."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while self._queued < self.max_batch_size and self._reserved > 0 and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            slices: list[tuple[_Job, int, int]] = []
            room = self.max_batch_size
            while room and self._jobs:
                job = self._jobs[0]
                count = min(room, job.size - job.taken)
                slices.append((job, job.taken, job.taken + count))
                job.taken += count
                room -= count
                self._queued -= count
                if job.taken == job.size:
                    self._jobs.popleft()
            return slices

    def _work(self) -> None:
        if self._on_worker_start is not None:
            self._on_worker_start()
        while True:
            slices = self._take_batch()
            if slices is None:
                return
            live = [(job, a, b) for job, a, b in slices if not job.future.done()]
            if not live:
                continue
            parts = [job.inputs[a:b] for job, a, b in live]
            batch = parts[0] if len(parts) == 1 else torch.cat(parts)
            started = time.perf_counter()
            try:
                outputs = self._run_batch(batch)
            except Exception as exc:  # the callers get it; the worker keeps serving
                log.exception("model call on a batch of %d failed", batch.shape[0])
                for job, _, _ in live:
                    _settle(job.future, error=exc)
                continue
            model_seconds = time.perf_counter() - started
            self._route(live, outputs, int(batch.shape[0]))
            if self.observer is not None:
                self._observe(
                    int(batch.shape[0]),
                    model_seconds,
                    [started - job.queued_at for job, a, _ in live if a == 0],
                )

    def _route(self, live: list[tuple[_Job, int, int]], outputs: Sequence[np.ndarray], size: int) -> None:
        """Copy each caller's rows out of a finished batch; under the lock, because another
        worker may be filling other rows of the same job."""
        finished: list[_Job] = []
        with self._cond:
            self._record(size)
            offset = 0
            for job, a, b in live:
                if job.future.done():
                    offset += b - a
                    continue
                if job.outputs is None:
                    job.outputs = [np.empty((job.size, *out.shape[1:]), dtype=out.dtype) for out in outputs]
                for target, out in zip(job.outputs, outputs):
                    target[a:b] = out[offset : offset + (b - a)]
                offset += b - a
                job.done += b - a
                if job.done == job.size:
                    finished.append(job)
        for job in finished:  # outside the lock: callbacks of the future run here
            _settle(job.future, result=tuple(job.outputs))

    def _observe(self, size: int, model_seconds: float, queue_waits: list[float]) -> None:
        try:
            self.observer.batch_done(size, model_seconds, queue_waits)
        except Exception:  # metrics must never stop the model worker
            log.exception("batch observer failed")

    def _record(self, size: int) -> None:
        stats = self.stats
        stats.batches += 1
        stats.items += size
        stats.largest = max(stats.largest, size)
        stats.histogram[size] = stats.histogram.get(size, 0) + 1


def _settle(future: Future, *, result=None, error: BaseException | None = None) -> None:
    """Resolve a future unless its caller already cancelled it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
