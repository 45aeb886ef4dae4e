"""Programmatic dependent launch (Hopper and newer) for the decode kernels: start while the last one drains.

A kernel launched with `launch_options()` may begin once every program of the kernel before
it has started (or called `gdc_launch_dependents`). Until it calls `gdc_wait` it must read
nothing an earlier kernel writes and write nothing at all; after it, everything earlier
kernels wrote is visible. Each kernel here waits unconditionally, so completion stays
transitive down the stream: a kernel that finished implies all kernels before it finished.
CUDA graphs keep these edges, so a captured decode step overlaps one kernel's launch and
weight loads with the tail of the one before.
"""

from __future__ import annotations

import torch
import triton

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # Triton before 3.4: no grid dependency control, PDL stays off
    gdc_launch_dependents = gdc_wait = None

__all__ = ["PDL", "gdc_launch_dependents", "gdc_wait", "launch_options"]


def pdl_supported() -> bool:
    """Compiled Triton (not the interpreter) on an sm_90+ GPU."""
    knobs = getattr(triton, "knobs", None)
    if gdc_wait is None or knobs is None or knobs.runtime.interpret:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


PDL = pdl_supported()


def launch_options(enabled: bool = PDL) -> dict[str, bool]:
    """Extra launch arguments of a kernel that calls gdc_wait (constexpr USE_PDL)."""
    return {"launch_pdl": True} if enabled else {}
