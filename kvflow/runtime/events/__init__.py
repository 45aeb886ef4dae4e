"""Event planes by name: zmq (default), inproc, nats, and any a distribution adds through
the `kvflow.event_planes` entry-point group (a factory taking the RuntimeConfig and the
process's Discovery)."""

from __future__ import annotations

from collections.abc import Callable

from kvflow.runtime.config import RuntimeConfig
from kvflow.runtime.discovery.base import Discovery
from kvflow.runtime.errors import needs_extra
from kvflow.runtime.events.base import EventPlane, ScopedEvents, Subscription, subject_matches
from kvflow.runtime.plugins import PluginRegistry

__all__ = ["EVENT_PLANES", "EventPlane", "ScopedEvents", "Subscription", "make_event_plane",
           "subject_matches"]

EventPlaneFactory = Callable[[RuntimeConfig, Discovery], EventPlane]
EVENT_PLANES: PluginRegistry[EventPlaneFactory] = PluginRegistry("event plane", "kvflow.event_planes")


def make_event_plane(config: RuntimeConfig, discovery: Discovery) -> EventPlane:
    return EVENT_PLANES.get(config.event_plane)(config, discovery)


@EVENT_PLANES.register("inproc")
def _inproc(config: RuntimeConfig, discovery: Discovery) -> EventPlane:
    from kvflow.runtime.events.inproc import InprocEventPlane

    return InprocEventPlane()


@EVENT_PLANES.register("zmq")
def _zmq(config: RuntimeConfig, discovery: Discovery) -> EventPlane:
    from kvflow.runtime.events.zmq import ZmqEventPlane

    return ZmqEventPlane(discovery, config.advertise_host)


@EVENT_PLANES.register("nats")
def _nats(config: RuntimeConfig, discovery: Discovery) -> EventPlane:
    with needs_extra("the NATS event plane (--event-plane nats)", "nats"):
        from kvflow.runtime.events.nats import NatsEventPlane

    return NatsEventPlane(config.nats_url)
