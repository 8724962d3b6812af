"""Generic load-timing helpers for the benchmarks: run a callable N times at concurrency C and
report throughput and latency percentiles; print rows as an aligned table.

    result = run_load(lambda: stub.Search(request), requests=200, concurrency=4)
    print(result.qps, result.p50_ms, result.p99_ms)
    results = run_interleaved({"raw": f, "grpc": g}, rounds=3, requests=50)  # fair under noise
    print_table([{"name": "raw", "qps": 10.0}, ...])
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, TextIO


@dataclass(frozen=True)
class LoadResult:
    """``requests`` calls that took ``seconds`` of wall time at ``concurrency``."""

    requests: int
    concurrency: int
    seconds: float
    latencies_ms: tuple[float, ...]

    @property
    def qps(self) -> float:
        """Calls per second (multiply by the batch size for items per second)."""
        return self.requests / self.seconds if self.seconds > 0 else math.inf

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def mean_ms(self) -> float:
        return sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else math.nan

    def merged(self, other: "LoadResult") -> "LoadResult":
        """Both runs together, as if measured back to back."""
        return LoadResult(
            self.requests + other.requests,
            self.concurrency,
            self.seconds + other.seconds,
            self.latencies_ms + other.latencies_ms,
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_load(call: Callable[[], object], requests: int, concurrency: int = 1, warmup: int = 0) -> LoadResult:
    """Call ``call`` ``requests`` times from ``concurrency`` threads (after ``warmup`` untimed
    calls); exceptions propagate after all threads stop."""
    for _ in range(warmup):
        call()
    concurrency = max(1, min(concurrency, requests))
    shares = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency + 1)

    def worker(slot: int) -> None:
        barrier.wait()
        try:
            for _ in range(shares[slot]):
                start = time.perf_counter()
                call()
                latencies[slot].append((time.perf_counter() - start) * 1000.0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return LoadResult(requests, concurrency, elapsed, tuple(x for part in latencies for x in part))


def run_interleaved(
    calls: Mapping[str, Callable[[], object]],
    rounds: int,
    requests: int,
    concurrency: int = 1,
    warmup: int = 1,
) -> dict[str, LoadResult]:
    """Measure several callables in alternating rounds so that background noise on a shared
    machine hits them alike; returns each one's merged result."""
    results: dict[str, LoadResult] = {}
    for round_number in range(rounds):
        for name, call in calls.items():
            result = run_load(call, requests, concurrency, warmup if round_number == 0 else 0)
            results[name] = results[name].merged(result) if name in results else result
    return results


def rss_mb() -> float:
    """Resident memory of this process in MiB (psutil, else /proc)."""
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _format(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return "-" if value is None else str(value)


def print_table(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None, file: TextIO | None = None
) -> None:
    """Rows of dicts as an aligned text table; missing cells print as '-'."""
    out = file or sys.stdout
    if not rows:
        return
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    cells = [[_format(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print(
            "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))), file=out
        )


# ------------------------------------------------------------------ time windows


@dataclass
class WindowCell:
    """One closed-loop measurement: items completed per second inside the measuring window, and
    the latency of the call that completed each of them."""

    per_s: float
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_ms, q) if self.latencies_ms else math.nan


def closed_loop(
    call: Callable[[int, int], int | None], workers: int, warmup_s: float, measure_s: float
) -> WindowCell:
    """``workers`` threads each run ``call(worker, i)`` back to back (``i``: that worker's
    request number, ``worker + k * workers``), for ``warmup_s`` and then ``measure_s`` seconds.
    ``call`` returns how many items it completed (None: one). Calls that finish inside the
    measuring window count, for throughput and for latency (once per item)."""
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + measure_s)
    lock = threading.Lock()
    done = 0
    latencies: list[float] = []
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        nonlocal done
        i = index
        while True:
            began = time.perf_counter()
            try:
                count = call(index, i)
            except BaseException as exc:  # surfaced after the run
                errors.append(exc)
                return
            ended = time.perf_counter()
            count = 1 if count is None else count
            i += workers
            if window[0] <= ended <= window[1]:
                with lock:
                    done += count
                    latencies.extend([(ended - began) * 1000] * count)
            if ended >= window[1]:
                return

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, first: {errors[0]!r}")
    return WindowCell(done / measure_s, latencies)


# ------------------------------------------------------------------ machine


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
