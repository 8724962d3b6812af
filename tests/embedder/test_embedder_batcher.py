"""The dynamic batcher on its own, with a fake model: gathering, splitting, routing, failures."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from services.embedder.batcher import BatcherClosed, DynamicBatcher

pytestmark = pytest.mark.timeout(60)


class FakeModel:
    """Doubles each row and records the batch sizes it saw; can be told to block or fail."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_next = False

    def __call__(self, batch: torch.Tensor):
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(int(batch.shape[0]))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("model exploded")
        values = batch.numpy().reshape(batch.shape[0], -1)
        return values * 2, values.sum(axis=1, keepdims=True)


@pytest.fixture
def model():
    return FakeModel()


def rows(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count, dtype=torch.float32).reshape(count, 1)


def test_outputs_come_back_in_order_for_each_caller(model):
    batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.0)
    try:
        doubled, sums = batcher.submit(rows(10, 3)).result(5)
        np.testing.assert_array_equal(doubled[:, 0], [20, 22, 24])
        np.testing.assert_array_equal(sums[:, 0], [10, 11, 12])
    finally:
        batcher.close()


def test_concurrent_submissions_are_gathered_into_one_model_call(model):
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0)
    try:
        model.gate.clear()  # the model is busy with a first batch...
        first = batcher.submit(rows(0, 1))
        assert model.entered.wait(5)
        later = [batcher.submit(rows(100 * i, 2)) for i in range(1, 4)]  # ...while 3 more queue
        model.gate.set()
        first.result(5)
        results = [f.result(5) for f in later]
        assert model.batches == [1, 6]
        for i, (doubled, _) in enumerate(results, start=1):
            np.testing.assert_array_equal(doubled[:, 0], [200 * i, 200 * i + 2])
        assert batcher.stats.batches == 2 and batcher.stats.items == 7
    finally:
        batcher.close()


def test_a_large_submission_is_split_across_model_calls(model):
    batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.0)
    try:
        doubled, _ = batcher.submit(rows(0, 10)).result(5)
        np.testing.assert_array_equal(doubled[:, 0], np.arange(10) * 2)
        assert model.batches == [4, 4, 2]
    finally:
        batcher.close()


def test_idle_worker_waits_for_announced_items_but_not_for_nobody(model):
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=2.0)
    try:
        start = time.monotonic()
        batcher.submit(rows(0, 1)).result(5)  # nobody else announced: no waiting
        assert time.monotonic() - start < 1.0

        reservation = batcher.reserve(1)  # a request still decoding its image
        first = batcher.submit(rows(1, 1))
        time.sleep(0.1)
        second = reservation.submit(rows(2, 1))
        first.result(5), second.result(5)
        assert model.batches[-1] == 2  # the worker waited and ran both together

        with batcher.reserve(3):  # announced, then the request failed to decode
            pass
        start = time.monotonic()
        batcher.submit(rows(3, 1)).result(5)
        assert time.monotonic() - start < 1.0
    finally:
        batcher.close()


def test_a_failing_batch_fails_its_callers_and_the_worker_keeps_serving(model):
    batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.0)
    try:
        model.fail_next = True
        with pytest.raises(RuntimeError, match="model exploded"):
            batcher.submit(rows(0, 2)).result(5)
        doubled, _ = batcher.submit(rows(5, 1)).result(5)
        assert doubled[0, 0] == 10
    finally:
        batcher.close()


def test_close_fails_queued_work_and_refuses_new_work(model):
    batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0)
    model.gate.clear()
    running = batcher.submit(rows(0, 1))
    assert model.entered.wait(5)
    queued = batcher.submit(rows(1, 1))
    batcher.close(timeout=0)  # don't wait for the blocked model call
    model.gate.set()
    running.result(5)  # the batch in progress still finishes
    with pytest.raises(BatcherClosed):
        queued.result(5)
    with pytest.raises(BatcherClosed):
        batcher.submit(rows(2, 1)).result(5)


def test_two_workers_run_batches_side_by_side_and_reassemble_a_split_request():
    in_flight, most = [0], [0]
    lock = threading.Lock()
    both_running = threading.Barrier(2, timeout=10)

    def model(batch: torch.Tensor):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            both_running.wait()  # fails (BrokenBarrierError) unless two calls overlap
        except threading.BrokenBarrierError:
            pass
        with lock:
            in_flight[0] -= 1
        values = batch.numpy().reshape(batch.shape[0], -1)
        return (values * 2,)

    batcher = DynamicBatcher(model, max_batch_size=3, max_wait_s=0.0, workers=2)
    try:
        (doubled,) = batcher.submit(rows(0, 6)).result(20)  # split 3 + 3 over both workers
        assert doubled.ravel().tolist() == [0, 2, 4, 6, 8, 10]
        assert most[0] == 2
        assert batcher.stats.batches == 2 and batcher.stats.items == 6
    finally:
        batcher.close()
    with pytest.raises(ValueError, match="workers"):
        DynamicBatcher(model, max_batch_size=3, max_wait_s=0.0, workers=0)
