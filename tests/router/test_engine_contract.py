"""The router's index follows real engine block pools, lost event batches included."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry

from kvflow.engines.core.block_pool import BlockPool
from kvflow.llm.kv_events import CacheSnapshot
from kvflow.llm.kv_hash import sequence_hashes
from kvflow.router import KvRouter, KvRouterConfig

BLOCK = 4


def serve(pool: BlockPool, tokens: list[int]) -> None:
    """What an engine does with a prompt's blocks: reuse the cached prefix, compute the rest."""
    hashes = sequence_hashes(tokens, BLOCK)
    ids = pool.match_prefix(hashes)
    need = len(hashes) - len(ids)
    if not pool.can_allocate(need):
        pool.free(ids)
        return
    parent = hashes[len(ids) - 1] if ids else None
    for block in pool.allocate(need):
        i = len(ids)
        ids.append(pool.commit(block, hashes[i], parent, tokens[i * BLOCK : (i + 1) * BLOCK]))
        parent = hashes[i]
    pool.free(ids)


def leading_cached(pool: BlockPool, tokens: list[int]) -> int:
    cached = pool.cached_hashes()
    n = 0
    for h in sequence_hashes(tokens, BLOCK):
        if h not in cached:
            break
        n += 1
    return n


async def test_index_tracks_block_pools_through_evictions_and_gaps() -> None:
    rng = random.Random(7)
    pools = {w: BlockPool(num_blocks=24, block_size=BLOCK, worker_id=w) for w in (11, 12, 13)}

    async def fetch(worker_id: int) -> CacheSnapshot:
        return pools[worker_id].snapshot()

    router = KvRouter(KvRouterConfig(block_size=BLOCK, seed=1), fetch,
                      registry=CollectorRegistry())
    for w in pools:
        router.on_worker_added(w)
    systems = [[rng.randrange(500) for _ in range(BLOCK * 3)] for _ in range(3)]
    prompts = [rng.choice(systems) + [rng.randrange(500) for _ in range(BLOCK * rng.randint(0, 4))]
               for _ in range(40)]
    for step in range(300):
        prompt = rng.choice(prompts)
        decision = await router.schedule(prompt, f"r{step}")
        serve(pools[decision.worker_id], prompt)
        router.on_first_token(f"r{step}")
        router.on_finished(f"r{step}")
        for pool in pools.values():
            batch = pool.drain_events()
            if batch and rng.random() > 0.05:  # about one batch in twenty is lost
                router.on_kv_events(batch)
        if step % 25 == 0:
            pools[rng.choice(list(pools))].clear()
    for pool in pools.values():  # one more delivered batch each exposes any trailing gap
        serve(pool, [rng.randrange(500, 600) for _ in range(BLOCK)])
        router.on_kv_events(pool.drain_events())
    await router.wait_recovered()
    for prompt in prompts:
        overlaps = router.explain(prompt).overlaps
        assert overlaps == {w: leading_cached(pool, prompt) for w, pool in pools.items()}
    assert router.stats().recovery is not None and router.stats().recovery.gaps > 0
