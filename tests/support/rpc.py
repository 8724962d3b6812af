"""Small helpers for asserting on gRPC outcomes: (response, code, details)."""

from __future__ import annotations

import grpc
import pytest


def rpc_error(method, request, timeout: float = 60) -> grpc.RpcError:
    """Call ``method(request)`` expecting it to fail; return the error, whose ``code()`` and
    ``details()`` the test then checks."""
    with pytest.raises(grpc.RpcError) as raised:
        method(request, timeout=timeout)
    return raised.value
