"""Errors raised by the indexer core, independent of gRPC.

The servicer maps each class to one status code, so the core can say what went wrong in domain
terms and stay testable without a server:

    InvalidArgument -> INVALID_ARGUMENT   (bad dimension, k, filter, id, ...)
    LimitExceeded   -> RESOURCE_EXHAUSTED (batch over the configured limit; the limit is in the message)
    NotFound        -> NOT_FOUND          (unknown collection, unknown id on a strict delete)
    CorruptData     -> refuse to start     (snapshot or non-tail WAL corruption)
"""
from __future__ import annotations


class IndexerError(Exception):
    """Base class of every error the core raises on purpose."""


class InvalidArgument(IndexerError, ValueError):
    """The request cannot be served as given; retrying it unchanged will fail again."""


class LimitExceeded(IndexerError):
    """The request is larger than a configured limit (batch size, k, message size)."""


class NotFound(IndexerError, KeyError):
    """A named collection or id does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CorruptData(IndexerError):
    """Stored state (snapshot, WAL) is damaged in a way that cannot be repaired safely.

    The server refuses to start rather than serve partial data; the message names the file and
    what to do about it.
    """
