"""The errors every service's core raises on purpose, each carrying the gRPC status its caller
sees; ``str()`` is the status details, a message for a person.

No gRPC here, so the cores stay gRPC-free: ``status`` is the status code's name, and
`common.serving.service_errors` is the one place that turns a `ServiceError` into an aborted
RPC, for every servicer. Anything else a servicer lets escape is a bug: the server's interceptor
(`common.serving`) logs its traceback and answers INTERNAL.

Each service subclasses these for its own vocabulary (`services.indexer.errors`,
`services.embedder.core`, `services.gateway.domain`) and raises the shared ones directly.
"""

from __future__ import annotations

from typing import ClassVar

#: The gRPC status code names (grpc.StatusCode members) a ServiceError may carry.
STATUS_NAMES = frozenset(
    {
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)


class ServiceError(Exception):
    """Base of every error a core raises on purpose; ``status`` names the gRPC status code."""

    status: ClassVar[str] = "INTERNAL"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.status not in STATUS_NAMES:
            raise TypeError(f"{cls.__name__}.status={cls.status!r} is not a gRPC status code")

    def __str__(self) -> str:  # KeyError (NotFound) would quote its message; keep it readable
        return str(self.args[0]) if self.args else ""

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(ServiceError, ValueError):
    """The request cannot be served as given; retrying it unchanged will fail again."""

    status = "INVALID_ARGUMENT"


class NotFound(ServiceError, KeyError):
    """A named thing (collection, id, listing) does not exist."""

    status = "NOT_FOUND"


class AlreadyExists(ServiceError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    """The system is not in a state to serve this (e.g. a model without a text head)."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    """The request is larger than a configured limit; the message names the limit."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """Not now: a downstream is down or the service is shutting down; retrying later may work."""

    status = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    status = "DEADLINE_EXCEEDED"


class Unauthenticated(ServiceError):
    status = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    status = "PERMISSION_DENIED"


class Internal(ServiceError):
    """Not the caller's fault: a bug or a broken dependency; the message says which."""

    status = "INTERNAL"
