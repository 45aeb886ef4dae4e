"""GPU benchmark: the cost of --batch-invariant on a Llama-3.1-8B-shaped model, floors from the same run.

The model (random bf16 weights, built on the device, no files; the same weights for every
mode) is served three ways through the model runner's own decode path (async output,
greedy): the default engine (Triton GEMVs and attention, CUDA graphs), batch-invariant with
CUDA graphs (the engine's default for the mode), and batch-invariant eager (what the mode
ran before its decode steps were captured). For each: decode tokens/s at each --batches
against the floor (weight + KV bytes per step over this run's copy bandwidth), and prefill
of one --prefill-len prompt against the bf16 matmul peak measured in the same run.
`--profile` adds the top kernels of one eager batch-invariant decode step per batch;
`--gemm-table` first times the invariant matmul on each 8B projection against cuBLAS.

    PYTHONPATH=. python bench/invariant_gpu.py [--batches 1 64] [--isl 512] [--osl 128]
"""

from __future__ import annotations

import gc
import time

import torch

from bench.fp8_gpu import (
    LLAMA_8B,
    decode_against_floor,
    graph_ms,
    matmul_peaks,
    model_parser,
    prefill_ms,
    random_model,
)
from bench.native_gpu import kernel_profile, measure_bandwidth
from kvflow.engines.native.config import ModelConfig, NativeEngineConfig
from kvflow.engines.native.runner import ModelRunner

MODES = {"default": ("auto", False), "invariant": ("invariant", False),
         "invariant-eager": ("invariant", True)}


def profile_decode(runner: ModelRunner, batch: int, context: int) -> None:
    from kvflow.engines.native.attention import uniform_decode_meta

    model = runner.model
    meta = uniform_decode_meta(batch, context, runner.block_size, runner.device)
    ids = torch.full((batch,), 5, device="cuda")
    pos = torch.full((batch,), context, device="cuda")
    kernel_profile(lambda: model.compute_logits(model(ids, pos, meta)),
                   f"batch-invariant eager decode b={batch}")


def gemm_row(name: str, n: int, k: int, bw: float) -> str:
    """One 8B projection through the invariant matmul (graph-timed, random data): one and 64
    rows through FEW (of copy bandwidth), 8192 through MANY (TFLOP/s), each against cuBLAS; and
    whether every launch gives a row the bits of the decode launch (it must)."""
    from kvflow.engines.native import triton_invariant as ti

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    x = torch.randn(64 if name == "lm_head" else 8192, k, device="cuda", dtype=torch.bfloat16)
    cells = []
    for m in (1, 64):
        ms = graph_ms(lambda m=m: ti.invariant_matmul(x[:m], w))
        ref = graph_ms(lambda m=m: x[:m] @ w.T)
        cells.append(f"{m} row(s) {ms * 1e3:.1f} us ({n * k * 2 / (ms / 1e3) / bw:.0%} of bw; "
                     f"cuBLAS {ref * 1e3:.1f} us)")
    decode = ti.invariant_matmul(x[:64], w)
    same = all(torch.equal(ti.invariant_matmul(x[:m], w, tile=t, in_program=inside), decode[:m])
               for m in (1, 64) for t in (ti.FEW, ti.MANY) for inside in (False, True))
    if name != "lm_head":
        flop = 2 * x.shape[0] * n * k
        ms = graph_ms(lambda: ti.invariant_matmul(x, w), reps=3)
        ref = graph_ms(lambda: x @ w.T, reps=3)
        cells.append(f"8192 rows {flop / (ms / 1e3) / 1e12:.0f} TFLOP/s "
                     f"(cuBLAS {flop / (ref / 1e3) / 1e12:.0f})")
    ranges = ti.k_ranges(n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    return f"  matmul {name} {ranges}: " + "; ".join(cells) + f"; same bits across launches: {same}"


def gemm_table(bw: float) -> None:
    """The invariant matmul on each 8B projection against cuBLAS (gemm_row)."""
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
              "down": (4096, 14336), "lm_head": (128256, 4096)}
    for name, (n, k) in shapes.items():
        print(gemm_row(name, n, k, bw), flush=True)


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--gemm-table", action="store_true",
                        help="first, the invariant matmul per 8B projection against cuBLAS")
    args = parser.parse_args()
    bw = measure_bandwidth()
    peak, _ = matmul_peaks()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s  "
          f"bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    if args.gemm_table:
        gemm_table(bw)
    cfg = ModelConfig.from_dict(LLAMA_8B)
    results: dict[str, dict[str, float]] = {}
    floors: dict[int, float] = {}
    for mode in args.modes:
        kind, eager = MODES[mode]
        model = random_model(cfg, args.prefill_len + 16, kind)
        params = sum(p.numel() for n, p in model.named_parameters()
                     if "embed_tokens" not in n and "lm_head" not in n)
        config = NativeEngineConfig(
            model_path="(in memory)", device="cuda", dtype="bfloat16", max_num_seqs=max(args.batches),
            max_num_batched_tokens=8192, max_model_len=args.prefill_len + 16,
            num_gpu_blocks=args.blocks, batch_invariant=kind == "invariant", enforce_eager=eager)
        t0 = time.perf_counter()
        runner = ModelRunner(model, config, torch.device("cuda"), torch.bfloat16, args.prefill_len + 16)
        print(f"{mode}: runner ready in {time.perf_counter() - t0:.1f}s, graphs "
              f"{'off' if runner.graphs is None else runner.graphs.sizes}", flush=True)
        row: dict[str, float] = {}
        for b in args.batches:
            row[f"b{b}"], floors[b] = decode_against_floor(runner, model, b, args, bw, mode)
        ms = prefill_ms(runner, args.prefill_len)
        row["prefill_ms"] = ms
        flops = 2 * params * args.prefill_len
        print(f"  {mode} prefill {args.prefill_len}: {ms:.1f} ms; 2*params*tokens at "
              f"{flops / (ms / 1e3) / 1e12:.0f} TFLOP/s = {flops / (ms / 1e3) / peak:.0%} of peak",
              flush=True)
        if args.profile and kind == "invariant" and eager:
            for b in args.batches:
                profile_decode(runner, b, args.isl + args.osl // 2)
        results[mode] = row
        del runner, model
        gc.collect()
        torch.cuda.empty_cache()
    base = results.get("default")
    print(f"\n{'mode':<17}" + "".join(f"{f'b={b} tok/s':>13}{'of floor':>9}{'cost':>7}" for b in args.batches)
          + f"{'prefill ms':>12}{'cost':>7}")
    for mode, row in results.items():
        line = f"{mode:<17}"
        for b in args.batches:
            cost = f"{base[f'b{b}'] / row[f'b{b}']:.2f}x" if base else "-"
            line += f"{row[f'b{b}']:>13.0f}{row[f'b{b}'] / floors[b]:>9.0%}{cost:>7}"
        cost = f"{row['prefill_ms'] / base['prefill_ms']:.2f}x" if base else "-"
        print(line + f"{row['prefill_ms']:>12.1f}{cost:>7}")
    print("cost: the default engine's tokens/s over the mode's (decode), the mode's time over the "
          "default's (prefill)")


if __name__ == "__main__":
    main()
