"""Linear-layer speed: dense fp32/bf16, torchao's emulated MXFP4, and ours (eager and compiled).

    python benchmarks/linear_bench.py [--shapes 576x1536,1536x576,2048x8192] [--batches 1,512] [--json PATH]

Each shape is ``in_features x out_features``. Everything runs side by side in one process, so the
ratios are comparable; absolute times depend on the machine. Ours is W4A4 MXFP4 with the block
Hadamard (``MXFP4BlockRotConfig``) on a bf16 layer, eager, compiled (decoding the packed weight on
every call), and compiled with ``cache_dequantized_weights`` (decoded once); torchao's is
``MXDynamicActivationMXWeightConfig`` with FP4 E2M1 weights and activations and
``KernelPreference.EMULATED`` (bf16 only; it does not compile on CPU).
Also reports how many Inductor kernels the compiled activation path (rotate + quantize) becomes.
"""

import argparse
import copy
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch
from torchao.quantization import quantize_

import torchao_mx_ext as tme


def bench(fn, x, min_time=0.5, max_iters=200):
    with torch.no_grad():
        for _ in range(2):
            fn(x)
        times = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_iters):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torchao_mx_emulated(lin):
    from torchao.prototype.mx_formats.inference_workflow import MXDynamicActivationMXWeightConfig
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    m = copy.deepcopy(lin).to(torch.bfloat16)
    quantize_(
        m,
        MXDynamicActivationMXWeightConfig(
            activation_dtype=torch.float4_e2m1fn_x2,
            weight_dtype=torch.float4_e2m1fn_x2,
            kernel_preference=KernelPreference.EMULATED,
        ),
    )
    return m


def count_activation_kernels(k: int, config) -> dict:
    """Inductor kernels generated for the activation path alone (pad/rotate + MXFP4 quantize-dequantize)."""
    from torch._inductor.utils import run_and_get_code

    lin = torch.nn.Linear(k, 64)
    quantize_(lin, config)
    w = lin.weight

    def act_path(x):
        return tme.mx.mxfp4_fake_quantize(w.rotate_input(x), w.block_size, w.act_scale_rule)

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(act_path, fullgraph=True), torch.randn(512, k))
    src = "\n".join(code)
    fused = set(re.findall(r"def (cpp_fused\w*)|(cpp_fused\w*) = async_compile", src))
    names = {a or b for a, b in fused}
    externs = re.findall(r"extern_kernels\.(\w+)\(", src)
    return {"fused_kernels": len(names), "extern_calls": externs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="576x1536,1536x576,2048x8192")
    p.add_argument("--batches", default="1,512")
    p.add_argument("--json", default="benchmarks/results/linear_bench.json")
    args = p.parse_args()
    torch.manual_seed(0)
    config = tme.MXFP4BlockRotConfig()
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        base = torch.nn.Linear(k, n, bias=False)
        fp32 = base
        bf16 = copy.deepcopy(base).to(torch.bfloat16)
        ao = torchao_mx_emulated(base)
        ours = copy.deepcopy(base)
        quantize_(ours, config)
        ours.to(torch.bfloat16)
        ours_cached = tme.cache_dequantized_weights(copy.deepcopy(ours))
        torch._dynamo.reset()
        ours_c = torch.compile(ours, fullgraph=True, dynamic=False)
        ours_cc = torch.compile(ours_cached, fullgraph=True, dynamic=False)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, k)
            xb = x.to(torch.bfloat16)
            t = {
                "fp32": bench(fp32, x),
                "bf16": bench(bf16, xb),
                "torchao_mx_emulated": bench(ao, xb),
                "ours_eager": bench(ours, xb),
                "ours_compiled": bench(ours_c, xb),
                "ours_compiled_cached": bench(ours_cc, xb),
            }
            row = {"in": k, "out": n, "batch": batch, "ms": t}
            row["speedup_vs_torchao"] = {v: t["torchao_mx_emulated"] / t[v] for v in ("ours_compiled", "ours_compiled_cached")}
            row["time_vs_bf16"] = {v: t[v] / t["bf16"] for v in ("ours_compiled", "ours_compiled_cached")}
            rows.append(row)
    kernels = count_activation_kernels(1536, config)

    print("times in ms (median); ours = W4A4 MXFP4 + block Hadamard on bf16; cc = torch.compile(fullgraph=True);")
    print("cached = cache_dequantized_weights; speed-up = torchao time / ours; x bf16 = ours time / dense bf16")
    print(
        f"{'in x out':>11} {'batch':>5} | {'fp32':>8} {'bf16':>8} {'torchao':>9} {'ours':>8} {'ours cc':>8} {'cached cc':>9} |"
        f" {'speed-up cc':>11} {'cached':>7} | {'x bf16 cc':>9} {'cached':>7}"
    )
    for r in rows:
        t, up, vs = r["ms"], r["speedup_vs_torchao"], r["time_vs_bf16"]
        print(
            f"{r['in']:>5}x{r['out']:<5} {r['batch']:>5} | {t['fp32']:>8.3f} {t['bf16']:>8.3f} "
            f"{t['torchao_mx_emulated']:>9.3f} {t['ours_eager']:>8.3f} {t['ours_compiled']:>8.3f} {t['ours_compiled_cached']:>9.3f} |"
            f" {up['ours_compiled']:>10.1f}x {up['ours_compiled_cached']:>6.1f}x | {vs['ours_compiled']:>8.2f}x {vs['ours_compiled_cached']:>6.2f}x"
        )
    print(f"compiled activation path (1536 wide): {kernels['fused_kernels']} fused C++ kernel(s), extern calls {kernels['extern_calls']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": "MXFP4BlockRotConfig()",
        "rows": rows,
        "activation_path_kernels": kernels,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
