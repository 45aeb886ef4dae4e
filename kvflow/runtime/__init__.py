"""The distributed runtime: discovery, request plane, event plane, lifecycle."""

from kvflow.runtime.component import Client, Component, Endpoint, Instance, Namespace
from kvflow.runtime.config import RuntimeConfig
from kvflow.runtime.context import Context
from kvflow.runtime.errors import (
    KvflowError,
    NoInstancesError,
    ProtocolVersionError,
    RemoteError,
    StreamTimeoutError,
    WorkerShuttingDownError,
    WorkerUnavailableError,
)
from kvflow.runtime.runtime import DistributedRuntime
from kvflow.runtime.worker import worker

__all__ = [
    "Client",
    "Component",
    "Context",
    "DistributedRuntime",
    "Endpoint",
    "Instance",
    "KvflowError",
    "Namespace",
    "NoInstancesError",
    "ProtocolVersionError",
    "RemoteError",
    "RuntimeConfig",
    "StreamTimeoutError",
    "WorkerShuttingDownError",
    "WorkerUnavailableError",
    "worker",
]
