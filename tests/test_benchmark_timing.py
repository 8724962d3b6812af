"""The closed-loop timer the embedder and gateway benchmarks share: what it counts, and that a
failing call is reported rather than silently lowering the throughput."""

from __future__ import annotations

import pytest

from benchmarks._timing import closed_loop


def test_every_item_completed_in_the_window_counts_once_with_its_latency():
    seen: list[tuple[int, int]] = []

    def call(worker: int, i: int) -> int:
        seen.append((worker, i))
        return 3  # e.g. a batch of three images

    cell = closed_loop(call, workers=2, warmup_s=0.0, measure_s=0.2)
    assert len(cell.latencies_ms) == pytest.approx(cell.per_s * 0.2)
    assert len(cell.latencies_ms) % 3 == 0 and cell.per_s > 0
    for worker in (0, 1):  # each worker numbers its requests worker, worker + 2, worker + 4, ...
        numbers = [i for w, i in seen if w == worker]
        assert numbers == list(range(worker, worker + 2 * len(numbers), 2))


def test_a_call_returning_none_counts_as_one_item():
    cell = closed_loop(lambda worker, i: None, workers=1, warmup_s=0.0, measure_s=0.1)
    assert len(cell.latencies_ms) == round(cell.per_s * 0.1) > 0


def test_a_failing_call_fails_the_measurement():
    def call(worker: int, i: int) -> int:
        if i >= 2:
            raise ConnectionError("server went away")
        return 1

    with pytest.raises(RuntimeError, match="server went away"):
        closed_loop(call, workers=2, warmup_s=0.0, measure_s=5.0)
