"""Discovery backends by name: memory, file, etcd, and any a distribution adds through the
`kvflow.discovery` entry-point group (a factory taking the RuntimeConfig)."""

from __future__ import annotations

from collections.abc import Callable

from kvflow.runtime.config import RuntimeConfig
from kvflow.runtime.discovery.base import DELETE, PUT, Discovery, Watch, WatchEvent
from kvflow.runtime.errors import needs_extra
from kvflow.runtime.plugins import PluginRegistry

__all__ = ["DELETE", "DISCOVERY", "PUT", "Discovery", "Watch", "WatchEvent", "make_discovery"]

DiscoveryFactory = Callable[[RuntimeConfig], Discovery]
DISCOVERY: PluginRegistry[DiscoveryFactory] = PluginRegistry("discovery backend", "kvflow.discovery")


def make_discovery(config: RuntimeConfig) -> Discovery:
    return DISCOVERY.get(config.discovery)(config)


@DISCOVERY.register("memory")
def _memory(config: RuntimeConfig) -> Discovery:
    from kvflow.runtime.discovery.memory import MemoryDiscovery

    return MemoryDiscovery()


@DISCOVERY.register("file")
def _file(config: RuntimeConfig) -> Discovery:
    from kvflow.runtime.discovery.file import FileDiscovery

    return FileDiscovery(config.discovery_path, config.lease_ttl, config.file_poll_interval)


@DISCOVERY.register("etcd")
def _etcd(config: RuntimeConfig) -> Discovery:
    with needs_extra("etcd discovery (--discovery etcd)", "etcd"):
        from kvflow.runtime.discovery.etcd import EtcdDiscovery

    return EtcdDiscovery(config.etcd_endpoints, config.lease_ttl)
