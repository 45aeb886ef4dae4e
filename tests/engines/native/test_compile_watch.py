"""CompileWatch: what a compile after start-up reports (the Triton hook itself runs on GPUs, -m gpu)."""

from __future__ import annotations

import logging
import sys

import pytest

from kvflow.engines.native import compile_watch
from kvflow.engines.native.compile_watch import CompileWatch


def test_a_recorded_compile_names_the_kernel_its_key_and_where_it_came_from(
        caplog: pytest.LogCaptureFixture) -> None:
    def launch() -> str:  # stands in for the engine code that launches a kernel
        return compile_watch._describe({"repr": "_prefill_kernel[num_warps=8](q_ptr: *bf16)",
                                        "key": "[('*bf16', 'D'), ('i32', '')]"})

    launch.__code__ = launch.__code__.replace(co_filename="/site/kvflow/engines/native/layers.py")
    entry = launch()
    assert entry.startswith("_prefill_kernel [('*bf16', 'D'), ('i32', '')] (from ")
    assert "engines/native/layers.py:" in entry and "launch" in entry
    with caplog.at_level(logging.WARNING):
        CompileWatch().record(entry)
    assert "Triton compiled a kernel on the request path" in caplog.text and entry in caplog.text


def test_without_triton_nothing_is_armed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton fails, as on a CPU box
    monkeypatch.setattr(compile_watch, "_installed", False)
    watch = CompileWatch()
    assert watch.arm() is False and not watch.armed
