"""The engine's one exception hierarchy; the gateway maps each class to a gRPC status."""


class DurableRuntimeError(Exception):
    """Base class. `code` names the error on the wire between partition and gateway."""

    code = "internal"


class InvalidArgumentError(DurableRuntimeError):
    code = "invalid_argument"


class InstanceNotFoundError(DurableRuntimeError):
    code = "not_found"


class InstanceAlreadyExistsError(DurableRuntimeError):
    code = "already_exists"


class InstanceNotCompletedError(DurableRuntimeError):
    """The operation needs a terminal instance (purge) or a particular state."""

    code = "failed_precondition"


class StaleCompletionError(DurableRuntimeError):
    """A completion or abandon carried a token that is not the current lease."""

    code = "stale_completion"


class PartitionUnavailableError(DurableRuntimeError):
    code = "unavailable"


class ResourceExhaustedError(DurableRuntimeError):
    code = "resource_exhausted"


class UnimplementedError(DurableRuntimeError):
    code = "unimplemented"


_BY_CODE = {
    cls.code: cls
    for cls in (
        DurableRuntimeError,
        InvalidArgumentError,
        InstanceNotFoundError,
        InstanceAlreadyExistsError,
        InstanceNotCompletedError,
        StaleCompletionError,
        PartitionUnavailableError,
        ResourceExhaustedError,
        UnimplementedError,
    )
}


def error_from_wire(code: str, message: str) -> DurableRuntimeError:
    """Rebuild an error that a partition sent as (code, message)."""
    return _BY_CODE.get(code, DurableRuntimeError)(message)
