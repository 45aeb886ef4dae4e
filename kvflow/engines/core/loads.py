"""Requests parked while a KV connector fills their blocks in the background.

The scheduler hands a request here when `match_external` answers `load_async`: it owns
the blocks allocated for the load, but only the connector writes them. `poll()` (once
per `schedule()`, under the engine's lock) takes the connector's finished loads and
released holds: a loaded request comes back with its tokens computed; a failed one comes
back with no KV at all (it recomputes); an aborted one's blocks are freed only now, when
nobody writes them any more.
"""

from __future__ import annotations

from kvflow.engines.core.block_pool import BlockPool
from kvflow.engines.core.sequence import SeqStatus, Sequence
from kvflow.kv.connector import KvConnector


class Parked:
    """The admission result of a request that now waits for its KV to load."""


PARKED = Parked()


class KvLoads:
    """Requests whose blocks a connector is filling, by request id."""

    def __init__(self, pool: BlockPool, connector: KvConnector | None) -> None:
        self.pool = pool
        self.connector = connector
        self._loading: dict[str, tuple[Sequence, int]] = {}  # request id -> (seq, tokens)
        self._orphans: dict[str, list[int]] = {}  # aborted while loading: their blocks
        self.num_loaded_tokens = 0
        self.num_failed = 0

    def __len__(self) -> int:
        return len(self._loading)

    def start(self, seq: Sequence, new_blocks: list[int], num_tokens: int) -> None:
        assert self.connector is not None
        seq.block_ids.extend(new_blocks)
        seq.status = SeqStatus.LOADING
        self._loading[seq.request_id] = (seq, num_tokens)
        self.connector.start_load(seq, new_blocks, num_tokens)

    def abort(self, seq: Sequence) -> None:
        """Forget a loading request; its blocks stay taken until the load reports."""
        del self._loading[seq.request_id]
        self._orphans[seq.request_id] = seq.block_ids
        seq.block_ids = []
        seq.status = SeqStatus.FINISHED

    def has_pending(self) -> bool:
        return self.connector is not None and self.connector.has_pending()

    def poll(self) -> list[Sequence]:
        """Apply finished loads and released holds; the requests ready to run again."""
        if self.connector is None or not self.connector.has_pending():
            return []
        for blocks in self.connector.take_released():
            self.pool.free(blocks)
        ready: list[Sequence] = []
        for result in self.connector.take_finished_loads():
            orphan = self._orphans.pop(result.request_id, None)
            if orphan is not None:
                self.pool.free(orphan)
                continue
            entry = self._loading.pop(result.request_id, None)
            if entry is not None:
                entry[0].kv_transfer = result.stats
                ready.append(self._land(*entry, ok=result.ok))
        return ready

    def _land(self, seq: Sequence, num_tokens: int, ok: bool) -> Sequence:
        seq.status = SeqStatus.WAITING
        if ok:
            seq.num_computed_tokens += num_tokens
            self.num_loaded_tokens += num_tokens
            return seq
        self.num_failed += 1  # recompute from scratch: nothing loaded is trusted
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0
        seq.num_cached_tokens = -1  # counted again at its next admission
        seq.cached_by_tier = None
        return seq
