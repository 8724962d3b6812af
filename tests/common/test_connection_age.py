"""Servers can recycle client connections after a set age (GOAWAY), which is what makes a
client with a ``dns:///`` target re-resolve it and find replicas added after it connected; no
call may fail because of it."""

from __future__ import annotations

import time

import grpc
import pytest

from common.serving import ServerLimits, create_server
from services.embedder.config import EmbedderConfig

pytestmark = pytest.mark.timeout(60)
PEER_METHOD = "/test.Peer/Get"


def _peer_server(limits: ServerLimits):
    """A real server whose one method answers with the caller's address as the server sees it
    (a new connection comes from a new client port)."""

    def register(server: grpc.Server) -> list[str]:
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: context.peer().encode())
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Peer", {"Get": handler})])
        return ["test.Peer"]

    server = create_server(register, "127.0.0.1:0", limits=limits)
    server.set_serving(True)
    return server


def _peers_seen(limits: ServerLimits, seconds: float) -> list[str]:
    server = _peer_server(limits)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            get = channel.unary_unary(PEER_METHOD)
            peers, deadline = [], time.monotonic() + seconds
            while time.monotonic() < deadline:
                peers.append(get(b"", timeout=10).decode())  # raises if any call fails
                time.sleep(0.05)
            return peers
    finally:
        server.stop(grace=0)


def test_connections_are_recycled_after_their_age_without_failing_a_call():
    peers = _peers_seen(ServerLimits(max_connection_age_s=0.5, max_connection_age_grace_s=1.0), seconds=3.0)
    assert len(peers) > 20
    assert len(set(peers)) >= 2, "the client kept one connection past its maximum age"


def test_without_an_age_the_client_keeps_its_connection():
    peers = _peers_seen(ServerLimits(), seconds=1.5)
    assert len(set(peers)) == 1


def test_the_embedder_recycles_connections_by_default_and_can_be_told_not_to(tmp_path, monkeypatch):
    monkeypatch.delenv("EMBEDDER_MAX_CONNECTION_AGE_S", raising=False)
    config = EmbedderConfig.from_env(["--artifact-dir", str(tmp_path)])
    assert config.server_limits().max_connection_age_s == 60.0
    monkeypatch.setenv("EMBEDDER_MAX_CONNECTION_AGE_S", "0")
    assert (
        EmbedderConfig.from_env(["--artifact-dir", str(tmp_path)]).server_limits().max_connection_age_s
        is None
    )
