"""ModelManager: the models this frontend serves, by name, each with its pipeline state.

A `ServedModel` bundles what the request pipeline needs for one model: the card, the
engine client, the tokenizer, the chat template and its output parser classes. The
tokenizer comes from the card's inline tokenizer.json when it has one, else from
`card.model_path` (a local or materialized directory); pass one in to skip loading.
Loading a big tokenizer takes a while: call add_model off the event loop for those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvflow.frontend.engine_client import EngineClient
from kvflow.llm.chat_template import ChatTemplate
from kvflow.llm.model_card import ModelCard
from kvflow.llm.parsers.reasoning import ReasoningParser, get_reasoning_parser
from kvflow.llm.parsers.tool_calls import ToolParser, get_tool_parser
from kvflow.llm.protocol import PreprocessedRequest
from kvflow.llm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvflow.frontend.disagg import ModelFleet

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model's pipeline state. Parsers are built per request from the names here."""

    card: ModelCard
    engine: EngineClient
    tokenizer: Tokenizer
    template: ChatTemplate | None
    created: int = field(default_factory=lambda: int(time.time()))
    reasoning_parser: type[ReasoningParser] | None = None
    tool_parser: type[ToolParser] | None = None
    explain: Callable[[PreprocessedRequest], bytes] | None = None
    # Routed models: snapshots of the model's routers (by pool role) and recent KV
    # transfers, for the fleet view (/fleet).
    fleet: Callable[[], ModelFleet] | None = None

    warned_no_tool_parser: bool = False

    def warn_no_tool_parser(self) -> None:
        """Once per model: a request carries tools, but no parser turns output into tool_calls."""
        if not self.warned_no_tool_parser:
            self.warned_no_tool_parser = True
            log.warning("model %s: a request carries tools, but the model has no tool-call parser, "
                        "so replies have no tool_calls; start its workers with --tool-call-parser "
                        "(hermes, llama3_json, mistral)", self.name)

    def __post_init__(self) -> None:
        if self.card.reasoning_parser:
            self.reasoning_parser = get_reasoning_parser(self.card.reasoning_parser)
        if self.card.tool_call_parser:
            self.tool_parser = get_tool_parser(self.card.tool_call_parser)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def context_length(self) -> int:
        return self.card.context_length

    def serves(self, kind: str) -> bool:
        """Whether the card lists `kind` ("chat", "completions") among its model types."""
        return kind in self.card.model_types


class ModelManager:
    """Models by name. Adding a name again replaces the entry (e.g. a new engine client)."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        # Models whose last worker went away, by name → monotonic deadline: still listed, and
        # answered 503 + Retry-After until a worker is back or the grace period ends.
        self._restarting: dict[str, float] = {}

    def mark_restarting(self, name: str, grace_s: float) -> None:
        self._restarting[name] = time.monotonic() + grace_s

    def clear_restarting(self, name: str) -> None:
        self._restarting.pop(name, None)

    def restarting(self) -> dict[str, float]:
        """Models waiting for a worker to come back: name → seconds of grace left."""
        now = time.monotonic()
        return {name: round(max(0.0, end - now), 1) for name, end in self._restarting.items()}

    def add_model(
        self,
        card: ModelCard,
        engine_client: EngineClient,
        *,
        tokenizer: Tokenizer | None = None,
        template: ChatTemplate | None = None,
        explain: Callable[[PreprocessedRequest], bytes] | None = None,
        fleet: Callable[[], ModelFleet] | None = None,
    ) -> ServedModel:
        """Serve `card.name` through `engine_client`; tokenizer/template load from the card.

        `explain` (routed models) answers /debug/route with a routing decision as JSON.
        """
        model = ServedModel(
            card=card,
            engine=engine_client,
            tokenizer=tokenizer or _load_tokenizer(card),
            template=template or _load_template(card),
            explain=explain,
            fleet=fleet,
        )
        if card.name in self._models:
            log.info("model %s replaced", card.name)
        self._models[card.name] = model
        return model

    def remove_model(self, name: str) -> bool:
        """Stop serving `name`; returns whether it was served."""
        self._restarting.pop(name, None)
        return self._models.pop(name, None) is not None

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def list(self) -> list[ServedModel]:
        return list(self._models.values())

    def names(self) -> list[str]:
        return sorted(self._models)


def _load_tokenizer(card: ModelCard) -> Tokenizer:
    ref = card.files.get("tokenizer.json")
    if ref is not None and ref.inline is not None:
        return Tokenizer.from_bytes(ref.inline)
    return Tokenizer.from_dir(card.model_path)


def _load_template(card: ModelCard) -> ChatTemplate | None:
    """The card's chat template, or None for base models without one (chat then returns 400)."""
    if not card.chat_template:
        return None
    specials = card.special_tokens
    return ChatTemplate(
        card.chat_template,
        bos_token=card.bos_token or specials.get("bos_token", ""),
        eos_token=specials.get("eos_token", ""),
        special_tokens=specials,
    )
