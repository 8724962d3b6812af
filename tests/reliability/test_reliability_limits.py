"""Limits every server sets deliberately (`common.serving.ServerLimits`) and how going over them
is answered, checked on small in-process servers (no model): message size, concurrent RPCs,
undecodable requests, and status messages that echo a caller's input. The real services' limits
under bad input are exercised end to end by the fuzz in `test_reliability_stack`."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from common.serving import MAX_DETAILS_BYTES, MiB, ServerLimits, clip_details, create_server
from marketplace.indexer.v1 import indexer_pb2

pytestmark = pytest.mark.timeout(120)
SERVICE = "reliability.test.Probe"


def _server(limits: ServerLimits, behaviour, deserializer=None):
    """A server with one unary method ``/reliability.test.Probe/Call``."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=deserializer, response_serializer=lambda b: b
            )
        },
    )

    def register(server):
        server.add_generic_rpc_handlers((handler,))
        return [SERVICE]

    server = create_server(register, "127.0.0.1:0", limits=limits)
    server.set_serving(True)
    return server


def _call(port: int, data: bytes, timeout: float = 10.0):
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 * MiB)]
    ) as channel:
        rpc = channel.unary_unary(
            f"/{SERVICE}/Call", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            return grpc.StatusCode.OK, rpc(data, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), error.details()


def test_every_service_sets_its_limits_deliberately(test_artifact):
    from services.embedder.config import EmbedderConfig
    from services.gateway.config import GatewayConfig
    from services.indexer.config import IndexerConfig

    default_grpc = 4 * MiB
    indexer = IndexerConfig.from_env([]).limits
    embedder = EmbedderConfig(artifact_dir=test_artifact)
    gateway = GatewayConfig()
    assert indexer.max_receive_bytes == 64 * MiB != default_grpc
    # a full request of maximum-size photos, capped at the embedder's ceiling (256 MiB)
    assert embedder.server_limits().max_receive_bytes == min(
        embedder.max_batch * embedder.max_image_bytes + 64 * 1024, 256 * MiB
    )
    assert gateway.max_message_bytes == 16 * MiB >= embedder.max_image_bytes  # one full photo fits
    assert (gateway.max_k, gateway.max_images) == (100, 16)
    assert IndexerConfig.from_env([]).max_k == 1000 and embedder.max_batch == 32
    for limits in (indexer, embedder.server_limits()):
        assert limits.max_concurrent_rpcs and limits.max_workers


def test_gateway_message_limit_comes_from_the_environment(monkeypatch):
    from services.gateway.config import GatewayConfig

    monkeypatch.setenv("GATEWAY_MAX_MESSAGE_MB", "5")
    assert GatewayConfig.from_env([]).max_message_bytes == 5 * MiB


def test_over_the_receive_limit_is_resource_exhausted_naming_the_limit():
    server = _server(ServerLimits(max_receive_bytes=1 * MiB), lambda request, context: b"ok")
    try:
        assert _call(server.port, b"x" * (MiB - 100)) == (grpc.StatusCode.OK, b"ok")
        code, details = _call(server.port, b"x" * (MiB + 1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(MiB) in details
        assert _call(server.port, b"small") == (grpc.StatusCode.OK, b"ok")
    finally:
        server.stop(0)


def test_over_the_concurrency_limit_is_resource_exhausted_and_then_served_again():
    release = threading.Event()

    def slow(request, context):
        release.wait(10)
        return b"done"

    server = _server(ServerLimits(max_concurrent_rpcs=2, max_workers=4), slow)
    try:
        with futures.ThreadPoolExecutor(6) as pool:
            calls = [pool.submit(_call, server.port, b"x") for _ in range(2)]
            time.sleep(0.5)  # the first two are in flight
            rejected = [pool.submit(_call, server.port, b"x") for _ in range(3)]
            codes = [call.result(10)[0] for call in rejected]
            release.set()
            assert [call.result(10)[0] for call in calls] == [grpc.StatusCode.OK] * 2
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        assert _call(server.port, b"x")[0] == grpc.StatusCode.OK
    finally:
        release.set()
        server.stop(0)


def test_undecodable_request_is_invalid_argument_not_internal():
    server = _server(
        ServerLimits(), lambda request, context: b"ok", deserializer=indexer_pb2.SearchRequest.FromString
    )
    try:
        code, details = _call(server.port, b"\xff\xff\xff\xff")
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"/{SERVICE}/Call" in details and "not a valid" in details
        valid = indexer_pb2.SearchRequest(k=3).SerializeToString()
        assert _call(server.port, valid) == (grpc.StatusCode.OK, b"ok")
    finally:
        server.stop(0)


def test_long_status_messages_are_clipped_so_the_client_still_gets_them():
    def echo(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, clip_details(f"listing {request.decode()} not found"))

    server = _server(ServerLimits(), echo, deserializer=lambda b: b)
    try:
        for listing_id in ("x" * 100_000, "\U0001f600" * 20_000):
            code, details = _call(server.port, listing_id.encode())
            assert code == grpc.StatusCode.NOT_FOUND and details.startswith("listing ")
            assert "clipped" in details and len(details.encode()) <= MAX_DETAILS_BYTES
    finally:
        server.stop(0)
    assert clip_details("short") == "short"
