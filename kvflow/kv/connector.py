"""The KV connector contract: the engine core's hooks for KV that lives outside its block pool.

The scheduler (kvflow.engines.core.scheduler) calls a connector at four points, the same
for every engine we own; disaggregation (kvflow.kv.disagg) and the cache tiers are users:

- `match_external(seq, n_local)` at admission, after the local prefix hit: how many more
  prompt tokens the connector can supply. `load_async=False`: they count as computed at
  once (a modelled copy). `load_async=True`: the scheduler allocates blocks for them,
  calls `start_load(seq, block_ids, num_tokens)` and parks the request; the connector
  fills those blocks in the background and later reports a `LoadResult`. A remote prefill
  is just computed tokens advancing (DESIGN §4.2).
- `request_finished(seq)` when a request ends: True means "save": the connector now owns
  the request's block references (e.g. until a decode worker has pulled them) and hands
  them back through `take_released()`.
- `before_evict(block_ids, seq_hashes)`, set as the block pool's eviction hook: the last
  moment to copy cached blocks out, all those one allocation reuses at once (their KV
  is still intact during the call).
- `prefetch_on_arrival`: True when `match_external` is cheap and local (no network round
  trip), so the engine may call it, and start an asynchronous load, as soon as a request
  arrives rather than at the next step's admission (`Scheduler.prefetch`): the load then
  overlaps the step in progress.
- `take_finished_loads()` / `take_released()`: polled by the scheduler at every
  `schedule()`, under the engine's lock; `has_pending()` says whether there is
  something to poll (so an idle engine wakes). The connector calls the engine's `wake`
  callback (thread-safe) when something arrives.

Ownership rules
- Blocks passed to `start_load` belong to the scheduler, but only the connector writes
  them until it reports the load: an aborted request's blocks are freed only after its
  `LoadResult` arrives (ok or not). A failed load makes the request recompute.
- Blocks held after `request_finished` returned True are freed by the scheduler when
  the connector returns them from `take_released()`, never by the connector itself.
- Every pool mutation happens inside the scheduler, under the engine's lock; connectors
  do I/O on their own threads / event loop and only queue results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvflow.kv.blocks import KvBlockIO
from kvflow.llm.kv_events import LoadMetrics
from kvflow.llm.protocol import DisaggHint, KvTransferStats


class ConnectorSeq(Protocol):
    """What a connector may read of a request (kvflow.engines.core.sequence.Sequence)."""

    request_id: str
    token_ids: list[int]
    prompt_len: int
    disagg: DisaggHint | None
    num_computed_tokens: int
    num_preemptions: int
    block_ids: list[int]
    cached_by_tier: dict[str, int] | None  # prompt tokens served per KV tier (set by tiers)

    @property
    def num_tokens(self) -> int: ...

    def block_hashes(self, n: int, block_size: int) -> list[int]: ...


@dataclass(frozen=True)
class ExternalMatch:
    """Prompt tokens whose KV a connector brings in from outside the block pool."""

    num_tokens: int = 0
    num_cached_tokens: int = 0  # of those, served from a cache tier (not computed remotely)
    transfer_s: float = 0.0  # modelled seconds to move them (a real engine may ignore it)
    load_async: bool = False  # True: the tokens arrive later, through start_load


NO_EXTERNAL = ExternalMatch()


@dataclass(frozen=True)
class LoadResult:
    """A background load finished: `ok` False means the blocks are garbage; recompute."""

    request_id: str
    ok: bool
    reason: str = ""
    stats: KvTransferStats | None = None  # what moved (reported on the request's first output)


class KvConnector(Protocol):
    """The engine core's hooks for KV beyond the local block pool (see the module doc)."""

    prefetch_on_arrival: bool  # match_external is local and cheap: may run as a request arrives

    def match_external(self, seq: ConnectorSeq, num_local_tokens: int) -> ExternalMatch:
        """Tokens after `num_local_tokens` it can supply (at most num_tokens - 1 in all)."""
        ...

    def start_load(self, seq: ConnectorSeq, block_ids: Sequence[int], num_tokens: int) -> None:
        """Fill `block_ids` (the request's blocks from the first external token's block on)
        with the KV of the `num_tokens` tokens after its local prefix; report a LoadResult."""
        ...

    def request_finished(self, seq: ConnectorSeq) -> bool:
        """The request ended; True: keep its blocks (returned later by take_released)."""
        ...

    def before_evict(self, block_ids: Sequence[int], seq_hashes: Sequence[int]) -> None:
        """The pool is about to reuse these cached blocks; their KV is still intact."""
        ...

    def take_finished_loads(self) -> list[LoadResult]: ...

    def take_released(self) -> list[list[int]]:
        """Block lists held since request_finished that may now be freed."""
        ...

    def has_pending(self) -> bool: ...

    def observe_step(self, num_prefill_tokens: int, seconds: float) -> None: ...

    def close(self) -> None:
        """The engine stopped: finish queued writes and release threads (may block)."""
        ...

    def fill_load_metrics(self, metrics: LoadMetrics) -> None:
        """Add what the connector publishes (tier costs and counters) to the engine's load."""
        ...


class BaseConnector:
    """No-op defaults for every hook; connectors override the ones they use."""

    prefetch_on_arrival = False

    def match_external(self, seq: ConnectorSeq, num_local_tokens: int) -> ExternalMatch:
        return NO_EXTERNAL

    def start_load(self, seq: ConnectorSeq, block_ids: Sequence[int], num_tokens: int) -> None:
        raise AssertionError("start_load without an asynchronous match")

    def request_finished(self, seq: ConnectorSeq) -> bool:
        return False

    def before_evict(self, block_ids: Sequence[int], seq_hashes: Sequence[int]) -> None:
        return None

    def take_finished_loads(self) -> list[LoadResult]:
        return []

    def take_released(self) -> list[list[int]]:
        return []

    def has_pending(self) -> bool:
        return False

    def observe_step(self, num_prefill_tokens: int, seconds: float) -> None:
        """A step computed this many prompt tokens in `seconds` (the tiers' recompute speed)."""
        return None

    def close(self) -> None:
        return None

    def fill_load_metrics(self, metrics: LoadMetrics) -> None:
        return None


@dataclass(frozen=True)
class KvShard:
    """Another tensor-parallel rank's KV memory (the next KV heads), opened in this process:
    `io` reads and writes its blocks; `shm_name` / `cuda_ipc` are how a peer opens it."""

    io: KvBlockIO
    shm_name: str | None = None
    cuda_ipc: list[bytes | int] | None = None


@dataclass(frozen=True)
class EngineKv:
    """What an engine hands its connector factory once its KV memory exists."""

    io: KvBlockIO
    shm_name: str | None = None  # the /dev/shm region holding the KV, when it is shared
    wake: Callable[[], None] = lambda: None  # thread-safe: the engine should poll its connector
    # Appends a lower tier's BlocksStored/BlocksRemoved (with `medium`) to the block pool's
    # event stream; call it only from hooks the scheduler runs (under the engine's lock).
    record_event: Callable[[Any], None] | None = None
    # Modelled seconds to move n tokens' KV (the mocker's clock; 0 for real engines).
    modelled_s: Callable[[int], float] = lambda n: 0.0
    # The engine's own connector (e.g. a host tier) for requests this one does not take.
    fallback: KvConnector | None = None
    # Tensor parallel: the KV memories of ranks 1..N-1 (the next KV heads each; `io` is rank 0's).
    head_shards: tuple[KvShard, ...] = ()


ConnectorFactory = Callable[[EngineKv], KvConnector]
