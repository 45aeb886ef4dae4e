"""The planner's latest decision per model, as `kvflow planner` publishes it on the event
plane (llm.planner_events); shown in the /fleet snapshot's `planner` section."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from kvflow.llm.planner_events import DECISIONS_SUBJECT
from kvflow.runtime.events import ScopedEvents

log = logging.getLogger(__name__)


class PlannerFeed:
    """Latest decision per model (the model is "" when the planner watches all of them)."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, Any]] = {}

    def receive(self, payload: bytes) -> None:
        try:
            decision = json.loads(payload)
            model = str(decision.get("model", ""))
        except (ValueError, AttributeError) as exc:
            log.warning("frontend: ignoring an unreadable planner decision (%s)", exc)
            return
        decision["received_at"] = time.time()
        self._latest[model] = decision

    def snapshot(self) -> dict[str, Any] | None:
        """{"decisions": [...latest per model, newest first]}, or None before any arrived."""
        if not self._latest:
            return None
        newest = sorted(self._latest.values(), key=lambda d: d["received_at"], reverse=True)
        return {"decisions": newest}

    async def follow(self, events: ScopedEvents) -> None:
        """Receive decisions until cancelled."""
        subscription = events.subscribe(DECISIONS_SUBJECT)
        try:
            async for payload in subscription:
                self.receive(payload)
        finally:
            subscription.close()
