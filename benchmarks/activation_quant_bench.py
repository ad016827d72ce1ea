"""The input side of an MXFP4 linear on CPU: block rotation + activation quantizer, unfused against fused.

    python benchmarks/activation_quant_bench.py [--shapes 1x576,1x1536,8x576,512x576,512x1536]
        [--rule mse] [--rounds 7] [--threads N] [--json benchmarks/results/activation_quant_bench.json]

Each shape is ``rows x width`` (SmolLM2-135M's linear inputs: 576 for q/k/v/o/gate/up, 1536 for
down_proj; one row is a decode step, 512 a prefill). Variants, side by side in one process, interleaved
round by round (a variant's time: the median over rounds of the median call in a round):

- ``matmul+quantizer``: what a linear ran before the fused operator, ``x.view(..., 32) @ H`` (the 32x32
  block Hadamard, torch's matmul) then the C++ quantizer ``mxfp4_fake_quantize``
- ``fused``: ``mxfp4_rotate_fake_quantize``, rotation and quantizer in one pass
- ``fused rotation only``: the same operator with rule ``none`` (what a weight-only linear runs)
- ``matmul``: the rotation matmul alone, for context

Needs the C++ kernels (an AVX-512 CPU for their fast paths); ratios are ``matmul+quantizer / fused``.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from torchao_mx_ext.kernels import cpu_extension, cpu_mxfp4_quantize
from torchao_mx_ext.rotation import apply_block_rotation, rotation_block


def median_call_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def bench(shapes, rule: str, rounds: int) -> list:
    rot = rotation_block("hadamard", 32, 0, "cpu")
    rows = []
    for rows_n, width in shapes:
        x = torch.randn(rows_n, width, generator=torch.Generator().manual_seed(0))
        variants = {
            "matmul+quantizer": lambda: cpu_mxfp4_quantize.mxfp4_fake_quantize(apply_block_rotation(x, rot), 32, rule),
            "fused": lambda: cpu_mxfp4_quantize.mxfp4_rotate_fake_quantize(x, rot, 32, rule),
            "fused rotation only": lambda: cpu_mxfp4_quantize.mxfp4_rotate_fake_quantize(x, rot, 32, "none"),
            "matmul": lambda: apply_block_rotation(x, rot),
        }
        calls = 2000 if rows_n <= 8 else 100
        for fn in variants.values():  # warm-up
            for _ in range(20):
                fn()
        per_round = {name: [] for name in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                per_round[name].append(median_call_us(fn, calls))
        us = {name: statistics.median(v) for name, v in per_round.items()}
        rows.append({"rows": rows_n, "width": width, "us": us, "speedup": us["matmul+quantizer"] / us["fused"]})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1x576,1x1536,8x576,512x576,512x1536")
    p.add_argument("--rule", default="mse", choices=cpu_mxfp4_quantize.RULES)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/activation_quant_bench.json")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if any(w % 32 for _, w in shapes):
        raise SystemExit("activation_quant_bench: widths must be multiples of 32")
    if not cpu_extension.is_available():
        raise SystemExit("activation_quant_bench: the C++ kernels did not build (see the logged warning)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(shapes, args.rule, args.rounds)
    names = list(rows[0]["us"])
    print(f"{'shape':<10}" + "".join(f"{n + ' us':>24}" for n in names) + f"{'fused speedup':>15}")
    for r in rows:
        print(f"{r['rows']}x{r['width']:<8}" + "".join(f"{r['us'][n]:>24.1f}" for n in names) + f"{r['speedup']:>14.2f}x")
    out = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "rule": args.rule, "rounds": args.rounds, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
