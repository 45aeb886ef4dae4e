"""Simulated KV beyond the GPU pool: a host (CPU) tier, as the mocker's own `KvConnector`.

At admission, after the GPU prefix hit, it says how many more prompt tokens come from
the host tier and how long the move takes (bytes over bandwidth); those tokens then
count as computed. Blocks the GPU pool evicts (its BlocksRemoved events) are kept, by
hash, in an LRU of `num_blocks`; a prompt whose next blocks are there loads them.
Remote prefill is not simulated here: a disaggregated mocker moves real (sized) blocks
through kvflow.kv.disagg, with this connector as its fallback.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as Seq

from kvflow.engines.core.sequence import Sequence
from kvflow.kv.connector import BaseConnector, ExternalMatch
from kvflow.llm.kv_events import AllCleared, BlocksRemoved, KvEvent


class HostTier:
    """CPU copies of GPU-evicted blocks, by sequence hash, least recently used first."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()

    @property
    def num_used(self) -> int:
        return len(self._lru)

    def observe(self, events: Iterable[KvEvent]) -> None:
        """Follow the GPU pool's events: evicted blocks move here, a clear empties it."""
        for event in events:
            data = event.data
            if isinstance(data, BlocksRemoved):
                for seq_hash in data.block_hashes:
                    self._put(seq_hash)
            elif isinstance(data, AllCleared):
                self._lru.clear()

    def _put(self, seq_hash: int) -> None:
        self._lru[seq_hash] = None
        self._lru.move_to_end(seq_hash)
        if len(self._lru) > self.num_blocks:
            self._lru.popitem(last=False)

    def match(self, seq_hashes: Seq[int]) -> int:
        """Length of the leading run of `seq_hashes` held here (those become most recent)."""
        n = 0
        for seq_hash in seq_hashes:
            if seq_hash not in self._lru:
                break
            self._lru.move_to_end(seq_hash)
            n += 1
        return n


class MockerConnector(BaseConnector):
    """KvConnector for the mocker: host-tier hits, moved in modelled time."""

    def __init__(
        self, block_size: int, kv_bytes_per_token: float, host: HostTier | None,
        host_bandwidth: float,
    ) -> None:
        self.block_size = block_size
        self.host = host
        self._host_s_per_token = kv_bytes_per_token / host_bandwidth

    def match_external(self, seq: Sequence, num_local_tokens: int) -> ExternalMatch:  # type: ignore[override]
        host_tokens = self._match_host(seq, num_local_tokens)
        return ExternalMatch(
            num_tokens=host_tokens,
            num_cached_tokens=host_tokens,
            transfer_s=host_tokens * self._host_s_per_token,
        )

    def _match_host(self, seq: Sequence, num_local_tokens: int) -> int:
        if self.host is None:
            return 0
        bs = self.block_size
        first, last = num_local_tokens // bs, (seq.num_tokens - 1) // bs
        if first >= last:
            return 0
        return self.host.match(seq.block_hashes(last, bs)[first:]) * bs
