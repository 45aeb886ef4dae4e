"""The engine contract: what a frontend sends to any engine and what streams back.

Every engine (echo, mocker, native, adapters) consumes `PreprocessedRequest` and
yields `EngineOutput` items. Both are msgspec Structs encoded as msgpack maps, so
fields can be added without breaking older peers (unknown fields are ignored,
missing ones take their defaults). `ENGINE_PROTOCOL_VERSION` is bumped only for
incompatible changes.
"""

from __future__ import annotations

import msgspec

ENGINE_PROTOCOL_VERSION = 1


class SamplingOptions(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """How to pick the next token. `None` means the engine's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int = 1
    # Number of top alternatives to return per token; None = no logprobs at all.
    logprobs: int | None = None
    # JSON-schema / regex guided decoding, for engines that can honour it.
    response_format: dict | None = None


class StopConditions(msgspec.Struct, omit_defaults=True):
    """When generation ends. Stop *strings* are handled by the frontend, not engines."""

    max_tokens: int | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False


PHASE_PREFILL = "prefill"
PHASE_DECODE = "decode"


class DisaggHint(msgspec.Struct, omit_defaults=True):
    """Disaggregated serving: which half of a split request this is (kvflow.kv.disagg).

    prefill: compute the prompt's KV and keep its blocks for `transfer_id` (a lease
    releases them if nobody pulls). decode: the first `num_tokens` prompt tokens' KV
    sits on worker `source_worker` under `transfer_id`; pull it, then continue.
    """

    phase: str  # PHASE_PREFILL | PHASE_DECODE
    transfer_id: str
    source_worker: int = 0
    num_tokens: int = 0


class KvTransferStats(msgspec.Struct, omit_defaults=True):
    """What a decode worker pulled for a request: reported on its first output."""

    bytes: int = 0
    blocks: int = 0
    seconds: float = 0.0
    backend: str = ""


class RoutingHints(msgspec.Struct, omit_defaults=True):
    """Hints for routers and engines; all optional."""

    worker_id: int | None = None
    lora_name: str | None = None
    # Sequence hashes of the prompt's full KV blocks, when the router computed them.
    block_hashes: list[int] | None = None
    # Disaggregation: which half of a split request this is, and where its KV sits.
    disagg: DisaggHint | None = None
    # Session affinity: a conversation's key (x-session-id header or OpenAI `user`); the
    # router sends its turns to the worker holding its history.
    session_id: str | None = None


class EmbedOptions(msgspec.Struct, omit_defaults=True):
    """An embedding request: no tokens are generated; the prompt's final hidden states are
    pooled ("last" token or "mean" over the prompt), cut to `dimensions` and normalized."""

    pooling: str = "last"
    normalize: bool = True
    dimensions: int | None = None


class PreprocessedRequest(msgspec.Struct, omit_defaults=True):
    """A tokenized request, ready for an engine."""

    request_id: str
    token_ids: list[int]
    model: str = ""
    sampling: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    stop: StopConditions = msgspec.field(default_factory=StopConditions)
    eos_token_ids: list[int] = []
    routing: RoutingHints | None = None
    protocol_version: int = ENGINE_PROTOCOL_VERSION
    # Migration: the last `prior_output_tokens` of `token_ids` were generated for this same
    # request (same request_id) by a worker that was lost; `stop` already counts them off.
    # An engine whose outputs depend on the output position (the mocker) continues at that
    # position; any other engine may treat them as prompt.
    prior_output_tokens: int = 0
    # Tenant isolation of the prefix cache: mixed into every block hash, so requests with
    # different salts never share cached blocks (kv_hash.extra_seed). None = no salt.
    cache_salt: str | None = None
    # W3C traceparent of the caller's span when tracing is on (kvflow.runtime.tracing);
    # the worker's spans become its children. None when tracing is off.
    trace_context: str | None = None
    # Set: an embedding request (engines whose card lists "embedding" serve it).
    embed: EmbedOptions | None = None


class TopLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class EngineOutput(msgspec.Struct, omit_defaults=True):
    """One streamed step: zero or more new tokens, and on the last one a finish reason.

    `finish_reason` is one of "stop" (EOS or stop token), "length" (max_tokens or
    context), "cancelled", "error". `cached_tokens` (prompt tokens served from the
    prefix cache) is reported at least once, normally on the first output.
    """

    token_ids: list[int] = []
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    finish_reason: str | None = None
    cached_tokens: int | None = None
    # Of `cached_tokens`, how many each KV tier served ("device", "host", "disk", "object").
    cached_tokens_by_tier: dict[str, int] | None = None
    error: str | None = None
    # Index of the choice when n > 1.
    index: int = 0
    # Disaggregated decode: the KV pulled from the prefill worker (first output only).
    kv_transfer: KvTransferStats | None = None
    # The pooled embedding, on the last output of an embedding request.
    embedding: list[float] | None = None


FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"
