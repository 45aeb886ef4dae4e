"""EngineClient: the only thing the frontend pipeline knows about engines.

The frontend sends a `PreprocessedRequest` and iterates `EngineOutput`s; whether the
engine is in-process, behind the runtime's request plane, or behind a KV-aware router
is the client's business. `generate` is an async generator function (as
`Engine.generate` is); stopping the context must end the stream soon after, and
closing the iterator early (`aclose()`) must release the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from kvflow.llm.protocol import EngineOutput, PreprocessedRequest
from kvflow.runtime.context import Context


class EngineUnavailable(Exception):
    """No worker could take the request (none registered, all gone). The frontend answers 503."""


class EngineClient(Protocol):
    def generate(
        self, request: PreprocessedRequest, context: Context
    ) -> AsyncIterator[EngineOutput]:
        """Stream the engine's outputs for `request`; raise EngineUnavailable if no worker."""
        ...

    def live_workers(self) -> int:
        """How many workers can take requests right now (0 → the frontend answers 503)."""
        ...
