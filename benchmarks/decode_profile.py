"""Where a batch-1 decode step spends its time: ``torch.profiler`` over greedy decode steps of one
``model_bench`` row, the operators by self CPU time, printed as a table and saved as JSON.

    python benchmarks/decode_profile.py --variant ours_w4a4_compiled --compile model [--steps 32]
        [--prompt-len 512] [--top 25] [--threads 2] [--json benchmarks/results/decode_profile.json]

The row is built exactly as ``model_bench.py`` builds it (same variants, ``--compile layers|model``),
warmed up (compiles), then one prompt is prefilled and ``--steps`` one-token steps run untimed, then the
same again with only the steps under the profiler (the prompt runs before it starts). ``step_ms`` is the wall time per step without the profiler (from the
untimed run), ``profiled_step_ms`` with it; an operator's ``self_ms_per_step`` is its self CPU time
summed over steps and threads' calling thread, divided by ``--steps``. Compiled regions show up as
``Torch-Compiled Region`` / ``CompiledFunction`` (their Inductor kernels are plain C++ with no
operator entries: their time is the region's self time), custom ops (``torchao_mx_ext::*``) and ATen
ops called from them by name.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_bench  # noqa: E402


def profile_decode(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from torchao_mx_ext.eval.generation import greedy_token, static_cache

    if args.threads:
        torch.set_num_threads(args.threads)
    model, notes = model_bench.build(args.variant, args)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    cache = static_cache(model, args.prompt_len + 2 * args.steps + 2)

    def prefill():
        return greedy_token(model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits)

    def steps(token, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            token = greedy_token(model(token, cache=cache, use_cache=True, logits_to_keep=1).logits)
        return time.perf_counter() - t0

    with torch.inference_mode():
        cache.reset()
        steps(prefill(), 2)  # warm-up: compiles the prompt and the decode graphs
        cache.reset()
        step_s = steps(prefill(), args.steps) / args.steps
        cache.reset()
        token = prefill()  # outside the profiled window: only decode steps are profiled
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled_s = steps(token, args.steps)
    rows = []
    for e in prof.key_averages():
        if e.count < args.steps:
            continue
        rows.append({
            "op": e.key,
            "calls_per_step": e.count / args.steps,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
            "total_ms_per_step": e.cpu_time_total / 1e3 / args.steps,
        })
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    return {
        "variant": args.variant,
        "compile": args.compile,
        "notes": notes,
        "threads": torch.get_num_threads(),
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "step_ms": step_s * 1e3,
        "tokens_per_s": 1 / step_s,
        "profiled_step_ms": profiled_s * 1e3 / args.steps,
        "ops": rows[: args.top],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variant", default="ours_w4a4_compiled", choices=model_bench.VARIANTS)
    p.add_argument("--compile", choices=("layers", "model"), default="layers")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all)")
    p.add_argument("--no-share", action="store_true")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.variant.startswith("llama.cpp"):
        p.error("llama.cpp rows are profiled by llama.cpp itself")
    report = profile_decode(args)
    print(f"{report['variant']} (--compile {report['compile']}), {report['threads']} threads: "
          f"{report['step_ms']:.2f} ms per decode step ({report['tokens_per_s']:.1f} tok/s) without the profiler")
    print(f"{'op':<60} {'calls/step':>10} {'self ms/step':>13} {'total ms/step':>14}")
    for r in report["ops"]:
        print(f"{r['op'][:60]:<60} {r['calls_per_step']:>10.1f} {r['self_ms_per_step']:>13.3f} {r['total_ms_per_step']:>14.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
