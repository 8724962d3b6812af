"""Errors raised by the indexer core, independent of gRPC (`common.errors`).

Each carries its status code; `common.serving.service_errors` maps it for the servicer, so the
core can say what went wrong in domain terms and stay testable without a server:

    InvalidArgument -> INVALID_ARGUMENT   (bad dimension, k, filter, id, ...; `common.errors`)
    LimitExceeded   -> RESOURCE_EXHAUSTED (batch over the configured limit; the limit is in the message)
    NotFound        -> NOT_FOUND          (unknown collection, unknown id on a strict delete; `common.errors`)
    IndexerError    -> FAILED_PRECONDITION (the store is closed, a peer to copy from is missing, ...)
    CorruptData     -> refuse to start     (snapshot or non-tail WAL corruption)
"""

from __future__ import annotations

from common.errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError

__all__ = ["CorruptData", "IndexerError", "InvalidArgument", "LimitExceeded", "NotFound"]


class IndexerError(ServiceError):
    """The indexer's own errors: its state does not allow the request."""

    status = "FAILED_PRECONDITION"


class LimitExceeded(ResourceExhausted):
    """The request is larger than a configured limit (batch size, k, message size)."""


class CorruptData(IndexerError):
    """Stored state (snapshot, WAL) is damaged in a way that cannot be repaired safely.

    The server refuses to start rather than serve partial data; the message names the file and
    what to do about it.
    """
