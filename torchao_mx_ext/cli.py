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
long run keeps every finished method) into one table, and runs of one method on different seeds into
one entry over all their seeds.
"""

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

# torch, transformers and this package's modules are imported inside the commands, not here: parsing
# arguments and refusing bad ones needs none of them. The parser is therefore built from these names
# (tests/test_cli.py checks they equal recipes.METHODS, mx.SCALE_RULES, zoo.MODEL_ALIASES and the MoE methods).
METHOD_NAMES = (
    "fp", "rtn", "block-rot", "global-rot", "quarot", "brq", "gptq", "gptq-block-rot", "gptq-block-rot+exp-search",
    "quarot+gptq", "brq+gptq", "dartquant", "dartquant-block", "dartquant-block+gptq", "mxrot-block",
    "mxrot-block+gptq", "gptaq", "gptaq-block-rot", "brq+gptaq", "smooth+block-rot", "smooth+gptq-block-rot",
    "smooth+gptaq-block-rot", "smooth-search+block-rot", "smooth-search+gptaq-block-rot",
)
SCALE_RULE_NAMES = ("floor", "even", "rceil", "fp_quant", "mse")
MODEL_ALIASES = ("stories260k", "smollm2-135m", "smollm2-135m-moe")
EVAL_TASK_NAMES = ("wikitext2", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "siqa")
MOE_METHOD_NAMES = (
    "baseline", "pesf-0.1", "pesf-0.3", "pesf-0.5", "pesf-0.7", "pesf-0.9", "ban", "pick", "ban+pick",
    "ban+pick:frequency-picks", "ban+pick:uniform-tau", "mxfp4", "mxfp4+qesc", "mxfp4+qesc:damp-0.01",
    "mxfp4-gptq", "mxfp4+qesc+ban+pick",
)
MOE_DEFAULT_METHODS = ("baseline", "pesf-0.3", "pesf-0.7", "ban", "pick", "ban+pick", "mxfp4", "mxfp4+qesc")
# Methods that rotate or smooth the whole model (QuaRot, BRQ, DartQuant, SmoothQuant scales; recipes.py): they
# know only the decoder layouts in rotation.fusion.SUPPORTED_ARCHITECTURES; per-linear methods work on any model.
MODEL_LEVEL_PREFIXES = ("quarot", "brq", "dartquant", "mxrot", "smooth")
# compare --quantize-head: scheme -> how the report's settings describe the head.
HEAD_SCHEMES = {
    "none": "not quantized",
    "int8": "int8 weight-only, per-row scales",
    "mxfp4": "MXFP4 weight-only (RTN)",
    "mxfp4-block-rot": "MXFP4 weight-only (block Hadamard)",
}

# Third-party log lines printed on every start that say nothing about the run, matched exactly where
# they are logged (logger name: message pattern):
# - torchao/__init__.py: "Failed to load .../torchao/_C_*.so: ..." for native kernels built for another
#   Python or for CUDA (torchao's pure-PyTorch paths, which we use, do not need them);
# - torch/utils/_pytree.py: "<enum ...> is an Enum subclass and is now natively supported by torch.compile
#   ... register_constant() on Enum subclasses is deprecated", when torchao registers its enums;
# - torchao/kernel/intmm.py: "Warning: Detected no triton, ..." on CPU-only machines (we use no Triton
#   kernel on CPU).
KNOWN_NOISE = {
    "torchao": r"^Failed to load \S*torchao\S*/_C\S*\.so: ",
    "torchao.kernel.intmm": r"^Warning: Detected no triton",
    "torch.utils._pytree": r"is an Enum subclass and is now natively supported by torch\.compile",
    "transformers.tokenization_utils_base": r"^Token indices sequence length is longer than the specified maximum",
}


class _DropMatching(logging.Filter):
    """Drops one logger's records whose message matches ``pattern``; every other record passes."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_noise() -> None:
    """Silence the lines in ``KNOWN_NOISE`` (and only those) for a CLI run; the library never does
    this, so a program importing it sees everything. Idempotent. It acts on lines logged after it runs:
    ``torchao_mx_ext/__init__.py`` imports torchao, so an entry point inside this package runs it too late
    for the start-up lines (the entry point must run it before importing the package)."""
    for name, pattern in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))


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


def _parse_seeds(text: str) -> List[int]:
    """``--seeds`` as distinct integers (a repeated seed would be averaged twice but reported once)."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"torchao-mx: --seeds must be a comma list of distinct integers (e.g. 0,1,2), got {text!r}")
    return seeds


def check_minimums(args, minimums: Dict[str, int], prefix: str = "torchao-mx") -> None:
    """Refuse numeric flags below what a run can use, before anything is loaded: 0 calibration samples,
    or a 1-token window (nothing to predict: its perplexity is nan)."""
    for name, low in minimums.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            why = " (a window needs one token to predict the next)" if low == 2 else ""
            raise SystemExit(f"{prefix}: --{name.replace('_', '-')} must be >= {low}{why}, got {value}")


def check_output_path(path: Optional[str], flag: str = "--json", prefix: str = "torchao-mx", folder: bool = False) -> None:
    """Refuse an output that cannot be written before the run rather than after it (hours, for SmolLM2):
    the nearest existing folder above it must be a writable folder, and a file output not a folder.
    Nothing is created here."""
    if not path:
        return
    target = Path(path)
    if not folder and target.is_dir():
        raise SystemExit(f"{prefix}: cannot write {flag} {path}: it is a folder; give a file path")
    parent = target.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SystemExit(f"{prefix}: cannot write {flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"{prefix}: cannot write {flag} {path}: no write permission in {parent}")


def check_model_or_exit(name: str, prefix: str = "torchao-mx") -> None:
    """A mistyped ``--model`` fails at once, naming what to give, instead of after imports and loading.
    Aliases are not resolved here (that may convert a model)."""
    if name in MODEL_ALIASES:
        return
    path = Path(name)
    if not path.exists():
        why = "no such folder"
    elif not path.is_dir():
        why = "not a folder"
    elif not (path / "config.json").is_file():
        why = "the folder has no config.json"
    else:
        return
    raise SystemExit(
        f"{prefix}: --model {name}: {why}; give a Hugging Face checkpoint folder or an alias ({', '.join(MODEL_ALIASES)})"
    )


@contextlib.contextmanager
def user_errors(prefix: str = "torchao-mx"):
    """Turn what our library raises for bad inputs (a missing data or calibration file, a text too short
    for a window, a missing optional package) into a one-line exit. Only wrapped around the calls that
    check user input: an error anywhere else is a bug and keeps its traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise SystemExit(f"{prefix}: {e}") from None


def _is_model_level(method: str) -> bool:
    return method.split("+")[0].startswith(MODEL_LEVEL_PREFIXES)


def check_architecture(model, methods: List[str]) -> None:
    """Model-level rotations support only a few decoder layouts: refuse any other model before the
    first method runs, not after the methods listed before them have spent their time."""
    from .rotation.fusion import check_supported

    model_level = [m for m in methods if _is_model_level(m)]
    if model_level:
        try:
            check_supported(model)
        except NotImplementedError as e:
            raise SystemExit(f"torchao-mx: {', '.join(model_level)}: {e}") from None


def check_fits_context(model, flag: str, value: int, given: bool) -> None:
    """A window longer than the model's positions cannot be run (calibration or evaluation)."""
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and value > max_positions:
        default = "" if given else " (the default for this model)"
        raise SystemExit(
            f"torchao-mx: {flag} {value}{default} exceeds the model's max_position_embeddings {max_positions}; "
            f"pass {flag} {max_positions} or less"
        )


def _check_calib_source(args) -> None:
    """The calibration file must exist (and not be a test split) before the model is loaded."""
    from .calibration.data import resolve_source

    with user_errors():
        resolve_source(args.calib_source, Path(args.data_dir) if args.data_dir else None)


def _calibration_ids(args, tokenizer, model, seq_len: int):
    from .calibration.data import calibration_ids

    check_fits_context(model, "--calib-seq-len", args.calib_seq_len or seq_len, given=args.calib_seq_len is not None)
    with user_errors():
        return calibration_ids(
            tokenizer, args.calib_source, args.calib_samples, args.calib_seq_len or seq_len, seed=0,
            data_dir=Path(args.data_dir) if args.data_dir else None,
            max_positions=getattr(model.config, "max_position_embeddings", None),
        )


def _gptaq_alpha(args) -> dict:
    """``--gptaq-alpha`` as QuantSettings keywords (empty when not given: the default applies);
    exits with a message outside [0, 1]."""
    if args.gptaq_alpha is None:
        return {}
    if not 0 <= args.gptaq_alpha <= 1:  # also refuses nan
        raise SystemExit(f"torchao-mx: --gptaq-alpha must be in [0, 1], got {args.gptaq_alpha}")
    return {"gptaq_alpha": args.gptaq_alpha}


_COMPARE_MINIMUMS = {"seq_len": 2, "eval_windows": 1, "calib_samples": 1, "calib_seq_len": 2, "threads": 1}
_QUANTIZE_MINIMUMS = {"calib_samples": 1, "calib_seq_len": 2}
_MOE_MINIMUMS = {
    "seq_len": 2, "eval_windows": 1, "calib_samples": 1, "calib_seq_len": 2, "prompt_len": 1, "new_tokens": 1,
    "timing_rounds": 1, "threads": 1, "lm_eval_limit": 1,
}


def run_compare(args) -> dict:
    # Every check that needs no model comes first: a bad flag, output path or model path costs nothing
    # (not even importing torch).
    methods = _parse_list(args.methods, METHOD_NAMES, "method")
    rules = None
    if args.scale_rule is not None:
        rules = list(SCALE_RULE_NAMES) if args.scale_rule == "all" else _parse_list(args.scale_rule, SCALE_RULE_NAMES, "scale rule")
    seeds = _parse_seeds(args.seeds)
    check_minimums(args, _COMPARE_MINIMUMS)
    alpha = _gptaq_alpha(args)
    check_output_path(args.json)
    check_model_or_exit(args.model)

    import torch

    from .configs import DEFAULT_SCALE_RULE

    rules = rules or [DEFAULT_SCALE_RULE]

    from .eval import Measure, perplexity, tokenize_for_perplexity, wikitext2_test_text
    from .recipes import METHODS, QuantSettings
    from .zoo import DEFAULT_SEQ_LEN, data_dir, load_model

    calibrated = any(METHODS[m].calibrated for m in methods)
    if calibrated:
        _check_calib_source(args)
    with user_errors():
        text = wikitext2_test_text(Path(args.data_dir) if args.data_dir else data_dir())
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    with user_errors():
        base_model, tokenizer = load_model(args.model)
    check_architecture(base_model, methods)
    seq_len = args.seq_len or DEFAULT_SEQ_LEN.get(args.model, 2048)
    check_fits_context(base_model, "--seq-len", seq_len, given=args.seq_len is not None)
    calib_ids = _calibration_ids(args, tokenizer, base_model, seq_len) if calibrated else None
    input_ids = tokenize_for_perplexity(tokenizer, text)
    if input_ids.shape[1] < seq_len:
        raise SystemExit(
            f"torchao-mx: the WikiText-2 test text has {input_ids.shape[1]} tokens, fewer than one --seq-len window of {seq_len}"
        )

    runs = []  # (key, method, rule, apply, seeds)
    for method in methods:
        spec = METHODS[method]
        if spec.apply is None:
            runs.append((method, method, None, None, [None]))
            continue
        for rule in rules:
            key = method if len(rules) == 1 else f"{method}[{rule}]"
            if spec.asymmetric and alpha:  # a row with another alpha must not pass for the default's
                key += f"[alpha={alpha['gptaq_alpha']:g}]"
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
                "lm_head": HEAD_SCHEMES[args.quantize_head],
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
                    apply(model, QuantSettings(rule, args.act_scale_rule, args.weight_only, seed or 0, calib_ids, **alpha))
                if args.quantize_head != "none":
                    _quantize_head(model, args.quantize_head, rule)
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
        if METHODS[method].asymmetric:
            entry["gptaq_alpha"] = QuantSettings(rule, **alpha).gptaq_alpha
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
    width = max([24, *map(len, report["methods"])])
    lines = [
        f"model {report['model']}  |  WikiText-2 raw test, {report['settings']['eval_windows']} x "
        f"{report['settings']['seq_len']} tokens  |  {'weight-only' if report['settings']['weight_only'] else 'W4A4'} MXFP4",
        f"{'method':<{width}} {'ppl':>10} {'x fp':>7} {'spread':>8} {'wall s':>8} {'quant s':>8} {'peak MB':>9}",
    ]
    for key, r in report["methods"].items():
        ratio = f"{r['ppl'] / fp:.2f}" if fp else "-"
        spread = f"{r['ppl_std']:.2f}" if "ppl_std" in r else ""
        quant = f"{r['quantize_s']:.1f}" if "quantize_s" in r else "-"
        lines.append(
            f"{key:<{width}} {r['ppl']:>10.3f} {ratio:>7} {spread:>8} {r['wall_s']:>8.1f} {quant:>8} {r['peak_mem_mb']:>9.0f}"
        )
    return "\n".join(lines)


# Settings that may differ between merged reports: they do not change any number in the table.
_MERGE_FREE_SETTINGS = ("seeds", "calibration", "threads")


# Per-seed means in a report entry (the rest must agree between the runs of one method).
_PER_SEED_FIELDS = ("ppl", "ppl_std", "ppl_per_seed", "wall_s", "quantize_s", "peak_mem_mb")


def _join_seeds(key: str, a: dict, b: dict) -> dict:
    """One entry from two runs of the same method on different seeds (``--seeds 0`` in one run, ``--seeds
    1,2`` in another): the same mean, spread and per-run means that one ``--seeds 0,1,2`` run writes.
    Anything else is one method reported twice, and refused."""
    if "ppl_per_seed" not in a or "ppl_per_seed" not in b:
        raise ValueError(f"method {key!r} appears in more than one report (without seeds to join)")
    shared = sorted(set(a["ppl_per_seed"]) & set(b["ppl_per_seed"]), key=int)
    if shared:
        raise ValueError(f"method {key!r}: seed(s) {', '.join(shared)} appear in more than one report")
    rest = lambda e: {k: v for k, v in e.items() if k not in _PER_SEED_FIELDS}  # noqa: E731
    if rest(a) != rest(b):
        raise ValueError(f"method {key!r}: the runs differ beyond their seeds ({rest(a)} vs {rest(b)})")
    per_seed = dict(sorted({**a["ppl_per_seed"], **b["ppl_per_seed"]}.items(), key=lambda kv: int(kv[0])))
    ppls, na, nb = list(per_seed.values()), len(a["ppl_per_seed"]), len(b["ppl_per_seed"])
    joined = dict(a)
    joined.update(
        ppl=statistics.fmean(ppls),
        ppl_std=statistics.stdev(ppls),
        ppl_per_seed=per_seed,
        wall_s=(a["wall_s"] * na + b["wall_s"] * nb) / (na + nb),
        peak_mem_mb=max(a["peak_mem_mb"], b["peak_mem_mb"]),
    )
    if "quantize_s" in a and "quantize_s" in b:
        joined["quantize_s"] = (a["quantize_s"] * na + b["quantize_s"] * nb) / (na + nb)
    return joined


def merge_reports(reports: List[dict]) -> dict:
    """One ``compare`` report from several of the same model and setting (methods in the order they
    first appear). Runs of one seeded method on different seeds are joined into one entry: the mean,
    spread and per-seed perplexities of a single run over all those seeds.

    Raises ``ValueError`` when the models or settings differ (beyond seeds, threads, and calibration of
    reports without calibrated methods), when a method appears twice without seeds to join (or with a
    seed twice), or when a report is unfinished.
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
            merged["methods"][key] = _join_seeds(key, merged["methods"][key], entry) if key in merged["methods"] else entry
        if r["settings"].get("calibration") is not None:
            calibrations.add(json.dumps(r["settings"]["calibration"], sort_keys=True))
        if any("ppl_per_seed" in entry for entry in r["methods"].values()):  # seeds used, not just given
            seeds.update(r["settings"]["seeds"])
        t = r["settings"]["threads"]
        threads.update(t if isinstance(t, list) else [t])  # a merged report lists its runs' thread counts
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


def _quantized_model(args, out_is_folder: bool = True):
    """(model, tokenizer, scale rule, Measure of the quantization) for ``quantize`` and ``export``:
    every input checked first, then the model loaded and quantized with ``--method``."""
    if args.method not in METHOD_NAMES or args.method == "fp":
        choices = ", ".join(m for m in METHOD_NAMES if m != "fp")
        raise SystemExit(f"torchao-mx: unknown method {args.method!r}; choose from {choices}")
    if args.scale_rule is not None:
        check_scale_rule_or_exit(args.scale_rule)
    check_minimums(args, _QUANTIZE_MINIMUMS)
    _gptaq_alpha(args)
    if Path(args.out).exists() and not args.overwrite:
        raise SystemExit(f"torchao-mx: {args.out} exists; pass --overwrite to replace it")
    check_output_path(args.out, "--out", folder=out_is_folder)
    check_model_or_exit(args.model)

    import torch

    from .configs import DEFAULT_SCALE_RULE
    from .eval import Measure
    from .recipes import METHODS, QuantSettings
    from .zoo import DEFAULT_SEQ_LEN, load_model

    scale_rule = args.scale_rule or DEFAULT_SCALE_RULE
    if METHODS[args.method].calibrated:
        _check_calib_source(args)
    torch.manual_seed(0)
    with user_errors():
        model, tokenizer = load_model(args.model)
    check_architecture(model, [args.method])
    calib_ids = None
    if METHODS[args.method].calibrated:
        calib_ids = _calibration_ids(args, tokenizer, model, DEFAULT_SEQ_LEN.get(args.model, 2048))
    with Measure() as m:
        METHODS[args.method].apply(model, QuantSettings(scale_rule, None, args.weight_only, args.seed, calib_ids, **_gptaq_alpha(args)))
    return model, tokenizer, scale_rule, m


# What each serving format can express (the exporters refuse the rest with the reason): GGUF has no
# online rotation and llama.cpp quantizes activations itself; compressed-tensors expresses the 32-wide
# block Hadamard as an online transform.
EXPORT_METHODS = {
    "gguf": ("rtn", "gptq", "gptaq"),
    # smoothing changes only full-precision weights (norms, up_proj rows) before the block rotation
    "compressed-tensors": (
        "rtn", "gptq", "gptaq", "block-rot", "gptq-block-rot", "gptaq-block-rot", "smooth+block-rot",
        "smooth+gptq-block-rot", "smooth+gptaq-block-rot", "smooth-search+block-rot", "smooth-search+gptaq-block-rot",
    ),
}


def run_export(args) -> dict:
    """Quantize one model with one method and export it for a serving engine (written atomically)."""
    allowed = EXPORT_METHODS[args.format]
    if args.method not in allowed:
        raise SystemExit(
            f"torchao-mx export: --format {args.format} cannot express method {args.method!r}; methods that export "
            f"to it: {', '.join(allowed)}"
        )
    if args.format == "gguf" and not args.weight_only:
        raise SystemExit("torchao-mx export: GGUF holds weights only (llama.cpp quantizes activations itself): add --weight-only")
    model, tokenizer, scale_rule, m = _quantized_model(args, out_is_folder=args.format != "gguf")
    from . import export

    writer = export.to_gguf if args.format == "gguf" else export.to_compressed_tensors
    with user_errors("torchao-mx export"):
        out = writer(model, tokenizer, args.out, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in ([Path(out)] if Path(out).is_file() else Path(out).rglob("*")) if f.is_file())
    report = {
        "model": args.model, "method": args.method, "format": args.format, "scale_rule": scale_rule,
        "weight_only": args.weight_only, "out": str(out), "quantize_s": m.wall_s, "size_mb": size / 2**20,
    }
    print(f"{args.method} {args.model} -> {out} ({args.format}, {report['size_mb']:.1f} MB), quantized in {m.wall_s:.1f} s")
    return report


def run_quantize(args) -> dict:
    """Quantize one model with one method (calibrating where it needs it) and save it atomically."""
    from .hf import save_pretrained
    from .zoo import model_path

    model, tokenizer, scale_rule, m = _quantized_model(args)
    out = Path(args.out)
    save_pretrained(model, out, tokenizer=tokenizer)
    size = lambda folder: sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    fp_bytes, q_bytes = size(model_path(args.model)), size(out)
    report = {
        "model": args.model, "method": args.method, "scale_rule": scale_rule, "weight_only": args.weight_only,
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
    if rule not in SCALE_RULE_NAMES:
        raise SystemExit(f"torchao-mx: unknown scale rule {rule!r}; choose from {', '.join(SCALE_RULE_NAMES)}")


def _limit_arg(text: str):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit must be a number, got {text!r}") from None
    if value <= 0 or (not value.is_integer() and value >= 1):
        raise argparse.ArgumentTypeError(f"--limit must be a positive integer or a fraction below 1, got {text!r}")
    return int(value) if value.is_integer() else value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_eval_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to a ``torchao-mx`` subparsers object; the handler is ``args.handler(args)``."""
    p = subparsers.add_parser("eval", help="lm-eval zero-shot tasks and WikiText-2 (offline, local data)")
    p.add_argument("--model", default="smollm2-135m", help="alias (stories260k, smollm2-135m) or HF folder")
    p.add_argument("--tasks", default=",".join(EVAL_TASK_NAMES), help=f"comma list of: {', '.join(EVAL_TASK_NAMES)}")
    p.add_argument("--limit", type=_limit_arg, default=None, help="first N documents per task (or a fraction < 1)")
    p.add_argument("--data-dir", default=None, help="folder with wikitext2/ and zeroshot/ (default: the shared data folder)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--max-length", type=_positive_int, default=2048, help="capped at the model's max_position_embeddings")
    p.set_defaults(handler=eval_command)
    return p


def require_lm_eval(prefix: str = "torchao-mx eval") -> None:
    """lm-eval is an optional extra: say which one to install before anything is loaded, not after."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"{prefix}: needs lm-eval ({e}); install it with: pip install 'torchao-mx-ext[eval]'") from None


def eval_command(args) -> int:
    from .eval.lm_eval_runner import check_data_files, format_lm_eval_table, resolve_tasks, run_lm_eval

    # Everything that can be checked without the model is checked first: a bad task name, a missing
    # data file, an unwritable --json, a wrong --model or a missing lm-eval costs no model loading.
    prefix = "torchao-mx eval"
    try:
        names = resolve_tasks(args.tasks)
        check_data_files(names, args.data_dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{prefix}: {e}") from None
    if args.max_length < 2:
        raise SystemExit(
            f"{prefix}: --max-length must be >= 2 (a window needs one token to predict the next), got {args.max_length}"
        )
    check_output_path(args.json, prefix=prefix)
    check_model_or_exit(args.model, prefix=prefix)
    require_lm_eval(prefix)
    from .zoo import load_model

    with user_errors(prefix):
        model, tokenizer = load_model(args.model)
    report = run_lm_eval(
        model, tokenizer, names, data_dir=args.data_dir, limit=args.limit,
        batch_size=args.batch_size, max_length=args.max_length,
    )
    report = {"model": args.model, **report}
    print(format_lm_eval_table(report))
    if args.json:
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


def _quantize_head(model, scheme: str, rule: Optional[str]) -> None:
    """``compare --quantize-head``: the output head weight-only (``inference.quantize_output_head``);
    MXFP4 heads take the row's scale rule."""
    from .configs import DEFAULT_SCALE_RULE, MXFP4BlockRotConfig, MXFP4Config
    from .inference import quantize_output_head

    if scheme == "int8":
        quantize_output_head(model, "int8")
        return
    cls = MXFP4BlockRotConfig if scheme == "mxfp4-block-rot" else MXFP4Config
    quantize_output_head(model, cls(act_quant=False, scale_rule=rule or DEFAULT_SCALE_RULE))


GPTAQ_ALPHA_HELP = "fraction of GPTAQ's asymmetric correction for the gptaq methods, in [0, 1] (default 0.25, the authors' value)"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; building it imports nothing heavy (see ``METHOD_NAMES``)."""

    aliases = ", ".join(MODEL_ALIASES[:2])
    parser = argparse.ArgumentParser(prog="torchao-mx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="perplexity / time / memory of quantization methods on one model")
    cmp.add_argument("--model", default="smollm2-135m", help=f"alias ({aliases}) or HF folder")
    cmp.add_argument("--methods", default="fp,rtn,block-rot,global-rot", help=f"comma list of: {', '.join(METHOD_NAMES)}")
    cmp.add_argument("--scale-rule", default=None,
                     help=f"one of {', '.join(SCALE_RULE_NAMES)}, a comma list, or 'all' (default: the package default)")
    cmp.add_argument("--act-scale-rule", default=None, choices=SCALE_RULE_NAMES, help="activation scale rule (default: same as weights)")
    cmp.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: 512 stories260k, 2048 SmolLM2)")
    cmp.add_argument("--eval-windows", type=int, default=4, help="number of perplexity windows")
    cmp.add_argument("--seeds", default="0,1,2", help="seeds for methods with a random rotation")
    cmp.add_argument("--calib-samples", type=int, default=128, help="calibration windows (GPTQ methods)")
    cmp.add_argument("--calib-seq-len", type=int, default=None, help="calibration window length (default: --seq-len)")
    cmp.add_argument("--calib-source", default="wikitext2", help="wikitext2 (validation), tinystories, or a text file")
    cmp.add_argument("--weight-only", action="store_true", help="quantize weights only (activations stay fp)")
    cmp.add_argument("--gptaq-alpha", type=float, default=None, help=GPTAQ_ALPHA_HELP)
    cmp.add_argument("--quantize-head", default="none", choices=tuple(HEAD_SCHEMES),
                     help="also quantize the output head (lm_head) weight-only, in every row (a decode-speed option)")
    cmp.add_argument("--json", default=None, help="write the report here")
    cmp.add_argument("--data-dir", default=None, help="folder with wikitext2/ (default: the shared data folder)")
    cmp.add_argument("--threads", type=int, default=None)
    cmp.add_argument("--quiet", action="store_true")
    qnt = sub.add_parser("quantize", help="quantize a model with one method and save it (safetensors)")
    qnt.add_argument("--model", required=True, help=f"alias ({aliases}) or HF folder")
    qnt.add_argument("--method", required=True, help=f"one of: {', '.join(m for m in METHOD_NAMES if m != 'fp')}")
    qnt.add_argument("--out", required=True, help="output folder (written atomically)")
    qnt.add_argument("--scale-rule", default=None, help="default: the package default")
    qnt.add_argument("--weight-only", action="store_true")
    qnt.add_argument("--seed", type=int, default=0)
    qnt.add_argument("--gptaq-alpha", type=float, default=None, help=GPTAQ_ALPHA_HELP)
    qnt.add_argument("--calib-samples", type=int, default=128)
    qnt.add_argument("--calib-seq-len", type=int, default=None)
    qnt.add_argument("--calib-source", default="wikitext2")
    qnt.add_argument("--data-dir", default=None)
    qnt.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("export", help="quantize a model and export it for vLLM (compressed-tensors) or llama.cpp (GGUF)")
    exp.add_argument("--model", required=True, help=f"alias ({aliases}) or HF folder")
    exp.add_argument("--method", required=True, help="; ".join(f"{f}: {', '.join(ms)}" for f, ms in EXPORT_METHODS.items()))
    exp.add_argument("--format", required=True, choices=tuple(EXPORT_METHODS))
    exp.add_argument("--out", required=True, help="output folder (compressed-tensors) or .gguf file, written atomically")
    exp.add_argument("--scale-rule", default=None, help="default: the package default")
    exp.add_argument("--weight-only", action="store_true")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--gptaq-alpha", type=float, default=None, help=GPTAQ_ALPHA_HELP)
    exp.add_argument("--calib-samples", type=int, default=128)
    exp.add_argument("--calib-seq-len", type=int, default=None)
    exp.add_argument("--calib-source", default="wikitext2")
    exp.add_argument("--data-dir", default=None)
    exp.add_argument("--overwrite", action="store_true")
    mrg = sub.add_parser("merge", help="join compare reports (JSON) of one model and setting into one table")
    mrg.add_argument("reports", nargs="+", help="compare --json files")
    mrg.add_argument("--json", default=None, help="write the merged report here")
    moe = sub.add_parser("moe-compare", help="router passes (PESF, Ban&Pick) and MXFP4 experts (+QESC) on a MoE model")
    moe.add_argument("--model", default="smollm2-135m-moe", help="alias (smollm2-135m-moe) or a HF MoE folder")
    moe.add_argument("--methods", default=",".join(MOE_DEFAULT_METHODS),
                     help=f"comma list of: {', '.join(MOE_METHOD_NAMES)}")
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
    moe.add_argument("--lm-eval-task", default=None, help="also score each method on this offline lm-eval task (e.g. arc_easy)")
    moe.add_argument("--lm-eval-limit", type=int, default=None, help="the first N documents of that task")
    moe.add_argument("--data-dir", default=None)
    moe.add_argument("--threads", type=int, default=None)
    moe.add_argument("--json", default=None)
    moe.add_argument("--quiet", action="store_true")
    add_eval_subcommand(sub)
    return parser


def run_merge(args) -> int:
    check_output_path(args.json)
    try:
        report = merge_reports([json.loads(Path(p).read_text()) for p in args.reports])
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"torchao-mx merge: {e}")
    _show(format_table(report), report, args.json)
    return 0


def run_moe(args) -> int:
    check_minimums(args, _MOE_MINIMUMS)
    if args.scale_rule is not None:
        check_scale_rule_or_exit(args.scale_rule)
    check_output_path(args.json)
    check_model_or_exit(args.model)

    import torch

    from .experiments.moe_compare import format_moe_table, run_moe_compare

    if args.threads:
        torch.set_num_threads(args.threads)
    with user_errors():  # run_moe_compare checks its inputs as it goes (methods, model, data)
        report = run_moe_compare(
            args.model, [m.strip() for m in args.methods.split(",") if m.strip()], args.eval_windows, args.seq_len,
            args.calib_samples, args.calib_seq_len, args.prompt_len, args.new_tokens, args.scale_rule,
            Path(args.data_dir) if args.data_dir else None, progress=not args.quiet,
            timing_rounds=args.timing_rounds, experts_backend=args.experts_backend,
            lm_eval_task=args.lm_eval_task, lm_eval_limit=args.lm_eval_limit,
        )
    _show(format_moe_table(report), report, args.json)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    quiet_known_noise()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "eval":
        return args.handler(args)
    if args.command == "quantize":
        run_quantize(args)
        return 0
    if args.command == "export":
        run_export(args)
        return 0
    if args.command == "merge":
        return run_merge(args)
    if args.command == "moe-compare":
        return run_moe(args)
    report = run_compare(args)
    _show(format_table(report), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
