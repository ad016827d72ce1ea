"""``torchao-mx moe-compare``: router passes and MXFP4 experts on one MoE model, side by side.

Every method starts from a fresh copy of the model and is measured the same way, in one process:

- ``ppl``: WikiText-2 raw test token perplexity (``eval_windows`` x ``seq_len``);
- ``active_experts``: mean routed experts per token and layer (non-sentinel slots with nonzero weight)
  over those windows;
- ``prefill_s``: the median forward time of the first ``seq_len`` test window (no cache), timed after
  every method is built, in ``timing_rounds`` interleaved rounds (each round times every method once,
  after one untimed warm-up round), so slow drifts of the machine hit all methods alike;
  ``prefill_speedup`` = the median over rounds of baseline time / method time in the same round;
- ``decode_ms_per_token``: greedy decoding with the KV cache after a ``prompt_len`` prompt;
- ``topk_agreement``: mean ``|S_fp & S| / k`` of the routers' selections against the unmodified
  model's on the first window, each model on its own hidden states.

Methods: ``baseline``; ``pesf-0.3`` / ``pesf-0.7`` (EAC-MoE PESF, alpha); ``ban``, ``pick``,
``ban+pick`` (Ban&Pick, calibrated per layer on WikiText-2 *validation* windows); ``mxfp4`` (every
linear but lm_head and every fused experts module W4A4 MXFP4 with the 32-wide block Hadamard, routers
in full precision); ``mxfp4+qesc`` (the same, with QESC re-fitting each router, layer by layer).

Every method runs the same experts backend (``experts_backend``, default ours,
:func:`torchao_mx_ext.moe.experts.mxfp4_experts_forward`, which in eager mode drops pruned slots before
any GEMM; transformers' ``grouped_mm`` computes them and masks them afterwards, so on it a pass that
prunes costs extra masking passes instead of saving work).
"""

import copy
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..configs import MXFP4BlockRotConfig, quantize_linears
from ..eval.timing import prefill_decode_time
from ..inference import cache_dequantized_weights
from ..moe.ban_pick import calibrate_ban_pick
from ..moe.qesc import qesc_quantize, topk_agreement
from ..moe.router_configs import BanPickConfig, PESFConfig, apply_router_pass
from ..moe.routing_stats import ActiveExpertCounter

__all__ = ["MOE_METHODS", "run_moe_compare", "format_moe_table"]


def _ban_only(config: BanPickConfig) -> BanPickConfig:
    return BanPickConfig(tau=config.tau, k_min=config.k_min, layer_taus=config.layer_taus)


def _pick_only(config: BanPickConfig) -> BanPickConfig:
    return BanPickConfig(
        tau=1.0, k_min=config.k_min, picks=config.picks, boost=config.boost,
        layer_picks=config.layer_picks, layer_boosts=config.layer_boosts,
    )


def _mxfp4(model, calib_ids, qesc: bool, scale_rule: Optional[str]):
    config = MXFP4BlockRotConfig() if scale_rule is None else MXFP4BlockRotConfig(scale_rule=scale_rule)
    if qesc:
        report = qesc_quantize(model, calib_ids, config, progress=False)
        return {"qesc_calibration_agreement_before": statistics.fmean(report.agreement_before),
                "qesc_calibration_agreement_after": statistics.fmean(report.agreement_after)}
    quantize_linears(model, config)
    return {}


def _router_pass(config_of: Callable) -> Callable:
    def apply(model, ctx):
        apply_router_pass(model, config_of(ctx))
        return {}

    return apply


# name -> apply(model, context) -> extra report fields
MOE_METHODS: Dict[str, Callable] = {
    "baseline": lambda model, ctx: {},
    "pesf-0.3": _router_pass(lambda ctx: PESFConfig(alpha=0.3)),
    "pesf-0.7": _router_pass(lambda ctx: PESFConfig(alpha=0.7)),
    "ban": _router_pass(lambda ctx: _ban_only(ctx["ban_pick"])),
    "pick": _router_pass(lambda ctx: _pick_only(ctx["ban_pick"])),
    "ban+pick": _router_pass(lambda ctx: ctx["ban_pick"]),
    "mxfp4": lambda model, ctx: _mxfp4(model, ctx["calib_ids"], False, ctx["scale_rule"]),
    "mxfp4+qesc": lambda model, ctx: _mxfp4(model, ctx["calib_ids"], True, ctx["scale_rule"]),
}
_CALIBRATED = {"ban", "pick", "ban+pick", "mxfp4+qesc"}


@torch.inference_mode()
def _evaluate(model, input_ids: torch.Tensor, seq_len: int, windows: int, progress: bool) -> dict:
    nlls = []
    with ActiveExpertCounter(model) as counter:
        for i in range(windows):
            window = input_ids[:, i * seq_len : (i + 1) * seq_len]
            logits = model(window, use_cache=False).logits
            nlls.append(F.cross_entropy(logits[0, :-1].float(), window[0, 1:]).item())
            if progress:
                print(f"    window {i + 1}/{windows}", file=sys.stderr)
    return {"ppl": math.exp(statistics.fmean(nlls)), "active_experts": counter.stats().mean}


@torch.inference_mode()
def interleaved_prefill_times(models: Dict[str, torch.nn.Module], window: torch.Tensor, rounds: int) -> Dict[str, List[float]]:
    """Forward time of ``window`` (no cache) per model: one untimed warm-up round, then ``rounds``
    rounds that each time every model once, in the same order."""
    times = {name: [] for name in models}
    for r in range(rounds + 1):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(window, use_cache=False)
            if r:
                times[name].append(time.perf_counter() - t0)
    return times


def run_moe_compare(
    model_name: str,
    methods: List[str],
    eval_windows: int = 4,
    seq_len: int = 2048,
    calib_samples: int = 16,
    calib_seq_len: int = 512,
    prompt_len: int = 256,
    new_tokens: int = 32,
    scale_rule: Optional[str] = None,
    data_dir=None,
    progress: bool = True,
    timing_rounds: int = 5,
    experts_backend: Optional[str] = "torchao_mx_ext",
) -> dict:
    from ..calibration.data import calibration_ids
    from ..eval import tokenize_for_perplexity, wikitext2_test_text
    from ..paths import data_dir as default_data_dir
    from ..zoo import load_model
    from ..moe.adapters import find_moe_blocks

    unknown = [m for m in methods if m not in MOE_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown MoE method(s) {unknown or methods}; choose from {', '.join(MOE_METHODS)}")
    torch.manual_seed(0)
    if timing_rounds < 1:
        raise ValueError(f"timing_rounds must be >= 1, got {timing_rounds}")
    base, tokenizer = load_model(model_name)
    blocks = find_moe_blocks(base)  # a clear error for a dense model or an unsupported router
    if experts_backend is not None:
        base.set_experts_implementation(experts_backend)
    data_dir = data_dir or default_data_dir()
    input_ids = tokenize_for_perplexity(tokenizer, wikitext2_test_text(data_dir))
    if input_ids.shape[1] < eval_windows * seq_len:
        raise ValueError(f"the test text has {input_ids.shape[1]} tokens, fewer than {eval_windows} x {seq_len}")
    ctx = {"scale_rule": scale_rule, "calib_ids": None, "ban_pick": None}
    if _CALIBRATED & set(methods):
        ctx["calib_ids"] = calibration_ids(tokenizer, "wikitext2", calib_samples, calib_seq_len, seed=0, data_dir=data_dir)
    if {"ban", "pick", "ban+pick"} & set(methods):
        ctx["ban_pick"] = calibrate_ban_pick(base, ctx["calib_ids"])
    prompt = input_ids[:, :prompt_len]
    first_window = input_ids[:, :seq_len]

    results, models = {}, {}
    for name in methods:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        extra = MOE_METHODS[name](model, ctx) or {}
        prepare_s = time.perf_counter() - t0
        if name.startswith("mxfp4"):
            cache_dequantized_weights(model)  # decode the weights once: same numbers, faster on CPU
        entry = _evaluate(model, input_ids, seq_len, eval_windows, progress)
        decode = prefill_decode_time(model, prompt, new_tokens, repeats=2)
        entry["decode_ms_per_token"] = decode["decode_ms_per_token"]
        with torch.inference_mode():
            entry["topk_agreement"] = topk_agreement(base, model, first_window)["mean"]
        entry["prepare_s"] = prepare_s
        entry.update(extra)
        results[name], models[name] = entry, model
        if progress:
            print(f"  {name}: ppl {entry['ppl']:.3f}, {entry['active_experts']:.2f} experts/token", file=sys.stderr)
    times = interleaved_prefill_times(models, first_window, timing_rounds)
    del models
    for name, entry in results.items():
        entry["prefill_s"] = statistics.median(times[name])
        entry["prefill_s_min"] = min(times[name])
        if "baseline" in times:
            entry["prefill_speedup"] = statistics.median(b / t for b, t in zip(times["baseline"], times[name]))
    _, _, adapter = blocks[0]
    router = blocks[0][1].gate
    return {
        "model": model_name,
        "settings": {
            "architecture": type(base).__name__,
            "num_experts": adapter.num_experts(router),
            "top_k": adapter.top_k(router),
            "experts_implementation": getattr(base.config, "_experts_implementation", None),
            "timing_rounds": timing_rounds,
            "seq_len": seq_len,
            "eval_windows": eval_windows,
            "calibration": None if ctx["calib_ids"] is None else {
                "source": "wikitext2 (validation)", "samples": calib_samples, "seq_len": calib_seq_len, "seed": 0},
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "mxfp4": "W4A4, 32-wide block Hadamard, scale rule " + (scale_rule or MXFP4BlockRotConfig().scale_rule)
                     + "; lm_head and routers in full precision",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "methods": results,
    }


def format_moe_table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"model {report['model']} ({s['architecture']}, {s['num_experts']} experts, top-{s['top_k']})  |  "
        f"WikiText-2 raw test, {s['eval_windows']} x {s['seq_len']} tokens",
        f"{'method':<12} {'ppl':>9} {'experts/tok':>12} {'prefill s':>10} {'speedup':>8} {'decode ms':>10} {'top-k agr':>10}",
    ]
    for name, r in report["methods"].items():
        speed = f"{r['prefill_speedup']:.2f}x" if "prefill_speedup" in r else "-"
        lines.append(
            f"{name:<12} {r['ppl']:>9.3f} {r['active_experts']:>12.2f} {r['prefill_s']:>10.3f} {speed:>8} "
            f"{r['decode_ms_per_token']:>10.1f} {r['topk_agreement']:>10.3f}"
        )
    return "\n".join(lines)
