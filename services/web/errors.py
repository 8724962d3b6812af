"""gRPC status -> HTTP status, with the gateway's own message as the body's ``detail``.

The mapping is the usual one (google.rpc / grpc-gateway): bad input 400, missing 404, conflict
409, auth 401/403, a full server 429, a dead downstream 503, a timeout 504. ``detail`` is what
the page shows, so it is the gateway's words, not ours.
"""

from __future__ import annotations

import grpc

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

#: The code name given to the framework's own HTTP errors (a malformed multipart body, ...).
HTTP_CODE_NAMES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "RESOURCE_EXHAUSTED",
}


class EdgeError(Exception):
    """An answer other than 200: HTTP status, gRPC-style code name and a message for a person."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def from_rpc_error(error: grpc.RpcError, gateway: str) -> EdgeError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE and (
        "connect" in details or "Connection" in details or not details
    ):
        # the channel's own words ("failed to connect to all addresses ...") mean nothing to a user
        details = (
            f"The search service (gateway at {gateway}) is not reachable right now; "
            f"try again in a moment ({details or 'no answer'})"
        )
    return EdgeError(HTTP_STATUS.get(code, 500), code.name, details or code.name)
