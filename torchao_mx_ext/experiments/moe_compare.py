"""``torchao-mx moe-compare``: router passes and MXFP4 experts on one MoE model, side by side.

Every method starts from a fresh copy of the model and is measured the same way, in one process:

- ``ppl``: WikiText-2 raw test token perplexity (``eval_windows`` x ``seq_len``);
- ``active_experts``: mean routed experts per token and layer (non-sentinel slots with nonzero weight)
  over those windows;
- ``prefill_s``: the median forward time of the first ``seq_len`` test window (no cache), and
  ``decode_ms_per_token``: greedy decoding with the KV cache after a ``prompt_len`` prompt; both timed
  after every method is built, in ``timing_rounds`` interleaved rounds (each round times every method
  once, after one untimed warm-up round), so slow drifts of the machine hit all methods alike;
  ``prefill_speedup`` / ``decode_speedup`` = the median over rounds of baseline time / method time in
  the same round;
- ``topk_agreement``: mean ``|S_fp & S| / k`` of the routers' selections against the unmodified
  model's on the first window, each model on its own hidden states;
- ``lm_eval`` (with ``lm_eval_task``): accuracy on a shipped offline lm-eval task (the first
  ``lm_eval_limit`` documents).

Methods: ``baseline``; ``pesf-<alpha>`` for alpha in 0.1, 0.3, 0.5, 0.7, 0.9 (EAC-MoE PESF);
``ban``, ``pick``, ``ban+pick`` (Ban&Pick, calibrated per layer on WikiText-2 *validation* windows) and
the rules it was measured against, ``ban+pick:frequency-picks`` (key experts by selection frequency
alone) and ``ban+pick:uniform-tau`` (one tau for every layer); ``mxfp4`` (every linear but lm_head and
every fused experts module W4A4 MXFP4 with the 32-wide block Hadamard, routers in full precision);
``mxfp4+qesc`` (the same, with QESC re-fitting each router, layer by layer, its ridge chosen on
held-out calibration sequences) and ``mxfp4+qesc:damp-0.01`` (the fixed weak ridge it replaced); ``mxfp4-gptq`` (GPTQ for
every linear and, per expert, the fused experts, layer by layer); ``mxfp4+qesc+ban+pick`` (what a user
deploys: MXFP4 + QESC, then Ban&Pick calibrated on the quantized model).

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

from ..calibration.sequential import sequential_gptq
from ..configs import MXFP4BlockRotConfig, as_config_for, quantize_linears
from ..eval.timing import prefill_decode_time
from ..inference import cache_dequantized_weights
from ..moe.ban_pick import ban_pick_config_from_statistics, calibrate_ban_pick, measure_ban_pick_statistics
from ..moe.qesc import qesc_quantize, topk_agreement
from ..moe.router_configs import BanPickConfig, PESFConfig, apply_router_pass
from ..moe.routing_stats import ActiveExpertCounter

__all__ = ["MOE_METHODS", "DEFAULT_METHODS", "PESF_ALPHAS", "run_moe_compare", "format_moe_table"]


def _ban_only(config: BanPickConfig) -> BanPickConfig:
    return BanPickConfig(tau=config.tau, k_min=config.k_min, layer_taus=config.layer_taus)


def _pick_only(config: BanPickConfig) -> BanPickConfig:
    return BanPickConfig(
        tau=1.0, k_min=config.k_min, picks=config.picks, boost=config.boost,
        layer_picks=config.layer_picks, layer_boosts=config.layer_boosts,
    )


def _mxfp4_config(scale_rule: Optional[str]) -> MXFP4BlockRotConfig:
    return MXFP4BlockRotConfig() if scale_rule is None else MXFP4BlockRotConfig(scale_rule=scale_rule)


def _mxfp4(model, calib_ids, qesc: bool, scale_rule: Optional[str], damp="auto"):
    config = _mxfp4_config(scale_rule)
    if qesc:
        report = qesc_quantize(model, calib_ids, config, damp=damp, progress=False)
        return {"qesc_calibration_agreement_before": statistics.fmean(report.agreement_before),
                "qesc_calibration_agreement_after": statistics.fmean(report.agreement_after),
                "qesc_damp": report.damp}
    quantize_linears(model, config)
    return {}


def _router_pass(config_of: Callable) -> Callable:
    def apply(model, ctx):
        apply_router_pass(model, config_of(ctx))
        return {}

    return apply


def _ban_pick_rules(**rules) -> Callable:
    """Ban&Pick from the base model's statistics with other calibration rules."""
    return _router_pass(lambda ctx: ban_pick_config_from_statistics(ctx["ban_pick_stats"], **rules))


def _mxfp4_gptq(model, ctx):
    sequential_gptq(model, ctx["calib_ids"], as_config_for(_mxfp4_config(ctx["scale_rule"])), progress=False)
    return {}


def _deployed(model, ctx):
    """MXFP4 + QESC, then Ban&Pick calibrated on the quantized model (the routing it will run)."""
    extra = _mxfp4(model, ctx["calib_ids"], True, ctx["scale_rule"])
    apply_router_pass(model, calibrate_ban_pick(model, ctx["calib_ids"]))
    return extra


PESF_ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)

# name -> apply(model, context) -> extra report fields
MOE_METHODS: Dict[str, Callable] = {
    "baseline": lambda model, ctx: {},
    **{f"pesf-{a}": _router_pass(lambda ctx, a=a: PESFConfig(alpha=a)) for a in PESF_ALPHAS},
    "ban": _router_pass(lambda ctx: _ban_only(ctx["ban_pick"])),
    "pick": _router_pass(lambda ctx: _pick_only(ctx["ban_pick"])),
    "ban+pick": _router_pass(lambda ctx: ctx["ban_pick"]),
    "ban+pick:frequency-picks": _ban_pick_rules(pick_score="frequency"),
    "ban+pick:uniform-tau": _ban_pick_rules(tau_rule="uniform"),
    "mxfp4": lambda model, ctx: _mxfp4(model, ctx["calib_ids"], False, ctx["scale_rule"]),
    "mxfp4+qesc": lambda model, ctx: _mxfp4(model, ctx["calib_ids"], True, ctx["scale_rule"]),
    "mxfp4+qesc:damp-0.01": lambda model, ctx: _mxfp4(model, ctx["calib_ids"], True, ctx["scale_rule"], 0.01),
    "mxfp4-gptq": _mxfp4_gptq,
    "mxfp4+qesc+ban+pick": _deployed,
}
DEFAULT_METHODS = ("baseline", "pesf-0.3", "pesf-0.7", "ban", "pick", "ban+pick", "mxfp4", "mxfp4+qesc")
_BAN_PICK = {"ban", "pick", "ban+pick", "ban+pick:frequency-picks", "ban+pick:uniform-tau"}
_CALIBRATED = _BAN_PICK | {"mxfp4+qesc", "mxfp4+qesc:damp-0.01", "mxfp4-gptq", "mxfp4+qesc+ban+pick"}


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
def interleaved_times(
    models: Dict[str, torch.nn.Module], window: torch.Tensor, prompt: torch.Tensor, new_tokens: int, rounds: int
) -> Dict[str, Dict[str, List[float]]]:
    """Per model: ``prefill_s``, the forward time of ``window`` (no cache), and ``decode_ms_per_token``,
    greedy decoding of ``new_tokens`` after ``prompt`` with the KV cache; one untimed warm-up round, then
    ``rounds`` rounds that each time every model once, in the same order."""
    times = {name: {"prefill_s": [], "decode_ms_per_token": []} for name in models}
    for r in range(rounds + 1):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(window, use_cache=False)
            prefill = time.perf_counter() - t0
            decode = prefill_decode_time(model, prompt, new_tokens)["decode_ms_per_token"]
            if r:
                times[name]["prefill_s"].append(prefill)
                times[name]["decode_ms_per_token"].append(decode)
    return times


def _lm_eval(model, tokenizer, task: str, limit: Optional[int], data_dir) -> dict:
    from ..eval.lm_eval_runner import run_lm_eval

    result = run_lm_eval(model, tokenizer, task, data_dir=data_dir, limit=limit)["tasks"][task]
    return {key: result[key] for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples") if key in result}


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
    lm_eval_task: Optional[str] = None,
    lm_eval_limit: Optional[int] = None,
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
    if lm_eval_task is not None:
        from ..eval.lm_eval_runner import check_data_files, resolve_tasks

        (lm_eval_task,) = resolve_tasks(lm_eval_task)  # unknown names and missing data fail before the model loads
        check_data_files([lm_eval_task], data_dir)
    base, tokenizer = load_model(model_name)
    blocks = find_moe_blocks(base)  # a clear error for a dense model or an unsupported router
    if experts_backend is not None:
        base.set_experts_implementation(experts_backend)
    data_dir = data_dir or default_data_dir()
    input_ids = tokenize_for_perplexity(tokenizer, wikitext2_test_text(data_dir))
    if input_ids.shape[1] < eval_windows * seq_len:
        raise ValueError(f"the test text has {input_ids.shape[1]} tokens, fewer than {eval_windows} x {seq_len}")
    ctx = {"scale_rule": scale_rule, "calib_ids": None, "ban_pick": None, "ban_pick_stats": None}
    if _CALIBRATED & set(methods):
        ctx["calib_ids"] = calibration_ids(tokenizer, "wikitext2", calib_samples, calib_seq_len, seed=0, data_dir=data_dir)
    if _BAN_PICK & set(methods):
        ctx["ban_pick_stats"] = measure_ban_pick_statistics(base, ctx["calib_ids"])
        ctx["ban_pick"] = ban_pick_config_from_statistics(ctx["ban_pick_stats"])
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
        with torch.inference_mode():
            entry["topk_agreement"] = topk_agreement(base, model, first_window)["mean"]
        if lm_eval_task is not None:
            entry["lm_eval"] = _lm_eval(model, tokenizer, lm_eval_task, lm_eval_limit, data_dir)
        entry["prepare_s"] = prepare_s
        entry.update(extra)
        results[name], models[name] = entry, model
        if progress:
            print(f"  {name}: ppl {entry['ppl']:.3f}, {entry['active_experts']:.2f} experts/token", file=sys.stderr)
    times = interleaved_times(models, first_window, prompt, new_tokens, timing_rounds)
    del models
    for name, entry in results.items():
        for key, speedup in (("prefill_s", "prefill_speedup"), ("decode_ms_per_token", "decode_speedup")):
            entry[key] = statistics.median(times[name][key])
            entry[f"{key}_min"] = min(times[name][key])
            if "baseline" in times:
                entry[speedup] = statistics.median(b / t for b, t in zip(times["baseline"][key], times[name][key]))
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
            "lm_eval": None if lm_eval_task is None else {"task": lm_eval_task, "limit": lm_eval_limit},
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
        f"{'method':<24} {'ppl':>9} {'experts/tok':>12} {'prefill s':>10} {'speedup':>8} {'decode ms':>10} {'speedup':>8}"
        f" {'top-k agr':>10}" + (f" {s['lm_eval']['task'] + ' acc':>16}" if s.get("lm_eval") else ""),
    ]
    for name, r in report["methods"].items():
        speeds = [f"{r[k]:.2f}x" if k in r else "-" for k in ("prefill_speedup", "decode_speedup")]
        acc = f" {r['lm_eval']['acc']:>9.3f} ± {r['lm_eval']['acc_stderr']:.3f}" if "lm_eval" in r else ""
        lines.append(
            f"{name:<24} {r['ppl']:>9.3f} {r['active_experts']:>12.2f} {r['prefill_s']:>10.3f} {speeds[0]:>8} "
            f"{r['decode_ms_per_token']:>10.1f} {speeds[1]:>8} {r['topk_agreement']:>10.3f}{acc}"
        )
    return "\n".join(lines)
