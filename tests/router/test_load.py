"""ActiveLoad: booked load per worker, merged with published metrics, and busy checks."""

from __future__ import annotations

from kvflow.llm.kv_events import LoadMetrics
from kvflow.router.load import ActiveLoad, WorkerLoad, is_busy


def test_prefill_ends_at_first_token_decode_at_finish() -> None:
    load = ActiveLoad()
    load.add("a", 1, prefill_tokens=100, decode_blocks=7)
    load.add("b", 1, prefill_tokens=20, decode_blocks=2)
    assert load.load(1) == WorkerLoad(1, 120, 9, 2)
    assert load.mark_prefill_done("a")
    assert not load.mark_prefill_done("a")  # only once
    assert load.load(1) == WorkerLoad(1, 20, 9, 2)
    assert load.free("b")  # prefill still pending: both parts go
    assert load.load(1) == WorkerLoad(1, 0, 7, 1)
    assert load.free("a") and not load.free("a")
    assert load.load(1) == WorkerLoad(1, 0, 0, 0)


def test_metrics_merge_takes_the_larger_view() -> None:
    load = ActiveLoad()
    load.add("a", 1, prefill_tokens=50, decode_blocks=4)
    load.update_metrics(LoadMetrics(worker_id=1, active_blocks=30, total_blocks=100,
                                    num_waiting=1, num_running=0, prefill_tokens_inflight=10))
    merged = load.load(1)
    assert merged == WorkerLoad(1, prefill_tokens=50, decode_blocks=30, active_requests=1,
                                total_blocks=100)
    assert merged.decode_fraction == 0.3
    assert load.snapshot([1, 2])[2] == WorkerLoad(2)


def test_remove_worker_forgets_its_requests() -> None:
    load = ActiveLoad()
    load.add("a", 1, 10, 1)
    load.add("b", 2, 10, 1)
    load.remove_worker(1)
    assert load.request_ids() == ["b"]
    assert not load.free("a")
    assert load.load(1) == WorkerLoad(1)


def test_is_busy_thresholds() -> None:
    w = WorkerLoad(1, decode_blocks=80, active_requests=3, total_blocks=100)
    assert not is_busy(w, None, None)
    assert is_busy(w, 0.8, None) and not is_busy(w, 0.9, None)
    assert is_busy(w, None, 3) and not is_busy(w, None, 4)
    assert not is_busy(WorkerLoad(1, decode_blocks=10**6), 0.5, None)  # capacity unknown
