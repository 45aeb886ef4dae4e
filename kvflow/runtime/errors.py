"""Typed errors raised across process boundaries by the runtime."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class KvflowError(Exception):
    """Base of every error the runtime raises on purpose."""


class NoInstancesError(KvflowError):
    """No live instance serves the endpoint (or none is reachable)."""


class WorkerUnavailableError(KvflowError):
    """The connection to a worker was lost, or it refused the stream."""

    def __init__(self, message: str, *, responses_received: int = 0, instance_id: int | None = None):
        super().__init__(message)
        self.responses_received = responses_received
        self.instance_id = instance_id


class WorkerStalledError(WorkerUnavailableError):
    """The worker sent nothing for too long (or left discovery mid-stream); the caller gave up."""


class WorkerShuttingDownError(WorkerUnavailableError):
    """The worker refused a new stream because it is draining; retry elsewhere."""


class RemoteError(KvflowError):
    """The remote handler raised; carries the remote exception's type and message."""

    def __init__(self, error_type: str, message: str):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.remote_message = message


class StreamTimeoutError(KvflowError):
    """No response arrived within the stream's timeout."""


class ProtocolVersionError(KvflowError):
    """The peer speaks an incompatible wire protocol version."""

    def __init__(self, local: int, remote: int):
        super().__init__(
            f"wire protocol mismatch: this side speaks kvflow protocol v{local}, "
            f"the peer speaks v{remote}; run both with compatible kvflow versions"
        )
        self.local = local
        self.remote = remote


class FrameError(KvflowError):
    """A malformed frame arrived; the connection that sent it is closed."""


class DiscoveryError(KvflowError):
    """The discovery backend failed or is unreachable."""


class UserError(KvflowError):
    """A mistake the user can fix (a flag, a path, a port): shown as one or two lines, no traceback."""


def port_in_use(what: str, host: str, port: int, flag: str) -> UserError:
    """The one message for a port another process holds."""
    return UserError(
        f"{what} port {port} on {host} is already in use (another kvflow?); "
        f"stop that process or pick another port with {flag} (0 picks a free one)"
    )


def is_addr_in_use(exc: BaseException) -> bool:
    import errno

    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


class ConfigError(UserError, ValueError):
    """A bad setting in a flag, a KVFLOW_* variable or the config file."""


class ServiceUnreachableError(DiscoveryError, UserError):
    """etcd or NATS is not reachable at startup: start it, or point the flag at it."""


class MissingDependencyError(UserError, ModuleNotFoundError):
    """An optional feature's package is not installed; the message names the extra."""


@contextlib.contextmanager
def needs_extra(feature: str, extra: str) -> Iterator[None]:
    """Around a lazy import: a missing third-party package becomes one line naming the extra."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if isinstance(exc, MissingDependencyError) or (exc.name or "").startswith("kvflow"):
            raise
        raise MissingDependencyError(
            f"{feature} needs the {exc.name or 'missing'} package, which is not installed: "
            f"pip install 'kvflow[{extra}]'"
        ) from None
