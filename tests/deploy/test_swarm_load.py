"""scripts.swarm_load, the load client of `make swarm-check`, against a real stack: it counts
what it sends, retries UNAVAILABLE once on the next gateway in its target list (a gateway that
went away), and counts as failed what fails twice or with another code."""

from __future__ import annotations

import json
import socket

import pytest

from scripts import swarm_load
from tests.reliability.suite import Stack
from tests.support.photos import photo_files

pytestmark = pytest.mark.timeout(300)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture(scope="module")
def stack(tmp_path_factory, test_artifact):
    with Stack.start(
        tmp_path_factory.mktemp("swarm-load"),
        test_artifact,
        shards=1,
        bootstrap_listings=4,
        photos=4,
        text_model="off",
    ) as running:
        yield running


def run_load(tmp_path, targets: list[str], max_requests: int) -> dict:
    (tmp_path / "targets").write_text("\n".join(targets) + "\n")
    out = tmp_path / "load.json"
    code = swarm_load.main(
        [
            "--targets-file",
            str(tmp_path / "targets"),
            "--workers",
            "2",
            *[arg for photo in photo_files(2) for arg in ("--photo", str(photo))],
            "--stop-file",
            str(tmp_path / "stop"),
            "--max-seconds",
            "120",
            "--max-requests",
            str(max_requests),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_a_gateway_gone_from_the_list_costs_retries_not_failures(stack, tmp_path):
    result = run_load(tmp_path, [f"127.0.0.1:{closed_port()}", stack.address("gateway")], max_requests=24)
    assert result["sent"] >= 24 and result["failed"] == 0, result
    # every call first sent to the dead address was retried on the live one
    assert 0 < result["retried"] < result["sent"], result
    assert result["p50_ms"] > 0


def test_what_fails_twice_is_counted_as_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(swarm_load, "CALL_TIMEOUT_S", 1.0)
    result = run_load(tmp_path, [f"127.0.0.1:{closed_port()}"], max_requests=2)
    assert result["sent"] == result["failed"] >= 2 and result["retried"] == result["sent"], result
    assert set(result["errors"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
