"""Errors that cross service boundaries, and their gRPC / HTTP status codes (mapped in one place)."""

from __future__ import annotations

import grpc
import redis

from seal.models import UnknownModelError


class PermanentError(Exception):
    """A task that can never succeed as given: the work plane dead-letters it without retrying."""


class InvalidArgument(PermanentError, ValueError):
    """The request is malformed; `field` names what to fix (e.g. "documents[0].questions")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(PermanentError, LookupError):
    """The named thing (job, adapter) does not exist here."""


class FailedPrecondition(PermanentError):
    """The system is not in a state where this can run (e.g. a backend that cannot train a policy)."""


class Refused(FailedPrecondition):
    """A refusal with a code of its own (no_verdict, expired, kill_switch, ...) that clients can branch
    on: gRPC FAILED_PRECONDITION with "<code>: <message>", HTTP 400 with {"error": {"code": <code>}}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Unauthenticated(Exception):
    """No credentials, or credentials nobody issued (a missing or unknown API token)."""


class PermissionDenied(Exception):
    """Authenticated, but the caller's role does not allow this."""


class ResourceExhausted(Exception):
    """A bounded resource is full (e.g. the gateway's watchers); retry later."""


# Exception type -> (gRPC status, HTTP status). Checked in order, so subclasses come first.
ERROR_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode, int], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (UnknownModelError, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (NotFound, grpc.StatusCode.NOT_FOUND, 404),
    # Google's mapping of FAILED_PRECONDITION to HTTP: 400, with a message saying what to change.
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    # Redis does not answer (down, restarting, still loading its data): the request may be retried.
    (redis.ConnectionError, grpc.StatusCode.UNAVAILABLE, 503),
    (redis.TimeoutError, grpc.StatusCode.UNAVAILABLE, 503),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, int]:
    for exc_type, grpc_code, http_code in ERROR_STATUS:
        if isinstance(exc, exc_type):
            return grpc_code, http_code
    return grpc.StatusCode.INTERNAL, 500
