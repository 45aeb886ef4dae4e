"""In-process event plane: publishers and subscribers share one event loop."""

from __future__ import annotations

from kvflow.runtime.events.base import EventPlane


class InprocEventPlane(EventPlane):
    name = "inproc"
    _planes: list[InprocEventPlane] = []

    async def start(self) -> None:
        InprocEventPlane._planes.append(self)

    async def close(self) -> None:
        if self in InprocEventPlane._planes:
            InprocEventPlane._planes.remove(self)
        await super().close()

    async def publish(self, subject: str, payload: bytes) -> None:
        for plane in InprocEventPlane._planes:
            plane._dispatch(subject, payload)
