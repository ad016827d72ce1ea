"""CPU attention of a prompt and of a decode step: our kernels against ATen's SDPA, side by side.

    python benchmarks/attention_bench.py [--threads 1] [--prompt-lens 128,512] [--reps 10]
        [--json benchmarks/results/attention_bench.json]

SmolLM2-135M's attention (9 query heads on 3 key/value heads, head size 64, bf16) against a static
cache 32 slots longer than the prompt, with the boolean mask transformers builds for it:

- prompt: ``aten_sdpa`` is transformers' ``sdpa`` path (keys and values repeated per query head,
  ``F.scaled_dot_product_attention`` with the mask); ``ours`` is ``cpu_prompt_attention.prompt_attention``
  (grouped heads read their key/value head, masked key blocks skipped), where it applies (AVX-512 CPUs
  without AMX);
- decode: one query row per head, GQA-packed (``[1, 3, 3, 64]``) against the full cache: ATen's SDPA on
  the packed rows against ``cpu_decode_attention.decode_attention``.

Every variant of a case is timed in the same loop, interleaved; medians. Also checks that ours agrees
with ATen's to bf16 rounding (the tests check both against float64).
"""

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from w4a4_gemm_bench import interleaved_median_ms  # noqa: E402

from torchao_mx_ext.kernels import cpu_decode_attention, cpu_extension, cpu_prompt_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, SLACK = 9, 3, 64, 32


def bench_prompt(lq: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    L = lq + SLACK
    q = torch.randn(1, HEADS, lq, HEAD_DIM, generator=gen).bfloat16()
    k, v = (torch.randn(1, KV_HEADS, L, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
    mask = torch.ones(lq, L, dtype=torch.bool).tril()[None, None]
    groups = HEADS // KV_HEADS
    scale = HEAD_DIM**-0.5
    fns = {"aten_sdpa": lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                                               attn_mask=mask, scale=scale)}
    if cpu_prompt_attention.applies(q, k, v, mask):
        fns["ours"] = lambda: cpu_prompt_attention.prompt_attention(q, k, v, mask, scale)
    ms = interleaved_median_ms(fns, reps)
    row = {"case": "prompt", "query_rows": lq, "keys": L, "ms": ms}
    if "ours" in fns:
        ref = fns["aten_sdpa"]().float()
        row["ours_speedup"] = ms["aten_sdpa"] / ms["ours"]
        row["max_abs_diff"] = (fns["ours"]().float() - ref).abs().max().item()
    return row


def bench_decode(L: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM, generator=gen).bfloat16()
    k, v = (torch.randn(1, KV_HEADS, L, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
    mask = torch.ones(1, 1, 1, L, dtype=torch.bool)
    mask[..., L - SLACK // 2:] = False  # unfilled cache slots
    scale = HEAD_DIM**-0.5
    fns = {"aten_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)}
    if cpu_decode_attention.applies(q, k, v, mask):
        fns["ours"] = lambda: cpu_decode_attention.decode_attention(q, k, v, mask, scale)
    ms = interleaved_median_ms(fns, reps)
    row = {"case": "decode", "query_rows": HEADS // KV_HEADS, "keys": L, "ms": ms}
    if "ours" in fns:
        row["ours_speedup"] = ms["aten_sdpa"] / ms["ours"]
        row["max_abs_diff"] = (fns["ours"]().float() - fns["aten_sdpa"]().float()).abs().max().item()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-lens", default="128,512")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default="benchmarks/results/attention_bench.json")
    args = p.parse_args(argv)
    try:
        lens = [int(x) for x in args.prompt_lens.split(",")]
    except ValueError:
        p.error(f"--prompt-lens takes comma-separated integers, got {args.prompt_lens!r}")
    if not lens or min(lens) < cpu_prompt_attention.MIN_QUERY_ROWS or args.threads < 1 or args.reps < 1:
        p.error(f"--prompt-lens must be at least {cpu_prompt_attention.MIN_QUERY_ROWS}; --threads and --reps positive")
    torch.set_num_threads(args.threads)
    if not cpu_extension.is_available():
        raise SystemExit("the CPU kernels did not build (see the warning above): nothing to time")
    rows = [bench_prompt(n, args.reps) for n in lens] + [bench_decode(n + SLACK, args.reps) for n in lens]
    print(f"attention, SmolLM2-135M heads ({HEADS} on {KV_HEADS}, D {HEAD_DIM}, bf16), {args.threads} threads, median of "
          f"{args.reps} (ms); CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'case':>7} {'rows':>5} {'keys':>5} {'aten_sdpa':>10} {'ours':>8} {'speedup':>8} {'max|diff|':>10}")
    for r in rows:
        ours = r["ms"].get("ours", float("nan"))
        print(f"{r['case']:>7} {r['query_rows']:>5} {r['keys']:>5} {r['ms']['aten_sdpa']:>10.3f} {ours:>8.3f}"
              f" {r.get('ours_speedup', float('nan')):>8.2f} {r.get('max_abs_diff', float('nan')):>10.4f}")
    from torchao_mx_ext.cli import write_json_atomic

    write_json_atomic(Path(args.json), {
        "machine": {"cpu": platform.processor() or platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__, "threads": args.threads},
        "rows": rows,
    })
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
