"""GPU micro-benchmark: the decode GEMVs (triton_gemv) against norm/activation + cuBLAS, per layer shape.

Shapes are the bench model's (native_gpu.py). Each variant runs over enough copies of its
weights that nothing stays in L2, inside one captured CUDA graph (as in a decode step), and
is reported per call with the weight bandwidth it reached next to a plain device copy's.

    PYTHONPATH=. python bench/native_gemv.py [--rows 1 2 4]

The copy (native_gpu.measure_bandwidth) is timed after the GPU has warmed up (its clocks idle
low), outside a CUDA graph: captured in one, the same copy read ~2.7 TB/s on an H200 against
~4.2 outside (probably moved by a copy engine), which had made the floor look lower than it is.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.native_gpu import measure_bandwidth
from kvflow.engines.native import triton_gemv as tg
from kvflow.engines.native.ops import make_ops

HIDDEN, INTER, VOCAB, Q_KV = 2048, 8192, 32000, 2048 + 2 * 512
C = tg.GemvConfig


def num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def configs(k: int) -> list[tg.GemvConfig]:
    """Tiled launches (the one-tile-per-program defaults among them) and persistent ones."""
    sms = num_sms()
    if k >= 4096:
        return [C(4, 2048, 8), C(8, 1024, 8), C(2, k, 8, sms), C(2, k, 8, 2 * sms),
                C(4, k, 8, sms)]
    return [C(8, 1024, 4), C(4, 2048, 4), C(4, k, 4, 2 * sms), C(8, k, 4, 2 * sms),
            C(4, k, 4, 4 * sms), C(4, k, 4, 6 * sms)]


def label(cfg: tg.GemvConfig) -> str:
    tile = f"{cfg.block_n}xP{cfg.programs}" if cfg.programs else f"{cfg.block_n}x{cfg.block_k}"
    return f"{tile} w{cfg.num_warps}"


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    k: int
    prologue: int


SHAPES = [Shape("qkv+add_norm", Q_KV, HIDDEN, tg.ADD_NORM), Shape("o_proj", HIDDEN, HIDDEN, tg.PLAIN),
          Shape("gate_up+add_norm", 2 * INTER, HIDDEN, tg.ADD_NORM),
          Shape("down+silu_mul", HIDDEN, INTER, tg.SILU_MUL), Shape("lm_head", VOCAB, HIDDEN, tg.PLAIN)]


def graph_us(calls: list[Callable[[], object]]) -> float:
    """Median µs per call of `calls`, replayed as one CUDA graph."""
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1e3 * sorted(times)[len(times) // 2] / len(calls)


def variants(shape: Shape, rows: int) -> dict[str, Callable[[torch.Tensor], object]]:
    """name -> fn(weight); the inputs are fixed random tensors."""
    ops = make_ops("torch", torch.device("cuda"))
    triton_ops = make_ops("triton", torch.device("cuda"))
    width = 2 * shape.k if shape.prologue == tg.SILU_MUL else shape.k
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(rows, shape.k, device="cuda", dtype=torch.bfloat16) * 0.1
    nw = torch.ones(shape.k, device="cuda", dtype=torch.bfloat16)

    def unfused(w: torch.Tensor) -> object:
        if shape.prologue == tg.ADD_NORM:  # the triton add+norm kernel, then cuBLAS
            return ops.linear(triton_ops.add_rms_norm(x, res, nw, 1e-6)[0], w)
        if shape.prologue == tg.SILU_MUL:
            return ops.linear(triton_ops.silu_mul(x), w)
        return ops.linear(x, w)

    def fused(cfg: tg.GemvConfig, pdl: bool) -> Callable[[torch.Tensor], object]:
        return lambda w: tg.gemv(x, w, prologue=shape.prologue, residual=res, norm_weight=nw,
                                 eps=1e-6, config=cfg, pdl=pdl)

    out: dict[str, Callable[[torch.Tensor], object]] = {"cublas (+ triton_ops)": unfused}
    default = tg.gemv_config(shape.n, shape.k, num_sms() if rows == 1 else 0)
    out["default no-pdl"] = fused(default, False)
    out[f"default {label(default)}"] = fused(default, tg.PDL)
    for cfg in configs(shape.k):
        if cfg != default and (rows == 1 or not cfg.programs):
            out[f"gemv {label(cfg)}"] = fused(cfg, tg.PDL)
    return out


def check(shape: Shape, rows: int) -> float:
    """Relative error of the default-config GEMV against the unfused path (which adds in place)."""
    fns = variants(shape, rows)
    w = torch.randn(shape.n, shape.k, device="cuda", dtype=torch.bfloat16) * shape.k**-0.5
    y = fns["default no-pdl"](w)[0]  # type: ignore[index]
    ref = fns["cublas (+ triton_ops)"](w)
    assert isinstance(ref, torch.Tensor) and isinstance(y, torch.Tensor)
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def start(doc: str, shapes: list[Shape]) -> tuple[argparse.Namespace, float]:
    """(--rows / --shapes arguments, the device copy bandwidth in bytes/s), printed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in shapes])
    args = parser.parse_args()
    measure_bandwidth()  # warm-up: clocks ramp up
    bw = measure_bandwidth()  # outside a graph: a copy captured in one read ~2.7 TB/s on H200
    print(f"device: {torch.cuda.get_device_name()}  copy {bw / 1e12:.2f} TB/s", flush=True)
    return args, bw


def main() -> None:
    args, bw = start(__doc__, SHAPES)
    for shape in (s for s in SHAPES if s.name in args.shapes):
        nbytes = shape.n * shape.k * 2
        copies = max(4, -(-(256 << 20) // nbytes))
        weights = [torch.randn(shape.n, shape.k, device="cuda", dtype=torch.bfloat16)
                   for _ in range(copies)]
        for rows in args.rows:
            print(f"{shape.name} N={shape.n} K={shape.k} rows={rows}: "
                  f"err {check(shape, rows):.1e}, floor {nbytes / bw * 1e6:.1f} us", flush=True)
            for name, fn in variants(shape, rows).items():
                us = graph_us([lambda w=w, fn=fn: fn(w) for w in weights])
                print(f"  {name:<24}{us:8.1f} us {nbytes / us / 1e3:8.0f} GB/s", flush=True)
        del weights


if __name__ == "__main__":
    main()
