"""One error base class carrying its gRPC status (`common.errors`) and one mapping for every
servicer (`common.serving.service_errors`)."""

from __future__ import annotations

import grpc
import pytest

from common import errors
from common.errors import ServiceError
from common.serving import MAX_DETAILS_BYTES, service_errors
from services.embedder.core import BadImages, EmbedderUnavailable, RequestError, TextNotServed
from services.gateway import domain
from services.indexer import errors as indexer_errors
from services.indexer.replication import ReplicaMismatch


class Aborted(Exception):
    pass


class RecordingContext:
    """What a servicer's context.abort receives (grpc's own raises to end the RPC too)."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    def abort(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details
        raise Aborted(details)


def mapped(error: BaseException) -> tuple[grpc.StatusCode | None, str | None]:
    context = RecordingContext()
    with pytest.raises(Aborted):
        with service_errors(context):
            raise error
    return context.code, context.details


@pytest.mark.parametrize(
    "error, code",
    [
        # indexer
        (indexer_errors.InvalidArgument("k must be in 1..1000 (got 0)"), "INVALID_ARGUMENT"),
        (indexer_errors.NotFound("no collection 'imgae'"), "NOT_FOUND"),
        (indexer_errors.LimitExceeded("2000 items in one request; the limit is 1024"), "RESOURCE_EXHAUSTED"),
        (indexer_errors.IndexerError("the index store is closed"), "FAILED_PRECONDITION"),
        (indexer_errors.CorruptData("snapshot damaged"), "FAILED_PRECONDITION"),
        (ReplicaMismatch("holds shard 0"), "FAILED_PRECONDITION"),
        # embedder
        (RequestError("no images: send at least one"), "INVALID_ARGUMENT"),
        (BadImages([(0, "not an image")], 1), "INVALID_ARGUMENT"),
        (EmbedderUnavailable("the embedder is shutting down"), "UNAVAILABLE"),
        (TextNotServed("text embeddings are not served"), "FAILED_PRECONDITION"),
        # gateway
        (domain.InvalidArgument("k must be at most 100"), "INVALID_ARGUMENT"),
        (domain.NotFound("no listing 'x'"), "NOT_FOUND"),
        (domain.AlreadyExists("listing 'x' exists"), "ALREADY_EXISTS"),
        (domain.FailedPrecondition("no text model"), "FAILED_PRECONDITION"),
        (domain.Unavailable("embedder at a:1 is unavailable"), "UNAVAILABLE"),
        (domain.DeadlineExceeded("the caller's deadline had expired"), "DEADLINE_EXCEEDED"),
        (domain.ResourceExhausted("17 images; the limit is 16"), "RESOURCE_EXHAUSTED"),
        (domain.Unauthenticated("no token"), "UNAUTHENTICATED"),
        (domain.PermissionDenied("wrong token"), "PERMISSION_DENIED"),
        (domain.DownstreamError("indexer shard 0: INTERNAL"), "INTERNAL"),
        (domain.GatewayError("the embedder returned no categories"), "INTERNAL"),
    ],
)
def test_each_services_errors_map_to_the_same_status_with_their_message(error, code):
    assert mapped(error) == (getattr(grpc.StatusCode, code), str(error))
    assert isinstance(error, ServiceError) and error.message == str(error)


def test_invalid_argument_and_not_found_are_declared_once():
    assert indexer_errors.InvalidArgument is domain.InvalidArgument is errors.InvalidArgument
    assert indexer_errors.NotFound is domain.NotFound is errors.NotFound
    assert issubclass(RequestError, errors.InvalidArgument)


def test_not_found_reads_like_a_sentence_though_it_is_a_key_error():
    error = errors.NotFound("no collection 'imgae'")
    assert isinstance(error, KeyError) and str(error) == "no collection 'imgae'"


def test_a_long_message_is_clipped_in_the_details():
    code, details = mapped(errors.InvalidArgument("unknown id " + "x" * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(details.encode()) <= MAX_DETAILS_BYTES and details.endswith("bytes, clipped)")


def test_other_exceptions_pass_on_to_the_interceptor():
    """Only ServiceErrors are mapped: anything else is a bug, INTERNAL with its traceback logged
    by the server's interceptor (`common.serving`)."""
    context = RecordingContext()
    with pytest.raises(ZeroDivisionError):
        with service_errors(context):
            raise ZeroDivisionError("a bug")
    assert context.code is None


def test_a_status_that_is_not_a_grpc_code_is_refused_when_declared():
    with pytest.raises(TypeError, match="is not a gRPC status code"):
        type("Teapot", (ServiceError,), {"status": "IM_A_TEAPOT"})
    for name in errors.STATUS_NAMES:
        assert isinstance(getattr(grpc.StatusCode, name), grpc.StatusCode)
