"""Every error a client can see: one base class, each subclass with its status and stable code.

The message is for people and may change; the code is the contract. Messages never carry
paths, tracebacks or anything else from the server's inside.
"""

from __future__ import annotations


class FastServeError(Exception):
    """Base of every error fastserve answers with; ``status`` and ``code`` are fixed per subclass."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class MalformedBody(FastServeError):
    status, code = 400, "malformed_body"


class UnknownOutput(FastServeError):
    """A request named an output the version does not have (the message lists what it has)."""

    status, code = 400, "unknown_output"


class Unauthorized(FastServeError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"www-authenticate": "Bearer"})


class DeployDisabled(FastServeError):
    status, code = 403, "deploy_disabled"


class UnknownModel(FastServeError):
    status, code = 404, "unknown_model"


class UnknownVersion(FastServeError):
    status, code = 404, "unknown_version"


class UnknownRoute(FastServeError):
    status, code = 404, "not_found"


class MethodNotAllowed(FastServeError):
    status, code = 405, "method_not_allowed"


class DeployConflict(FastServeError):
    """A deployment action that makes no sense in the current state (promote with no candidate)."""

    status, code = 409, "deploy_conflict"


class VersionNotReady(FastServeError):
    """An action on a version that is loading: it is routable only once warm in every worker."""

    status, code = 409, "version_not_ready"


class StateUnavailable(FastServeError):
    """The deployment state cannot be read or written (locked past the wait, gone, disk full):
    serving goes on with the current routes; the action may be tried again."""

    status, code = 503, "state_unavailable"


class BodyTimeout(FastServeError):
    status, code = 408, "body_timeout"


class BodyTooLarge(FastServeError):
    status, code = 413, "body_too_large"


class TooManyRows(FastServeError):
    status, code = 413, "too_many_rows"


class UnsupportedMediaType(FastServeError):
    status, code = 415, "unsupported_media_type"


class BadFeatures(FastServeError):
    status, code = 422, "bad_features"


class ModelRejectedInput(FastServeError):
    """The model raised on this request's rows, and on no other request of its batch (the batch
    was split to find out): the input is at fault, not the model."""

    status, code = 422, "model_rejected_input"


class QueueFull(FastServeError):
    status, code = 429, "queue_full"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class ModelError(FastServeError):
    """The model raised on every request of a batch, and on rows it predicted before (its
    warm-up): the model is at fault; those requests get this, and the server goes on."""

    status, code = 500, "model_error"


class NotReady(FastServeError):
    status, code = 503, "not_ready"


class Draining(FastServeError):
    status, code = 503, "draining"


class QueueTimeout(FastServeError):
    status, code = 504, "queue_timeout"


def without_path(exc: BaseException) -> str:
    """An exception's message fit for a client: an OSError's reason, without the path its
    text names ("[Errno 13] Permission denied: '/srv/...'" becomes "Permission denied")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class ConfigError(Exception):
    """A setting is wrong; raised at start-up with the offending setting named."""
