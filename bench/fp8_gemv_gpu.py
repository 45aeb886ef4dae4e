"""GPU micro-benchmark: FP8-weight products of 1 to 16 rows on Llama-3.1-8B shapes, every launch.

For each decoder projection (with the input op the decode step folds into it) and row count:
every launch the FP8 GEMV's tuning chooses from (triton_gemv.fp8_candidates: tiles, some
software-pipelined through shared memory (`sN`: N stages), and for one row persistent launches
and, on Hopper, TMA tiles (`tma K/n`: K split over n programs)), the other tiles pipelined
with 3 and 4 stages, and for reference `torch._scaled_mm` (activations quantised to FP8) and
bf16 cuBLAS on 2-byte weights. Each runs over enough weight copies that nothing stays in L2,
replayed from one CUDA graph, and is reported per call with the weight bandwidth reached, the
floor (FP8 weight bytes over a device copy's bandwidth, measured in the same run) and the
relative error against float32 on the dequantised weights.

    PYTHONPATH=. python bench/fp8_gemv_gpu.py [--rows 1 4] [--shapes gate_up down]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from bench.native_gemv import Shape, graph_us, num_sms, start
from kvflow.engines.native import triton_gemv as tg
from kvflow.engines.native.fp8 import FP8, FP8_MAX
from kvflow.engines.native.triton_fp8 import fp8_linear

HIDDEN, INTER = 4096, 14336
SHAPES = [Shape("qkv", HIDDEN + 2 * 1024, HIDDEN, tg.ADD_NORM), Shape("o", HIDDEN, HIDDEN, tg.PLAIN),
          Shape("gate_up", 2 * INTER, HIDDEN, tg.ADD_NORM), Shape("down", HIDDEN, INTER, tg.SILU_MUL)]


def quantised(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device="cuda") * k**-0.5
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).to(FP8), scale


def inputs(shape: Shape, rows: int) -> dict[str, torch.Tensor]:
    width = 2 * shape.k if shape.prologue == tg.SILU_MUL else shape.k
    return {"x": torch.randn(rows, width, device="cuda", dtype=torch.bfloat16),
            "residual": torch.randn(rows, shape.k, device="cuda", dtype=torch.bfloat16) * 0.1,
            "norm_weight": 1 + 0.1 * torch.randn(shape.k, device="cuda", dtype=torch.bfloat16)}


def prologue_input(shape: Shape, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The projection's input in bf16 (the unfused ops, in float32 where they round)."""
    x = t["x"].float()
    if shape.prologue == tg.ADD_NORM:
        x = (x + t["residual"].float()).to(torch.bfloat16).float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).float()
        return (x * t["norm_weight"].float()).to(torch.bfloat16)
    if shape.prologue == tg.SILU_MUL:
        gate, up = x[:, :shape.k], x[:, shape.k:]
        return (torch.nn.functional.silu(gate).to(torch.bfloat16).float() * up).to(torch.bfloat16)
    return t["x"]


def variants(shape: Shape, rows: int, t: dict[str, torch.Tensor], weight: torch.Tensor
             ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> fn(fp8 weight, scale) -> y (`weight`: one of the FP8 weights it will take)."""
    kw = {"prologue": shape.prologue, "residual": t["residual"] if shape.prologue == tg.ADD_NORM else None,
          "norm_weight": t["norm_weight"], "eps": 1e-6}
    x = t["x"]
    out: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    plain = prologue_input(shape, t)  # for the unfused references (prologue not timed)
    out["_scaled_mm (no prologue)"] = lambda w, s: fp8_linear(plain, w, s)
    sms = num_sms() if rows == 1 else 0
    staged = [c for c in (replace(t, stages=st) for t in tg.FP8_TILES[:4] for st in (3, 4))
              if c not in tg.FP8_TILES]
    for cfg in [*tg.fp8_candidates(shape.k, sms, tma=tg.tma_fits(weight)), *staged]:
        tile = f"{cfg.block_n}xP{cfg.programs}" if cfg.programs else f"{cfg.block_n}x{cfg.block_k}"
        name = (f"gemv {tile} w{cfg.num_warps}" + (f" s{cfg.stages}" if cfg.stages else "")
                + (f" tma K/{cfg.splits}" if cfg.splits else ""))
        out[name] = lambda w, s, cfg=cfg: tg.gemv(x, w, scale=s, config=cfg, **kw)[0]
    return out


def main() -> None:
    args, bw = start(__doc__, SHAPES)
    torch.manual_seed(0)
    for shape in (s for s in SHAPES if s.name in args.shapes):
        nbytes = shape.n * shape.k
        copies = max(4, -(-(512 << 20) // nbytes))
        weights = [quantised(shape.n, shape.k) for _ in range(copies)]
        bf16 = [(w.float() * s[:, None]).to(torch.bfloat16) for w, s in weights]
        for rows in args.rows:
            t = inputs(shape, rows)
            ref = prologue_input(shape, t).float() @ (weights[0][0].float() * weights[0][1][:, None]).T
            print(f"{shape.name} N={shape.n} K={shape.k} rows={rows}: floor {nbytes / bw * 1e6:.1f} us "
                  f"(FP8 weight bytes over the copy bandwidth)", flush=True)
            plain = prologue_input(shape, t)
            us = graph_us([lambda plain=plain, w=w: torch.nn.functional.linear(plain, w) for w in bf16])
            print(f"  {'bf16 cuBLAS (2-byte weights)':<30}{us:8.1f} us {2 * nbytes / us / 1e3:8.0f} GB/s",
                  flush=True)
            for name, fn in variants(shape, rows, t, weights[0][0]).items():
                try:
                    err = float((fn(*weights[0]).float() - ref).norm() / ref.norm())
                    us = graph_us([lambda w=w, fn=fn: fn(*w) for w in weights])
                except Exception as exc:  # a launch that does not compile or fit: say so, go on
                    print(f"  {name:<30} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                print(f"  {name:<30}{us:8.1f} us {nbytes / us / 1e3:8.0f} GB/s  err {err:.1e}",
                      flush=True)
        del weights, bf16


if __name__ == "__main__":
    main()
