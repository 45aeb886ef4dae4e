"""The KV block pool: fixed-size blocks, reference counts, prefix caching and KV events.

Engine-agnostic (no torch): the mocker and the native engine both allocate KV pages
here. Blocks have ids `0..num_blocks-1`; a full block whose KV has been computed is
*committed* under its sequence hash (`kvflow.llm.kv_hash`) and becomes matchable.

Ownership rules
- Every id returned by `allocate` or `match_prefix` carries one reference owned by
  the caller, who releases it exactly once with `free`.
- Only the caller holding the sole reference of an uncommitted block may `commit` it,
  and must use the id `commit` returns from then on (a twin may replace it, below).
- A referenced block is never evicted or handed out again. An unreferenced committed
  block stays cached and matchable (LRU) until an allocation needs its memory; an
  unreferenced uncommitted block goes straight back to the free list.
- `evict_hook(block_ids, seq_hashes)`, when set (a KV connector's `before_evict`), runs
  once per `allocate` that reuses unreferenced cached blocks, with all of them, before
  `allocate` returns them: their KV is still intact during the call.
- Blocks are released tail-first (`free` walks the list backwards), so a prefix
  chain is evicted from its deepest block up and a cached child never outlives its
  parent through LRU order alone.

Events: every change to the set of cached hashes is buffered as a `KvEvent` with a
per-pool, monotonically increasing `event_id`; `drain_events` hands them over (once
per engine step) and `snapshot` describes the cache exactly as the drained events
leave it, so a consumer can apply a snapshot and then continue with later events.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from kvflow.llm.kv_events import (
    AllCleared,
    BlocksRemoved,
    BlocksStored,
    CachedBlock,
    CacheSnapshot,
    KvEvent,
    StoredBlock,
)


class BlockPool:
    """Fixed pool of KV blocks with reference counting and a prefix cache."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        worker_id: int = 0,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"a block pool needs num_blocks >= 1 and block_size >= 1, got "
                f"num_blocks={num_blocks}, block_size={block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.worker_id = worker_id
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._cached: dict[int, int] = {}  # sequence hash -> block id
        self._num_active = 0
        self._events: list[KvEvent] = []
        self._next_event_id = 1
        # The cache as the drained events describe it: hash -> parent hash, for snapshots.
        self._published: dict[int, int | None] = {}
        self._last_drained_id = 0
        self._last_evicted_hash = 0
        self.evict_hook: Callable[[list[int], list[int]], None] | None = None

    # ---- counts -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never-cached ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_active_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self._num_active

    @property
    def num_cached_blocks(self) -> int:
        """Committed blocks (referenced or evictable) that a prefix lookup can match."""
        return len(self._cached)

    # ---- allocation ---------------------------------------------------------------

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks (uncached ones first, then LRU evictions); one reference each."""
        assert n >= 0 and self.can_allocate(n), f"allocate({n}) with {self.num_free_blocks} free"
        out: list[int] = []
        evicted: list[int] = []
        hashes: list[int] = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block = self._evict_oldest()
                evicted.append(block)
                hashes.append(self._last_evicted_hash)
            self._ref[block] = 1
            out.append(block)
        self._num_active += n
        if evicted and self.evict_hook is not None:
            self.evict_hook(evicted, hashes)
        return out

    def _evict_oldest(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        seq_hash = self._hash[block]
        assert seq_hash is not None and self._ref[block] == 0
        self._last_evicted_hash = seq_hash
        del self._cached[seq_hash]
        self._hash[block] = None
        self._emit_removed(seq_hash)
        return block

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block, walking the list tail-first."""
        for block in reversed(block_ids):
            ref = self._ref[block] - 1
            assert ref >= 0, f"block {block} freed more often than it was taken"
            self._ref[block] = ref
            if ref:
                continue
            self._num_active -= 1
            if self._hash[block] is None:
                self._free.append(block)
            else:
                self._evictable[block] = None

    # ---- prefix caching -----------------------------------------------------------

    def match_prefix(self, seq_hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of `seq_hashes`, one reference taken on each."""
        if not self.enable_prefix_caching:
            return []
        out: list[int] = []
        for seq_hash in seq_hashes:
            block = self._cached.get(seq_hash)
            if block is None:
                break
            self._take_ref(block)
            out.append(block)
        return out

    def cached_prefix_blocks(self, seq_hashes: Sequence[int]) -> int:
        """How many leading blocks of `seq_hashes` are cached now (no reference taken)."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        cached = self._cached
        for seq_hash in seq_hashes:
            if seq_hash not in cached:
                break
            n += 1
        return n

    def _take_ref(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._evictable[block]
            self._num_active += 1
        self._ref[block] += 1

    def commit(
        self, block_id: int, seq_hash: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> int:
        """Make a just-filled block matchable under `seq_hash`; returns the id to keep using.

        If `seq_hash` is already cached (two sequences computed the same block at once),
        the caller's reference moves to the cached twin, its own copy is released, and no
        event is emitted: the returned id is the twin's.
        """
        if not self.enable_prefix_caching:
            return block_id
        assert self._ref[block_id] == 1, f"commit of block {block_id} held {self._ref[block_id]}x"
        assert self._hash[block_id] is None, f"block {block_id} committed twice"
        assert len(token_ids) == self.block_size, "only full blocks are committed"
        twin = self._cached.get(seq_hash)
        if twin is not None:
            self._take_ref(twin)
            self.free([block_id])
            return twin
        self._hash[block_id] = seq_hash
        self._cached[seq_hash] = block_id
        self._emit_stored(seq_hash, parent_hash, token_ids)
        return block_id

    def clear(self) -> None:
        """Forget every cached hash. Referenced blocks stay in use, merely unmatchable."""
        for block in self._evictable:
            self._hash[block] = None
            self._free.append(block)
        self._evictable.clear()
        for block in self._cached.values():
            self._hash[block] = None
        self._cached.clear()
        self._push(AllCleared())

    # ---- events and snapshots -----------------------------------------------------

    def _push(self, data: BlocksStored | BlocksRemoved | AllCleared) -> None:
        self._events.append(KvEvent(self.worker_id, self._next_event_id, data))
        self._next_event_id += 1

    def _emit_stored(self, seq_hash: int, parent: int | None, token_ids: Sequence[int]) -> None:
        block = StoredBlock(seq_hash, list(token_ids))
        last = self._events[-1].data if self._events else None
        if isinstance(last, BlocksStored) and last.medium is None and last.blocks[-1].block_hash == parent:
            last.blocks.append(block)  # same chain, same step: extend the event
        else:
            self._push(BlocksStored([block], parent))

    def _emit_removed(self, seq_hash: int) -> None:
        last = self._events[-1].data if self._events else None
        if isinstance(last, BlocksRemoved) and last.medium is None:
            last.block_hashes.append(seq_hash)
        else:
            self._push(BlocksRemoved([seq_hash]))

    def record_event(self, data: BlocksStored | BlocksRemoved) -> None:
        """Announce a change in a lower KV tier (`data.medium` set) in this pool's event
        stream, so its ids stay consecutive; snapshots describe the device tier only."""
        assert data.medium not in (None, "device"), "device changes come from the pool itself"
        self._push(data)

    def drain_events(self) -> list[KvEvent]:
        """Events since the last drain, in event_id order; the snapshot advances to them."""
        events, self._events = self._events, []
        for event in events:
            self._apply_published(event.data)
        if events:
            self._last_drained_id = events[-1].event_id
        return events

    def _apply_published(self, data: BlocksStored | BlocksRemoved | AllCleared) -> None:
        if not isinstance(data, AllCleared) and data.medium is not None:
            return  # a lower tier's residency: not part of the device snapshot
        if isinstance(data, BlocksStored):
            parent = data.parent_hash
            for block in data.blocks:
                self._published[block.block_hash] = parent
                parent = block.block_hash
        elif isinstance(data, BlocksRemoved):
            for seq_hash in data.block_hashes:
                del self._published[seq_hash]
        else:
            self._published.clear()

    def snapshot(self) -> CacheSnapshot:
        """The cache as of the last drained event, parents before children."""
        depth: dict[int, int] = {}
        for seq_hash in self._published:
            _chain_depth(seq_hash, self._published, depth)
        ordered = sorted(self._published, key=depth.__getitem__)
        blocks = [CachedBlock(h, self._published[h]) for h in ordered]
        return CacheSnapshot(self.worker_id, self._last_drained_id, blocks)

    def cached_hashes(self) -> set[int]:
        """The hashes a prefix lookup can match right now (for tests and diagnostics)."""
        return set(self._cached)

    def check_invariants(self) -> None:
        """Assert the pool's internal consistency (O(num_blocks); for tests)."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable
        active = [b for b in range(self.num_blocks) if self._ref[b] > 0]
        assert len(active) == self._num_active
        assert len(free) + len(evictable) + len(active) == self.num_blocks
        assert all(self._ref[b] == 0 and self._hash[b] is None for b in free)
        assert all(self._ref[b] == 0 and self._hash[b] is not None for b in evictable)
        assert all(self._hash[b] == h for h, b in self._cached.items())
        assert sum(h is not None for h in self._hash) == len(self._cached)
        if not self._events:
            assert set(self._published) == set(self._cached)


def _chain_depth(seq_hash: int, parents: dict[int, int | None], memo: dict[int, int]) -> int:
    """Number of cached ancestors of `seq_hash` (iterative, so long chains are fine)."""
    path: list[int] = []
    node: int | None = seq_hash
    while node is not None and node in parents and node not in memo:
        path.append(node)
        node = parents[node]
    base = memo[node] + 1 if node is not None and node in memo else 0
    for offset, h in enumerate(reversed(path)):
        memo[h] = base + offset
    return memo[seq_hash]
