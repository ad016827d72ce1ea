"""``torchao-mx``: the command line.

    torchao-mx compare --model smollm2-135m --methods fp,rtn,block-rot,global-rot --scale-rule all --json out.json
    torchao-mx moe-compare --model smollm2-135m-moe --json moe.json
    torchao-mx merge a.json b.json --json all.json

``compare`` quantizes a fresh copy of the model per method (``recipes.py``: every ``nn.Linear``
except ``lm_head``), measures WikiText-2 raw test perplexity, wall time (quantization + evaluation)
and peak memory, prints a table and writes JSON::

    {"model": ..., "settings": {...}, "methods": {"rtn": {"ppl": ..., "wall_s": ..., "peak_mem_mb": ...}, ...}}

Methods with a random component (``global-rot``, ``quarot``) run once per seed and report the mean
with the spread (``ppl_std``, ``ppl_per_seed``). ``quantize_s`` is the part of ``wall_s`` spent quantizing
(calibration included). ``merge`` joins ``compare`` reports of one setting (e.g. one method per run, so a
long run keeps every finished method) into one table.
"""

import argparse
import copy
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from .configs import DEFAULT_SCALE_RULE
from .eval.lm_eval_runner import add_eval_subcommand
from .mx import SCALE_RULES
from .recipes import METHODS, QuantSettings


def _release_memory() -> None:
    # Return the previous run's freed memory to the OS, so each run's peak RSS is its own.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _parse_list(text: str, allowed, what: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"torchao-mx: unknown {what} {', '.join(bad) or repr(text)}; choose from {', '.join(allowed)}")
    return items


def _calibration_ids(args, tokenizer, model, seq_len: int) -> torch.Tensor:
    from .calibration.data import calibration_ids

    return calibration_ids(
        tokenizer, args.calib_source, args.calib_samples, args.calib_seq_len or seq_len, seed=0,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        max_positions=getattr(model.config, "max_position_embeddings", None),
    )


def run_compare(args) -> dict:
    from .eval import Measure, perplexity, tokenize_for_perplexity, wikitext2_test_text
    from .zoo import DEFAULT_SEQ_LEN, data_dir, load_model

    methods = _parse_list(args.methods, list(METHODS), "method")
    rules = list(SCALE_RULES) if args.scale_rule == "all" else _parse_list(args.scale_rule, SCALE_RULES, "scale rule")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    base_model, tokenizer = load_model(args.model)
    seq_len = args.seq_len or DEFAULT_SEQ_LEN.get(args.model, 2048)
    max_positions = getattr(base_model.config, "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise SystemExit(f"torchao-mx: --seq-len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    calib_ids = None
    if any(METHODS[m].calibrated for m in methods):
        calib_ids = _calibration_ids(args, tokenizer, base_model, seq_len)
    input_ids = tokenize_for_perplexity(tokenizer, wikitext2_test_text(Path(args.data_dir) if args.data_dir else data_dir()))

    runs = []  # (key, method, rule, apply, seeds)
    for method in methods:
        spec = METHODS[method]
        if spec.apply is None:
            runs.append((method, method, None, None, [None]))
            continue
        for rule in rules:
            key = method if len(rules) == 1 else f"{method}[{rule}]"
            runs.append((key, method, rule, spec.apply, seeds if spec.seeded else [None]))

    def report(results: dict) -> dict:
        return {
            "model": args.model,
            "settings": {
                "seq_len": seq_len,
                "eval_windows": args.eval_windows,
                "scale_rules": rules,
                "seeds": seeds,
                "calibration": None if calib_ids is None else {
                    "source": args.calib_source, "samples": calib_ids.shape[0], "seq_len": calib_ids.shape[1], "seed": 0,
                },
                "weight_only": args.weight_only,
                "act_scale_rule": None if args.weight_only else (args.act_scale_rule or "same as weights"),
                "block_size": 32,
                "lm_head": "not quantized",
                "activations": "none (weight-only)" if args.weight_only else "MXFP4, quantized online",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "methods": results,
        }

    results = {}
    for key, method, rule, apply, run_seeds in runs:
        per_seed = []
        for seed in run_seeds:
            _release_memory()
            model = copy.deepcopy(base_model)
            with Measure() as m:
                t0 = time.perf_counter()
                if apply is not None:
                    apply(model, QuantSettings(rule, args.act_scale_rule, args.weight_only, seed or 0, calib_ids))
                m.quantize_s = time.perf_counter() - t0  # quantization incl. calibration, before evaluation
                ppl = perplexity(model, input_ids, seq_len, args.eval_windows, progress=not args.quiet)
            per_seed.append((ppl, m))
            del model
        ppls = [p["ppl"] for p, _ in per_seed]
        entry = {
            "ppl": statistics.fmean(ppls),
            "wall_s": statistics.fmean(m.wall_s for _, m in per_seed),
            "quantize_s": statistics.fmean(m.quantize_s for _, m in per_seed),
            "peak_mem_mb": max(m.peak_mem_mb for _, m in per_seed),
            "method": method,
            "scale_rule": rule,
            "windows": per_seed[0][0]["windows"],
        }
        if run_seeds != [None]:
            entry["ppl_std"] = statistics.stdev(ppls) if len(ppls) > 1 else 0.0
            entry["ppl_per_seed"] = dict(zip([str(s) for s in run_seeds], ppls))
        results[key] = entry
        if not args.quiet:
            print(f"  {key}: ppl {entry['ppl']:.3f} ({entry['wall_s']:.1f} s)", file=sys.stderr)
        if args.json and len(results) < len(runs):  # a long run keeps what is done if interrupted
            write_json_atomic(Path(args.json), dict(report(results), complete=False))

    return report(results)


def format_table(report: dict) -> str:
    fp = report["methods"].get("fp", {}).get("ppl")
    lines = [
        f"model {report['model']}  |  WikiText-2 raw test, {report['settings']['eval_windows']} x "
        f"{report['settings']['seq_len']} tokens  |  {'weight-only' if report['settings']['weight_only'] else 'W4A4'} MXFP4",
        f"{'method':<24} {'ppl':>10} {'x fp':>7} {'spread':>8} {'wall s':>8} {'quant s':>8} {'peak MB':>9}",
    ]
    for key, r in report["methods"].items():
        ratio = f"{r['ppl'] / fp:.2f}" if fp else "-"
        spread = f"{r['ppl_std']:.2f}" if "ppl_std" in r else ""
        quant = f"{r['quantize_s']:.1f}" if "quantize_s" in r else "-"
        lines.append(
            f"{key:<24} {r['ppl']:>10.3f} {ratio:>7} {spread:>8} {r['wall_s']:>8.1f} {quant:>8} {r['peak_mem_mb']:>9.0f}"
        )
    return "\n".join(lines)


# Settings that may differ between merged reports: they do not change any number in the table.
_MERGE_FREE_SETTINGS = ("seeds", "calibration", "threads")


def merge_reports(reports: List[dict]) -> dict:
    """One ``compare`` report from several of the same model and setting (methods in the given order).

    Raises ``ValueError`` when the models or settings differ (beyond seeds, threads, and calibration of
    reports without calibrated methods), when a method appears twice, or when a report is unfinished.
    """
    if not reports:
        raise ValueError("nothing to merge")
    def fixed(r):
        return {k: v for k, v in r["settings"].items() if k not in _MERGE_FREE_SETTINGS}
    first = reports[0]
    merged = {"model": first["model"], "settings": dict(first["settings"]), "methods": {}}
    calibrations, seeds, threads = set(), set(), set()
    for r in reports:
        if r.get("complete") is False:
            raise ValueError(f"report with methods {list(r['methods'])} is unfinished (complete: false)")
        if r["model"] != first["model"] or fixed(r) != fixed(first):
            raise ValueError(f"cannot merge: model/settings differ ({r['model']}: {fixed(r)} vs {fixed(first)})")
        for key, entry in r["methods"].items():
            if key in merged["methods"]:
                raise ValueError(f"method {key!r} appears in more than one report")
            merged["methods"][key] = entry
        if r["settings"].get("calibration") is not None:
            calibrations.add(json.dumps(r["settings"]["calibration"], sort_keys=True))
        if any("ppl_per_seed" in entry for entry in r["methods"].values()):  # seeds used, not just given
            seeds.update(r["settings"]["seeds"])
        threads.add(r["settings"]["threads"])
    if len(calibrations) > 1:
        raise ValueError(f"cannot merge: calibration settings differ: {sorted(calibrations)}")
    merged["settings"]["calibration"] = json.loads(calibrations.pop()) if calibrations else None
    merged["settings"]["seeds"] = sorted(seeds)
    merged["settings"]["threads"] = sorted(threads)[0] if len(threads) == 1 else sorted(threads)
    return merged


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def run_quantize(args) -> dict:
    """Quantize one model with one method (calibrating where it needs it) and save it atomically."""
    from .hf import save_pretrained
    from .zoo import DEFAULT_SEQ_LEN, load_model, model_path

    if args.method not in METHODS or METHODS[args.method].apply is None:
        choices = ", ".join(m for m, spec in METHODS.items() if spec.apply is not None)
        raise SystemExit(f"torchao-mx: unknown method {args.method!r}; choose from {choices}")
    check_scale_rule_or_exit(args.scale_rule)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"torchao-mx: {out} exists; pass --overwrite to replace it")
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    calib_ids = None
    if METHODS[args.method].calibrated:
        calib_ids = _calibration_ids(args, tokenizer, model, DEFAULT_SEQ_LEN.get(args.model, 2048))
    from .eval import Measure

    with Measure() as m:
        METHODS[args.method].apply(model, QuantSettings(args.scale_rule, None, args.weight_only, args.seed, calib_ids))
    save_pretrained(model, out, tokenizer=tokenizer)
    size = lambda folder: sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    fp_bytes, q_bytes = size(model_path(args.model)), size(out)
    report = {
        "model": args.model, "method": args.method, "scale_rule": args.scale_rule, "weight_only": args.weight_only,
        "out": str(out), "quantize_s": m.wall_s, "peak_mem_mb": m.peak_mem_mb,
        "checkpoint_mb": q_bytes / 2**20, "fp_checkpoint_mb": fp_bytes / 2**20,
    }
    print(f"{args.method} {args.model} -> {out}: {report['checkpoint_mb']:.1f} MB safetensors "
          f"(fp checkpoint {report['fp_checkpoint_mb']:.1f} MB; lm_head and embeddings stay fp), "
          f"quantized in {m.wall_s:.1f} s, peak {m.peak_mem_mb:.0f} MB")
    return report


def _show(table: str, report: dict, json_path: Optional[str]) -> None:
    print(table)
    if json_path:
        write_json_atomic(Path(json_path), report)
        print(f"wrote {json_path}")


def check_scale_rule_or_exit(rule: str) -> None:
    if rule not in SCALE_RULES:
        raise SystemExit(f"torchao-mx: unknown scale rule {rule!r}; choose from {', '.join(SCALE_RULES)}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="torchao-mx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="perplexity / time / memory of quantization methods on one model")
    cmp.add_argument("--model", default="smollm2-135m", help="alias (stories260k, smollm2-135m) or HF folder")
    cmp.add_argument("--methods", default="fp,rtn,block-rot,global-rot", help=f"comma list of: {', '.join(METHODS)}")
    cmp.add_argument("--scale-rule", default=DEFAULT_SCALE_RULE, help=f"one of {', '.join(SCALE_RULES)}, a comma list, or 'all'")
    cmp.add_argument("--act-scale-rule", default=None, choices=SCALE_RULES, help="activation scale rule (default: same as weights)")
    cmp.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: 512 stories260k, 2048 SmolLM2)")
    cmp.add_argument("--eval-windows", type=int, default=4, help="number of perplexity windows")
    cmp.add_argument("--seeds", default="0,1,2", help="seeds for methods with a random rotation")
    cmp.add_argument("--calib-samples", type=int, default=128, help="calibration windows (GPTQ methods)")
    cmp.add_argument("--calib-seq-len", type=int, default=None, help="calibration window length (default: --seq-len)")
    cmp.add_argument("--calib-source", default="wikitext2", help="wikitext2 (validation), tinystories, or a text file")
    cmp.add_argument("--weight-only", action="store_true", help="quantize weights only (activations stay fp)")
    cmp.add_argument("--json", default=None, help="write the report here")
    cmp.add_argument("--data-dir", default=None, help="folder with wikitext2/ (default: the shared data folder)")
    cmp.add_argument("--threads", type=int, default=None)
    cmp.add_argument("--quiet", action="store_true")
    qnt = sub.add_parser("quantize", help="quantize a model with one method and save it (safetensors)")
    qnt.add_argument("--model", required=True, help="alias (stories260k, smollm2-135m) or HF folder")
    qnt.add_argument("--method", required=True, help=f"one of: {', '.join(m for m in METHODS if m != 'fp')}")
    qnt.add_argument("--out", required=True, help="output folder (written atomically)")
    qnt.add_argument("--scale-rule", default=DEFAULT_SCALE_RULE)
    qnt.add_argument("--weight-only", action="store_true")
    qnt.add_argument("--seed", type=int, default=0)
    qnt.add_argument("--calib-samples", type=int, default=128)
    qnt.add_argument("--calib-seq-len", type=int, default=None)
    qnt.add_argument("--calib-source", default="wikitext2")
    qnt.add_argument("--data-dir", default=None)
    qnt.add_argument("--overwrite", action="store_true")
    mrg = sub.add_parser("merge", help="join compare reports (JSON) of one model and setting into one table")
    mrg.add_argument("reports", nargs="+", help="compare --json files")
    mrg.add_argument("--json", default=None, help="write the merged report here")
    moe = sub.add_parser("moe-compare", help="router passes (PESF, Ban&Pick) and MXFP4 experts (+QESC) on a MoE model")
    moe.add_argument("--model", default="smollm2-135m-moe", help="alias (smollm2-135m-moe) or a HF MoE folder")
    moe.add_argument("--methods", default="baseline,pesf-0.3,pesf-0.7,ban,pick,ban+pick,mxfp4,mxfp4+qesc")
    moe.add_argument("--eval-windows", type=int, default=4)
    moe.add_argument("--seq-len", type=int, default=2048)
    moe.add_argument("--calib-samples", type=int, default=16, help="WikiText-2 validation windows (Ban&Pick, QESC)")
    moe.add_argument("--calib-seq-len", type=int, default=512)
    moe.add_argument("--prompt-len", type=int, default=256, help="decode timing: prompt tokens")
    moe.add_argument("--new-tokens", type=int, default=32, help="decode timing: generated tokens")
    moe.add_argument("--scale-rule", default=None, help="MXFP4 scale rule (default: the package default)")
    moe.add_argument("--timing-rounds", type=int, default=5, help="interleaved prefill timing rounds")
    moe.add_argument("--experts-backend", default="torchao_mx_ext",
                     help="transformers experts implementation for every method (ours, grouped_mm, eager, ...)")
    moe.add_argument("--data-dir", default=None)
    moe.add_argument("--threads", type=int, default=None)
    moe.add_argument("--json", default=None)
    moe.add_argument("--quiet", action="store_true")
    add_eval_subcommand(sub)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "eval":
        return args.handler(args)
    if args.command == "quantize":
        run_quantize(args)
        return 0
    if args.command == "merge":
        try:
            report = merge_reports([json.loads(Path(p).read_text()) for p in args.reports])
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"torchao-mx merge: {e}")
        _show(format_table(report), report, args.json)
        return 0
    if args.command == "moe-compare":
        from .moe.compare import format_moe_table, run_moe_compare

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.scale_rule is not None:
            check_scale_rule_or_exit(args.scale_rule)
        try:
            report = run_moe_compare(
                args.model, [m.strip() for m in args.methods.split(",") if m.strip()], args.eval_windows, args.seq_len,
                args.calib_samples, args.calib_seq_len, args.prompt_len, args.new_tokens, args.scale_rule,
                Path(args.data_dir) if args.data_dir else None, progress=not args.quiet,
                timing_rounds=args.timing_rounds, experts_backend=args.experts_backend,
            )
        except ValueError as e:
            raise SystemExit(f"torchao-mx: {e}")
        _show(format_moe_table(report), report, args.json)
        return 0
    if args.command == "compare":
        if args.eval_windows is not None and args.eval_windows <= 0:
            parser.error("--eval-windows must be positive")
        report = run_compare(args)
        _show(format_table(report), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
