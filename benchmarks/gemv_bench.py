"""Small-batch (decode) linear speed on CPU: dense bf16/fp32 against weight-only MXFP4, with the weight
decoded densely on every call (the dequantize path) or inside the reduction (the fused kernel).

    python benchmarks/gemv_bench.py [--shapes 576x576,576x1536] [--rows 1,4] [--rounds 7] [--threads N]
                                    [--rotation] [--no-compile] [--no-layers] [--json PATH]

Each shape is ``in_features x out_features`` (SmolLM2-135M's by default; 576x49152 is its LM head).
Every variant of one shape and row count runs side by side in one process, interleaved round by
round; a variant's time is the median over rounds of the median single-call time in a round, so the
ratios are comparable even on a busy machine (absolute times are not). Variants:

- ``bf16`` / ``bf16_compiled``: ``F.linear`` on a bf16 weight, eager / ``torch.compile`` (the baseline)
- ``fp32``: ``F.linear`` on a float32 weight
- ``mx_dequant`` / ``mx_dequant_compiled``: our bf16 ``nn.Linear`` quantized with ``MXFP4Config(act_quant=False)``
  with the kernel switched off (the weight decoded densely on every call, then a bf16 GEMM)
- ``mx_kernel`` / ``mx_kernel_compiled``: the same layer through the fused kernel (what it does by default)
- ``kernel_op_bf16`` / ``kernel_op_fp32``: the operator alone, bf16 / float32 activations
- ``kernel_op_mx_input``: the operator alone on an MX fake-quantized bf16 input (a W4A4 decode step's
  input): on AVX2 CPUs its exact integer path
- ``int8_aten`` / ``int8_kernel``: the int8 weight-only product of ``quantize_output_head("int8")`` on the
  same weight, ATen's ``_weight_int8pack_mm`` / our ``int8_gemv`` op

Then the seven linears of two SmolLM2-135M decoder layers as one graph (bf16 eager and compiled,
ours eager and compiled, the dequantize path compiled): torch.compile's per-call wrapper costs tens of
µs on CPU, more than one small GEMV, and a compiled decoder pays it once per step, not per linear.

``GB/s`` is the weight bytes one call reads (bf16: 2 per parameter, fp32: 4, MXFP4: 0.5 + 1/32)
divided by its time; the copy bandwidth of a 256 MiB ``Tensor.copy_`` (read + write counted) is
printed for context. Weights of the smaller shapes stay in cache between calls, so their GB/s can
exceed it.
"""

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torchao.quantization import quantize_

import torchao_mx_ext as tme
from torchao_mx_ext.inference import Int8WeightOnlyLinear
from torchao_mx_ext.kernels import cpu_int8_gemv, cpu_mxfp4_gemv
from torchao_mx_ext.mx.quantize import mxfp4_fake_quantize

DEFAULT_SHAPES = "576x576,576x192,576x1536,1536x576,576x49152"


def copy_bandwidth_gbps(mib: int = 256, repeats: int = 5) -> float:
    src = torch.empty(mib * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(times[1:]) / 1e9


SLOW_S = 0.5  # a variant slower than this per call (the eager dequantize path on the LM head) runs
# once per round in the first 3 rounds only


def run_interleaved(fns: dict, rounds: int, target_s: float = 0.02) -> dict:
    """Median over rounds of each variant's median single-call time in the round, in µs."""
    with torch.no_grad():
        counts = {}
        for name, fn in fns.items():  # warm up (compiles), then size a round to ~target_s
            fn()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            counts[name] = 0 if dt > SLOW_S else max(3, min(200, int(target_s / max(dt, 1e-7))))
        per_round = {name: [] for name in fns}
        for r in range(rounds):
            for name, fn in fns.items():
                n = counts[name] or (1 if r < 3 else 0)
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                if times:
                    per_round[name].append(statistics.median(times))
    return {name: statistics.median(v) * 1e6 for name, v in per_round.items()}


class KernelOff:
    """Switch the fused kernel off (``applies`` is read per eager call, and once when tracing)."""

    def __enter__(self):
        self._applies = cpu_mxfp4_gemv.applies
        cpu_mxfp4_gemv.applies = lambda weight, x: False

    def __exit__(self, *exc):
        cpu_mxfp4_gemv.applies = self._applies


def _call_with_kernel(module, x):
    return module(x)


def _call_without_kernel(module, x):
    return module(x)


def variants_for(k: int, n: int, rows: int, rotation: bool, compiled: bool) -> tuple[dict, dict]:
    torch.manual_seed(0)
    dense = torch.nn.Linear(k, n, bias=False)
    w32 = dense.weight.detach()
    wb = w32.bfloat16()
    x32 = torch.randn(rows, k)
    xb = x32.bfloat16()
    config = tme.MXFP4BlockRotConfig(act_quant=False) if rotation else tme.MXFP4Config(act_quant=False)
    mx = copy.deepcopy(dense).to(torch.bfloat16)
    quantize_(mx, config)
    w = mx.weight
    xr = w.rotate_input(xb)
    xq = mxfp4_fake_quantize(xr.float(), w.block_size, w.scale_rule).bfloat16()
    head = Int8WeightOnlyLinear.from_linear(copy.deepcopy(dense).to(torch.bfloat16))

    def off(fn):
        def wrapped():
            with KernelOff():
                return fn()

        return wrapped

    fns = {
        "bf16": lambda: F.linear(xb, wb),
        "fp32": lambda: F.linear(x32, w32),
        "mx_dequant": off(lambda: mx(xb)),
        "mx_kernel": lambda: mx(xb),
        "kernel_op_bf16": lambda: cpu_mxfp4_gemv.mxfp4_gemv(xr.bfloat16(), w.qdata, w.scale, w.block_size, w.scale_rule),
        "kernel_op_fp32": lambda: cpu_mxfp4_gemv.mxfp4_gemv(xr, w.qdata, w.scale, w.block_size, w.scale_rule),
        "kernel_op_mx_input": lambda: cpu_mxfp4_gemv.mxfp4_gemv(xq, w.qdata, w.scale, w.block_size, w.scale_rule),
        "int8_aten": lambda: torch.ops.aten._weight_int8pack_mm(xb, head.qweight, head.scales),
        "int8_kernel": lambda: cpu_int8_gemv.int8_gemv(xb, head.qweight, head.scales),
    }
    if compiled:
        # Two functions, so two code objects: Dynamo keeps one cache per code object and would
        # otherwise hand the kernel variant the kernel-off graph (its guards cannot tell them apart).
        torch._dynamo.reset()
        lin_c = torch.compile(F.linear, fullgraph=True, dynamic=False)
        mx_c = torch.compile(_call_with_kernel, fullgraph=True, dynamic=False)
        mx_off_c = torch.compile(_call_without_kernel, fullgraph=True, dynamic=False)
        with torch.no_grad():
            for fn, kernel in ((lambda: mx_c(mx, xb), True), (off(lambda: mx_off_c(mx, xb)), False)):
                _, code = run_and_get_code(fn)
                assert ("torchao_mx_ext.mxfp4_gemv" in "\n".join(code)) == kernel, "compiled the wrong path"
        fns["bf16_compiled"] = lambda: lin_c(xb, wb)
        fns["mx_dequant_compiled"] = lambda: mx_off_c(mx, xb)
        fns["mx_kernel_compiled"] = lambda: mx_c(mx, xb)
    mx_bytes = n * k // 2 + n * (k // w.block_size)
    weight_bytes = {
        "bf16": 2 * n * k, "bf16_compiled": 2 * n * k, "fp32": 4 * n * k,
        **{name: mx_bytes for name in fns if name.startswith(("mx_", "kernel_"))},
        "int8_aten": n * k + 2 * n, "int8_kernel": n * k + 2 * n,
    }
    order = ["bf16", "bf16_compiled", "fp32", "mx_dequant", "mx_dequant_compiled", "mx_kernel", "mx_kernel_compiled", "kernel_op_bf16",
             "kernel_op_fp32", "kernel_op_mx_input", "int8_aten", "int8_kernel"]
    return {name: fns[name] for name in order if name in fns}, weight_bytes


class DecoderLinears(torch.nn.Module):
    """The seven linears of SmolLM2-135M's decoder layers (attention q/k/v/o, MLP gate/up/down) wired
    into a small graph, ``layers`` times: what one decode step's linears do, without the attention."""

    def __init__(self, layers: int = 2, hidden: int = 576, kv: int = 192, inter: int = 1536):
        super().__init__()
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"q": lin(hidden, hidden), "k": lin(hidden, kv), "v": lin(hidden, kv), "o": lin(hidden, hidden),
                                 "gate": lin(hidden, inter), "up": lin(hidden, inter), "down": lin(inter, hidden)})
            for _ in range(layers)
        )

    def forward(self, x):
        for b in self.blocks:
            kv = b["k"](x).sum() + b["v"](x).sum()
            x = x + b["o"](b["q"](x)) + kv
            x = x + b["down"](F.silu(b["gate"](x)) * b["up"](x))
        return x


def layer_variants(rows: int, rotation: bool) -> tuple[dict, int]:
    torch.manual_seed(0)
    dense = DecoderLinears().to(torch.bfloat16)
    x = torch.randn(1, rows, 576).bfloat16() * 0.1
    config = tme.MXFP4BlockRotConfig(act_quant=False) if rotation else tme.MXFP4Config(act_quant=False)
    mx = copy.deepcopy(dense)
    quantize_(mx, config)
    torch._dynamo.reset()
    dense_c = torch.compile(_call_dense, fullgraph=True, dynamic=False)
    mx_c = torch.compile(_call_with_kernel, fullgraph=True, dynamic=False)
    mx_off_c = torch.compile(_call_without_kernel, fullgraph=True, dynamic=False)

    def off(fn):
        def wrapped():
            with KernelOff():
                return fn()

        return wrapped

    with torch.no_grad():
        for fn, kernel in ((lambda: mx_c(mx, x), True), (off(lambda: mx_off_c(mx, x)), False)):
            _, code = run_and_get_code(fn)
            assert ("torchao_mx_ext.mxfp4_gemv" in "\n".join(code)) == kernel, "compiled the wrong path"
    fns = {
        "bf16": lambda: dense(x),
        "bf16_compiled": lambda: dense_c(dense, x),
        "mx_dequant_compiled": lambda: mx_off_c(mx, x),
        "mx_kernel": lambda: mx(x),
        "mx_kernel_compiled": lambda: mx_c(mx, x),
    }
    params = sum(p.numel() for p in dense.parameters())
    return fns, params


def _call_dense(module, x):
    return module(x)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--rows", default="1,4", help="M, the activation rows (decode: 1)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rotation", action="store_true", help="MXFP4BlockRotConfig (adds the activation's block Hadamard)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-layers", action="store_true", help="skip the compiled decoder-linears graph")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # The kernel-off variants are traced from the same graph as the kernel ones: the on-disk caches,
    # keyed on that graph, would hand one the other's code.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    if not cpu_mxfp4_gemv.is_available():
        raise SystemExit("the fused CPU MXFP4 GEMV kernel is not available (see the warning above)")
    isa = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx512_bf16"}[cpu_mxfp4_gemv.set_isa(None)]
    copy_gbps = copy_bandwidth_gbps()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, kernel path {isa}; copy bandwidth {copy_gbps:.1f} GB/s")
    rows_out = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.rows.split(",")):
            fns, weight_bytes = variants_for(k, n, m, args.rotation, not args.no_compile)
            us = run_interleaved(fns, args.rounds)
            base = us["bf16"]
            print(f"\n{k}x{n}  M={m}")
            print(f"  {'variant':22s} {'median us':>10s} {'vs bf16':>8s} {'GB/s':>7s}")
            for name, t in us.items():
                gbps = weight_bytes[name] / (t * 1e-6) / 1e9
                print(f"  {name:22s} {t:10.1f} {base / t:7.2f}x {gbps:7.1f}")
                rows_out.append({"shape": shape, "in": k, "out": n, "rows": m, "variant": name, "us": t,
                                 "speedup_vs_bf16": base / t, "weight_gbps": gbps})
    if not args.no_layers and not args.no_compile:
        # One compiled graph of 14 linears: torch.compile's per-call wrapper cost (large next to one
        # small GEMV) is paid once, as in a compiled decoder.
        for m in (int(v) for v in args.rows.split(",")):
            fns, params = layer_variants(m, args.rotation)
            us = run_interleaved(fns, args.rounds)
            base = us["bf16"]
            print(f"\nSmolLM2-135M decoder linears x2 layers ({params / 1e6:.1f} M params, one graph)  M={m}")
            print(f"  {'variant':22s} {'median us':>10s} {'vs bf16':>8s} {'vs bf16_compiled':>17s}")
            for name, t in us.items():
                print(f"  {name:22s} {t:10.1f} {base / t:7.2f}x {us['bf16_compiled'] / t:16.2f}x")
                rows_out.append({"shape": "decoder_linears_x2", "rows": m, "variant": name, "us": t, "speedup_vs_bf16": base / t,
                                 "speedup_vs_bf16_compiled": us["bf16_compiled"] / t})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernel_path": isa, "copy_gbps": copy_gbps,
                "rotation": args.rotation, "rounds": args.rounds}
        args.json.write_text(json.dumps({"meta": meta, "results": rows_out}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
