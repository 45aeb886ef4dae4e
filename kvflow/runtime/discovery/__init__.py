"""Discovery backends by name: memory, file, etcd."""

from __future__ import annotations

from kvflow.runtime.config import RuntimeConfig
from kvflow.runtime.discovery.base import DELETE, PUT, Discovery, Watch, WatchEvent
from kvflow.runtime.errors import needs_extra

__all__ = ["DELETE", "PUT", "Discovery", "Watch", "WatchEvent", "make_discovery"]


def make_discovery(config: RuntimeConfig) -> Discovery:
    if config.discovery == "memory":
        from kvflow.runtime.discovery.memory import MemoryDiscovery

        return MemoryDiscovery()
    if config.discovery == "file":
        from kvflow.runtime.discovery.file import FileDiscovery

        return FileDiscovery(config.discovery_path, config.lease_ttl, config.file_poll_interval)
    if config.discovery == "etcd":
        with needs_extra("etcd discovery (--discovery etcd)", "etcd"):
            from kvflow.runtime.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(config.etcd_endpoints, config.lease_ttl)
    raise ValueError(f"unknown discovery backend {config.discovery!r}")
