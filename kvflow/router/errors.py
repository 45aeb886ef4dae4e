"""Typed errors the router raises to its callers (the frontend maps them to HTTP codes)."""

from __future__ import annotations

from kvflow.runtime.errors import KvflowError, NoInstancesError


class RouterError(KvflowError):
    """Base of every error the router raises on purpose."""


class NoWorkersError(RouterError, NoInstancesError):
    """No worker is available to route to."""


class UnknownWorkerError(RouterError):
    """The request named a worker (RoutingHints.worker_id) that is not available."""


class RouterOverloadedError(RouterError):
    """Every worker is busy and the router's wait queue is full (or the wait timed out).

    The frontend answers 503 with a Retry-After header of `retry_after_s`.
    """

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s
