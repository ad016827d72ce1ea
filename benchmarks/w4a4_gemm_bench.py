"""W4A4 linears on CPU: the exact integer MXFP4 GEMM against dense and emulated GEMMs, side by side.

    python benchmarks/w4a4_gemm_bench.py [--threads 2] [--rows 1,8,64,512] [--json benchmarks/results/w4a4_gemm_bench.json]

Per SmolLM2-135M linear shape (in x out) and number of activation rows M, the median time of:

- ``bf16``: ``F.linear`` on bfloat16 operands (the dense model's GEMM);
- ``fp32``: ``F.linear`` in float32;
- ``emulated``: the W4A4 float emulation on a bfloat16 model as ``RotatedMXFP4Tensor.linear`` runs it
  without kernels: the activation fake-quantized (``mxfp4_fake_quantize``), the weight decoded
  (``mxfp4_dequantize``) and a bfloat16 ``F.linear``;
- ``emulated_fp32``: the same with a float32 GEMM (same numbers up to summation order; what
  ``RotatedMXFP4Tensor.linear`` runs for bfloat16 inputs on CPUs without native bfloat16 GEMMs);
- ``int_mm``: the integer GEMM on codes (``torch.ops.torchao_mx_ext.mxfp4_mm``; the activation's codes
  are made beforehand, as a compiled model's fused quantizer hands them over), on the widest path the
  CPU has;
- ``int_mm_avx2``: the same forced onto its AVX2 path, where the widest is AVX-512 VNNI (the two
  path switches around the call cost about a microsecond);
- ``decode_gemm``: the C++ weight decode (``mxfp4_dequantize``) then the library GEMM on the
  fake-quantized input, in bfloat16 where oneDNN has bf16 instructions and float32 elsewhere: what
  ``RotatedMXFP4Tensor.linear`` runs for many rows where the decode is vectorised (AVX-512);
- ``gemv``: the dequant-GEMV on the fake-quantized activation (``mxfp4_gemv``; M <= 64), which W4A4
  decode steps ran before the integer GEMM.

All operands are made once; every variant of a shape is timed in the same loop, interleaved. Also
checks that ``int_mm`` equals ``emulated`` within float32 summation rounding (the tests check it
against float64).
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torchao_mx_ext.kernels import CPU_NATIVE_BF16_GEMM, cpu_extension, cpu_mxfp4_dequantize, cpu_mxfp4_gemv, cpu_mxfp4_mm
from torchao_mx_ext.mx import mxfp4_dequantize, mxfp4_fake_quantize, mxfp4_quantize

# SmolLM2-135M's linears: q/o (576x576), k/v (576x192), gate/up (576x1536), down (1536x576).
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
VARIANTS = ("bf16", "fp32", "emulated", "emulated_fp32", "int_mm", "int_mm_avx2", "decode_gemm", "gemv")
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512_vnni"}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved_median_ms(fns: dict, reps: int) -> dict:
    """Each callable's median time in ms: one warm-up call each, then ``reps`` rounds calling every one
    in turn (interleaved: drift hits every variant alike)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _on_avx2(fn):
    def run():
        set_isa = torch.ops.torchao_mx_ext._mxfp4_mm_set_isa
        set_isa(1)
        try:
            return fn()
        finally:
            set_isa(-1)

    return run


def bench_shape(k: int, n: int, m: int, reps: int, isa: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    wq, ws = mxfp4_quantize(w)
    aq, as_ = mxfp4_quantize(x)
    xb, wb, xq = x.bfloat16(), w.bfloat16(), mxfp4_fake_quantize(x).bfloat16()
    fns = {
        "bf16": lambda: F.linear(xb, wb),
        "fp32": lambda: F.linear(x, w),
        "emulated": lambda: F.linear(mxfp4_fake_quantize(xb), mxfp4_dequantize(wq, ws, dtype=torch.bfloat16)),
        "emulated_fp32": lambda: F.linear(mxfp4_fake_quantize(xb).float(), mxfp4_dequantize(wq, ws)).bfloat16(),
        "int_mm": lambda: cpu_mxfp4_mm.mxfp4_mm(aq, as_, wq, ws, 32, out_dtype=torch.bfloat16),
    }
    if isa > 1:
        fns["int_mm_avx2"] = _on_avx2(fns["int_mm"])
    gemm_dtype = torch.bfloat16 if CPU_NATIVE_BF16_GEMM else torch.float32
    xg = xq.to(gemm_dtype)
    fns["decode_gemm"] = lambda: F.linear(xg, cpu_mxfp4_dequantize.mxfp4_dequantize(wq, ws, 32, gemm_dtype)).bfloat16()
    if m <= cpu_mxfp4_gemv.MAX_ROWS:
        fns["gemv"] = lambda: cpu_mxfp4_gemv.mxfp4_gemv(xq, wq, ws, 32, "floor", out_dtype=torch.bfloat16)
    ms = interleaved_median_ms(fns, reps)
    exact = F.linear(mxfp4_fake_quantize(x), mxfp4_dequantize(wq, ws)).double()
    got = cpu_mxfp4_mm.mxfp4_mm(aq, as_, wq, ws, 32).double()
    return {
        "in": k, "out": n, "rows": m, "ms": ms,
        "int_mm_speedup_vs_bf16": ms["bf16"] / ms["int_mm"],
        "int_mm_speedup_vs_fp32": ms["fp32"] / ms["int_mm"],
        "int_mm_speedup_vs_emulated": ms["emulated"] / ms["int_mm"],
        "int_mm_speedup_vs_emulated_fp32": ms["emulated_fp32"] / ms["int_mm"],
        "int_mm_speedup_vs_avx2": ms["int_mm_avx2"] / ms["int_mm"] if "int_mm_avx2" in ms else None,
        "decode_gemm_speedup_vs_int_mm": ms["int_mm"] / ms["decode_gemm"],
        "int_mm_max_rel_diff": ((got - exact).abs().max() / exact.abs().max()).item(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,64,512")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", default="benchmarks/results/w4a4_gemm_bench.json")
    args = p.parse_args(argv)
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows takes comma-separated positive integers, got {args.rows!r}")
    if not row_counts or min(row_counts) < 1 or args.threads < 1 or args.reps < 1:
        p.error("--rows, --threads and --reps must be positive")
    torch.set_num_threads(args.threads)
    if not cpu_extension.is_available():
        raise SystemExit("the CPU MXFP4 kernels did not build (see the warning above): nothing to time")
    best = cpu_mxfp4_mm.set_isa(None)
    isa = ISA_NAMES[best]
    rows = [bench_shape(k, n, m, args.reps, best) for m in row_counts for k, n in SHAPES]
    print(f"W4A4 linears, {args.threads} threads, median of {args.reps} (ms); integer path: {isa}; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'in x out':>10} {'M':>4} " + " ".join(f"{v[:9]:>9}" for v in VARIANTS) + f" {'x bf16':>7} {'x fp32':>7} {'x emul':>7} {'x em32':>7} {'dec/int':>7}")
    for r in rows:
        cells = " ".join(f"{r['ms'].get(v, float('nan')):>9.3f}" for v in VARIANTS)
        print(f"{r['in']:>4}x{r['out']:<5} {r['rows']:>4} {cells} {r['int_mm_speedup_vs_bf16']:>7.2f}"
              f" {r['int_mm_speedup_vs_fp32']:>7.2f} {r['int_mm_speedup_vs_emulated']:>7.2f}"
              f" {r['int_mm_speedup_vs_emulated_fp32']:>7.2f} {r['decode_gemm_speedup_vs_int_mm']:>7.2f}")
    from torchao_mx_ext.cli import write_json_atomic

    write_json_atomic(Path(args.json), {
        "machine": {"cpu": platform.processor() or platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__, "threads": args.threads, "integer_path": isa,
                    "decode_vectorized": cpu_mxfp4_dequantize.VECTORIZED, "native_bf16_gemm": CPU_NATIVE_BF16_GEMM},
        "rows": rows,
    })
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
