"""GPU benchmark: FP8 compute against bf16 on a Llama-3.1-8B-shaped model, floors from the same run.

The model (random weights, built on the device, no files) is first served in bf16; then
its decoder projections are quantised in place to FP8 (e4m3, one scale per output row, as an
FP8 checkpoint loads with FP8 compute) and served again. Both through the model runner's own
decode path (CUDA graphs, async output, greedy), timed on the host between completed steps.

Floors, from this run's copy bandwidth: decode = batch / ((weight bytes + KV bytes per step) /
bandwidth), with the projections at 2 bytes per weight (bf16) or 1 byte (FP8; the LM head stays
bf16); prefill = 2 * projection params * tokens over the measured bf16 (or FP8) matmul peak.
Also a per-shape table: bf16 and FP8 matmuls of 1 to 64 rows (GEMV, cuBLAS, `_scaled_mm`).

    PYTHONPATH=. python bench/fp8_gpu.py [--batches 1 64] [--isl 512] [--osl 128] [--prefill-profile]
        [--decode-profile 256] [--kinds bf16]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from bench.native_gpu import measure_bandwidth, median_ms
from kvflow.engines.native.attention import single_prefill_meta
from kvflow.engines.native.config import ModelConfig, NativeEngineConfig
from kvflow.engines.native.fp8 import FP8, FP8_MAX, FP8_PROJECTIONS, make_fp8_projections
from kvflow.engines.native.runner import ModelRunner

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
            "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "torch_dtype": "bfloat16"}


def matmul_peaks() -> tuple[float, float]:
    """(bf16, FP8 with row-wise scales) FLOP/s of an 8192^3 product on random data."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * n**3 / (median_ms(lambda: a @ b) / 1e3)
    a8, b8 = a.to(FP8), b.to(FP8)
    sa = torch.ones(n, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    fp8 = 2 * n**3 / (median_ms(lambda: torch._scaled_mm(
        a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)) / 1e3)
    return bf16, fp8


def engine_config(args: argparse.Namespace) -> NativeEngineConfig:
    return NativeEngineConfig(model_path="(in memory)", device="cuda", dtype="bfloat16",
                              max_num_seqs=max(args.batches), max_num_batched_tokens=8192,
                              max_model_len=args.prefill_len + 16, num_gpu_blocks=args.blocks)


def random_model(cfg: ModelConfig, max_len: int, kind: str = "auto"):  # type: ignore[no-untyped-def]
    """Random weights (seed 0, the same for every `kind`: "auto" or "invariant" backend and ops)."""
    from kvflow.engines.native.attention import make_backend
    from kvflow.engines.native.ops import make_ops
    from kvflow.engines.native.weights import empty_model

    cuda = torch.device("cuda")
    model = empty_model(cfg, make_backend(kind, cuda), max_len, cuda, torch.bfloat16,
                        make_ops(kind, cuda))
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def quantize_in_place(model) -> None:  # type: ignore[no-untyped-def]
    """The decoder projections to FP8 with per-row scales, as FP8 compute loads them."""
    names = [f"layers.{i}.{p}" for i in range(len(model.layers)) for p in FP8_PROJECTIONS]
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight.detach().float()
            scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
            q = (w / scale[:, None]).to(FP8)
            del w
            make_fp8_projections(model, [name])
            linear = model.get_submodule(name)
            linear.weight.copy_(q)
            linear.weight_scale.copy_(scale)
    torch.cuda.empty_cache()


def weight_bytes(model) -> int:  # type: ignore[no-untyped-def]
    """Bytes a decode step reads: every parameter but the embedding table."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "embed_tokens" not in n)


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2


def decode_tps(runner: ModelRunner, batch: int, isl: int, osl: int) -> float:
    """tokens/s over the steps where all `batch` sequences decode (host times of completed
    steps), as the engine runs them: async output, greedy, CUDA graphs."""
    from kvflow.engines.core import BlockPool, Scheduler, SchedulerConfig, Sequence, StopRule
    from kvflow.engines.native.sampler import RequestSampling

    pool = BlockPool(runner.num_blocks, runner.block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192,
                                      block_size=runner.block_size,
                                      max_model_len=runner.max_model_len, async_output=True), pool)
    gen = torch.Generator().manual_seed(batch)
    sampling = {}
    for i, p in enumerate(torch.randint(3, runner.cfg.vocab_size, (batch, isl), generator=gen).tolist()):
        sampling[f"d{i}"] = RequestSampling(temperature=0.0)
        sched.add(Sequence(f"d{i}", p, StopRule(max_tokens=osl, ignore_eos=True)))
    done: list[float] = []
    inflight = None
    with torch.inference_mode():
        while sched.has_work() or inflight is not None:
            out = sched.schedule() if sched.has_work() else None
            launched = None
            if out is not None and out.scheduled:
                launched = runner.launch(runner.prepare(out.scheduled), sampling, greedy_plain=True)
            if inflight is not None:
                _, prev_launched, full = inflight
                result = runner.collect(prev_launched) if prev_launched is not None else None
                if full:
                    done.append(time.perf_counter())
                sched.update(result.sampled if result is not None else {})
            full = out is not None and len(out.scheduled) == batch and all(
                not s.is_prefill for s in out.scheduled)
            inflight = (out, launched, full) if out is not None else None
    return batch * (len(done) - 1) / (done[-1] - done[0])


def decode_against_floor(runner: ModelRunner, model, batch: int,  # type: ignore[no-untyped-def]
                         args: argparse.Namespace, bw: float, label: str) -> tuple[float, float]:
    """(tokens/s, floor) at `batch`, printed; floor = batch / ((weight + KV bytes a step) / bw)."""
    tps = decode_tps(runner, batch, args.isl, args.osl)
    kv = batch * (args.isl + args.osl / 2) * kv_bytes_per_token(runner.cfg)
    floor = batch / ((weight_bytes(model) + kv) / bw)
    print(f"  {label} decode b={batch}: {tps:.0f} tok/s; floor {floor:.0f} ({tps / floor:.0%})",
          flush=True)
    return tps, floor


def prefill_step(runner: ModelRunner, length: int):  # type: ignore[no-untyped-def]
    """One fresh prompt of `length` tokens and its next token's logits, as the engine runs it
    (the last layer keeps the sampling row alone)."""
    meta = single_prefill_meta(length, runner.block_size, runner.device)
    ids = torch.randint(3, runner.cfg.vocab_size, (length,), device="cuda")
    pos = torch.arange(length, device="cuda")
    last = torch.tensor([length - 1], device="cuda")
    model = runner.model
    return lambda: model.compute_logits(model(ids, pos, meta, keep=last))


def prefill_ms(runner: ModelRunner, length: int) -> float:
    step = prefill_step(runner, length)
    with torch.inference_mode():
        return median_ms(step, reps=5)


def prefill_profile(runner: ModelRunner, length: int) -> None:
    """Top CUDA kernels of the prefill `prefill_ms` times (where its time goes)."""
    from bench.native_gpu import kernel_profile

    kernel_profile(prefill_step(runner, length), f"prefill {length}")


def decode_profile(runner: ModelRunner, batch: int, context: int) -> None:
    """Top CUDA kernels of one eager decode step at `batch` sequences of `context` cached
    tokens (the kernels a graph replays)."""
    from bench.native_gpu import kernel_profile
    from kvflow.engines.native.attention import uniform_decode_meta

    meta = uniform_decode_meta(batch, context, runner.block_size, runner.device)
    ids = torch.full((batch,), 5, device="cuda")
    pos = torch.full((batch,), context, device="cuda")
    model = runner.model
    kernel_profile(lambda: model.compute_logits(model(ids, pos, meta)), f"eager decode b={batch}")


def shape_table(rows_list: list[int]) -> None:
    """us per product (CUDA-graph replays) for the 8B model's gate_up (28672 x 4096) and down
    (4096 x 14336); the FP8 GEMV's launch is the one it tuned for the shape."""
    from kvflow.engines.native import triton_gemv as tg
    from kvflow.engines.native.triton_fp8 import fp8_linear

    print(f"{'shape':<14}{'rows':>5}{'bf16 gemv':>11}{'bf16 cuBLAS':>13}{'fp8 gemv':>10}"
          f"{'fp8 _scaled_mm':>16}  (us per product)")
    for n, k in ((28672, 4096), (4096, 14336)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        w8 = (w.float() / scale[:, None]).to(FP8)
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            cells = _cells(x, w, w8, scale, tg.gemv, fp8_linear)
            print(f"{f'{n}x{k}':<14}{rows:>5}" + "".join(
                f"{1e3 * c:>{width}.1f}" for c, width in zip(cells, (11, 13, 10, 16), strict=True)))


def graph_ms(fn, reps: int = 20) -> float:  # type: ignore[no-untyped-def]
    """ms per call of `fn` replayed from a CUDA graph (as decode runs it: no launch overhead);
    the first call runs outside the capture (compiles, and tunes the FP8 GEMV)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return median_ms(graph.replay, 5) / reps


def _cells(x, w, w8, scale, gemv, fp8_linear) -> list[float]:  # type: ignore[no-untyped-def]
    few = x.shape[0] <= 16  # the GEMVs re-read weight tiles per row: small batches only
    nan = float("nan")
    return [
        graph_ms(lambda: gemv(x, w)) if few else nan,
        graph_ms(lambda: torch.nn.functional.linear(x, w)),
        graph_ms(lambda: gemv(x, w8, scale=scale)) if few else nan,
        graph_ms(lambda: fp8_linear(x, w8, scale)),
    ]


def model_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the 8B-shape benches: decode batches and lengths, prefill length, KV blocks."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--isl", type=int, default=512)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=8192)
    parser.add_argument("--blocks", type=int, default=4096, help="KV blocks of 16 tokens")
    return parser


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--prefill-profile", action="store_true",
                        help="the bf16 prefill's top CUDA kernels (torch.profiler)")
    parser.add_argument("--table-rows", type=int, nargs="*", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--decode-profile", type=int, nargs="*", default=[], metavar="BATCH",
                        help="the bf16 decode step's top CUDA kernels at these batches "
                             "(context: isl + osl/2)")
    parser.add_argument("--kinds", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"])
    args = parser.parse_args()
    bw = measure_bandwidth()
    peak_bf16, peak_fp8 = matmul_peaks()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s  "
          f"bf16 matmul {peak_bf16 / 1e12:.0f} TFLOP/s  FP8 (row-wise) {peak_fp8 / 1e12:.0f} "
          "TFLOP/s", flush=True)
    if args.table_rows:
        shape_table(args.table_rows)
    cfg = ModelConfig.from_dict(LLAMA_8B)
    model = random_model(cfg, args.prefill_len + 16)
    proj_params = sum(model.get_submodule(f"layers.{i}.{p}").weight.numel()
                      for i in range(cfg.num_layers) for p in FP8_PROJECTIONS)
    results: dict[str, dict[str, float]] = {}
    for kind in args.kinds:
        if kind == "fp8":
            quantize_in_place(model)
        t0 = time.perf_counter()
        runner = ModelRunner(model, engine_config(args), torch.device("cuda"), torch.bfloat16,
                             args.prefill_len + 16)
        wbytes = weight_bytes(model)
        print(f"{kind}: runner ready in {time.perf_counter() - t0:.1f}s, decode reads "
              f"{wbytes / 1e9:.2f} GB of weights per step", flush=True)
        row: dict[str, float] = {}
        for b in args.batches:
            tps, floor = decode_against_floor(runner, model, b, args, bw, kind)
            row[f"b{b}"], row[f"b{b}_floor"] = tps, floor
        ms = prefill_ms(runner, args.prefill_len)
        if args.prefill_profile and kind == "bf16":
            prefill_profile(runner, args.prefill_len)
        for b in args.decode_profile if kind == "bf16" else ():
            decode_profile(runner, b, args.isl + args.osl // 2)
        tps = args.prefill_len / (ms / 1e3)
        flops = 2 * proj_params * args.prefill_len
        row["prefill"] = tps
        print(f"  {kind} prefill {args.prefill_len}: {ms:.1f} ms = {tps:.0f} tok/s; 2*params*tokens "
              f"= {flops / 1e12:.1f} TFLOP -> {flops / (ms / 1e3) / 1e12:.0f} TFLOP/s = "
              f"{flops / (ms / 1e3) / peak_bf16:.0%} of the bf16 peak, "
              f"{flops / (ms / 1e3) / peak_fp8:.0%} of the FP8 peak", flush=True)
        results[kind] = row
        del runner
        model.set_kv_caches([torch.empty(0)] * cfg.num_layers)
        gc.collect()
        torch.cuda.empty_cache()
    if len(results) < 2:  # one kind only: its rows above are the figures
        return
    print(f"\n{'batch':>6}{'bf16 tok/s':>12}{'bf16 floor':>12}{'fp8 tok/s':>12}{'fp8 floor':>12}"
          f"{'fp8/bf16':>10}{'fp8 of floor':>14}")
    for b in args.batches:
        bf, fp = results["bf16"], results["fp8"]
        print(f"{b:>6}{bf[f'b{b}']:>12.0f}{bf[f'b{b}_floor']:>12.0f}{fp[f'b{b}']:>12.0f}"
              f"{fp[f'b{b}_floor']:>12.0f}{fp[f'b{b}'] / bf[f'b{b}']:>10.2f}"
              f"{fp[f'b{b}'] / fp[f'b{b}_floor']:>14.0%}")
    from kvflow.engines.native import triton_gemv as tg

    print("FP8 GEMV launches chosen (device, N, K, prologue, one row, TMA fits) -> config:", tg._fp8_tuned)
    ratio = results["fp8"]["prefill"] / results["bf16"]["prefill"]
    print(f"prefill {args.prefill_len}: fp8/bf16 = {ratio:.2f}")


if __name__ == "__main__":
    main()
