"""Event planes by name: zmq (default), inproc, nats."""

from __future__ import annotations

from kvflow.runtime.config import RuntimeConfig
from kvflow.runtime.discovery.base import Discovery
from kvflow.runtime.errors import needs_extra
from kvflow.runtime.events.base import EventPlane, ScopedEvents, Subscription, subject_matches

__all__ = ["EventPlane", "ScopedEvents", "Subscription", "make_event_plane", "subject_matches"]


def make_event_plane(config: RuntimeConfig, discovery: Discovery) -> EventPlane:
    if config.event_plane == "inproc":
        from kvflow.runtime.events.inproc import InprocEventPlane

        return InprocEventPlane()
    if config.event_plane == "zmq":
        from kvflow.runtime.events.zmq import ZmqEventPlane

        return ZmqEventPlane(discovery, config.advertise_host)
    if config.event_plane == "nats":
        with needs_extra("the NATS event plane (--event-plane nats)", "nats"):
            from kvflow.runtime.events.nats import NatsEventPlane

        return NatsEventPlane(config.nats_url)
    raise ValueError(f"unknown event plane {config.event_plane!r}")
