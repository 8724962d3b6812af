"""``auto``'s choice among runtimes that pass the check: by a speed trial in which the candidates
take turns, so a burst of load elsewhere on the machine does not decide it.

The sessions here are stand-ins with a known cost per photo (they sleep), so which one is the
fastest is known; the real runtimes are checked against torch in tests/embedder.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.runtimes import RuntimeUnavailable, choose_session, speed_trial

INPUTS = np.ones((4, 3, 8, 8), np.float32)


class TimedSession:
    """Returns the input's mean as its one output after sleeping ``per_photo`` seconds per photo;
    ``slow_runs`` makes the given run numbers (0 = warm-up) ten times slower, as load would."""

    def __init__(
        self,
        runtime: str,
        per_photo: float,
        *,
        precision: str = "fp32",
        slow_runs: tuple[int, ...] = (),
        scale: float = 1.0,
    ) -> None:
        self.runtime, self.precision = runtime, precision
        self.per_photo, self.slow_runs, self.scale = per_photo, slow_runs, scale
        self.runs = 0

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        slow = 10 if self.runs in self.slow_runs else 1
        self.runs += 1
        time.sleep(self.per_photo * len(batch) * slow)
        return (batch.reshape(len(batch), -1)[:, :4] * self.scale,)


def choose(candidates: dict[str, TimedSession], reference: TimedSession, setting: str = "auto"):
    def open_candidate(runtime: str, precision: str):
        if runtime not in candidates:
            raise RuntimeUnavailable(f"runtime {runtime} is not installed here")
        return candidates[runtime]

    return choose_session(setting, "fp32", reference=reference, inputs=INPUTS, open_candidate=open_candidate)


def test_the_speed_trial_ranks_sessions_by_their_cost_per_photo():
    sessions = [TimedSession("a", 0.004), TimedSession("b", 0.001), TimedSession("c", 0.002)]
    seconds = speed_trial(sessions, INPUTS, rounds=2)
    assert seconds.index(min(seconds)) == 1 and seconds[0] > seconds[2] > seconds[1]
    assert seconds[1] >= 0.001  # per photo, not per batch run
    assert all(session.runs == 3 for session in sessions)  # a warm-up and two timed runs each


def test_auto_keeps_the_fastest_runtime_even_when_a_load_burst_slows_one_of_its_runs():
    # openvino is 3x faster than onnxruntime, but its check run (run 1) and first timed run
    # (run 3, after the trial's warm-up) are slowed by load: judged by one run it would lose
    reference = TimedSession("torch", 0.006)
    fast = TimedSession("openvino", 0.001, slow_runs=(1, 3))
    slow = TimedSession("onnxruntime", 0.003)
    choice = choose({"onnxruntime": slow, "openvino": fast}, reference)
    assert choice.session is fast and choice.check.runtime == "openvino"
    assert set(choice.speeds) == {"torch/fp32", "onnxruntime/fp32", "openvino/fp32"}
    assert choice.speeds["openvino/fp32"] == min(choice.speeds.values())
    assert choice.check.seconds_per_photo > choice.speeds["onnxruntime/fp32"]  # the slow check run


def test_auto_serves_torch_when_torch_is_the_fastest():
    reference = TimedSession("torch", 0.001)
    choice = choose({"onnxruntime": TimedSession("onnxruntime", 0.004)}, reference)
    assert choice.session is reference and choice.check is None
    assert choice.speeds["torch/fp32"] < choice.speeds["onnxruntime/fp32"]
    assert any("openvino is not installed" in reason for reason in choice.passed_over)


def test_a_faster_runtime_that_fails_the_check_is_not_chosen():
    reference = TimedSession("torch", 0.004)
    wrong = TimedSession("openvino", 0.0005, scale=-1.0)  # fast, but its embeddings point away
    right = TimedSession("onnxruntime", 0.002)
    choice = choose({"onnxruntime": right, "openvino": wrong}, reference)
    assert choice.session is right
    assert "openvino/fp32" not in choice.speeds
    assert any(reason.startswith("openvino/fp32: fails the check") for reason in choice.passed_over)


def test_an_explicit_runtime_is_not_timed_against_the_others():
    reference = TimedSession("torch", 0.001)
    slow = TimedSession("onnxruntime", 0.004)
    choice = choose({"onnxruntime": slow}, reference, setting="onnxruntime")
    assert choice.session is slow and choice.speeds == {}
    with pytest.raises(
        RuntimeUnavailable,
        match="refusing runtime=openvino precision=fp32: runtime openvino is not installed",
    ):
        choose({"onnxruntime": slow}, reference, setting="openvino")
