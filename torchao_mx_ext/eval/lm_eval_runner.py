"""Offline lm-eval (0.4.x) evaluation of an in-memory model on the tasks in ``lm_eval_tasks/``.

    from torchao_mx_ext.eval.lm_eval_runner import run_lm_eval
    report = run_lm_eval(model, tokenizer, ["wikitext2", "arc_easy"], limit=100)
    report["tasks"]["arc_easy"]["acc"], report["tasks"]["wikitext2"]["token_perplexity"]

    torchao-mx eval --model stories260k --tasks wikitext2,arc_easy --limit 100 --json out.json

The task YAMLs (``lm_eval_tasks/*.yaml``) follow lm-eval's stock ``wikitext``, ``arc_easy``,
``arc_challenge``, ``piqa``, ``winogrande``, ``openbookqa`` and ``social_iqa`` definitions, but read local
JSONL files under a data folder (default ``torchao_mx_ext.zoo.data_dir()``) through
``custom_dataset: !function utils.load_jsonl``; they are loaded with
``TaskManager(include_path=<that folder>, include_defaults=False, metadata={"data_dir": ...})``, so no
stock task is indexed, shadowed or downloaded. The model is wrapped as
``HFLM(pretrained=model, tokenizer=tok, max_length=..., batch_size=...)``; ``max_length`` is capped at
the model's ``max_position_embeddings`` (HFLM would otherwise take a default of up to 8192).

WikiText-2 and our GPTQ-style token perplexity (``eval/perplexity.py``)
----------------------------------------------------------------------
lm-eval scores each of the 60 articles on its own (its *detokenized* text, ``utils.wikitext_detokenizer``)
with ``loglikelihood_rolling``: the article's tokens (``tokenizer.encode``, which for Llama tokenizers
begins with BOS) are predicted in disjoint windows of ``max_length``, the first one conditioned on an extra
BOS prefix token, later ones on one token of the previous window; the log-likelihood ``LL_d`` is summed
over every token of the article. The reported metrics all divide the same total ``NLL = -sum_d LL_d``::

    word_perplexity = exp(NLL / W)    W = sum_d len(re.split(r"\\s+", page_d))   (words of the raw page)
    byte_perplexity = exp(NLL / B)    B = UTF-8 bytes of the raw pages
    bits_per_byte   = NLL / (B ln 2)

Our perplexity is ``exp`` of the mean NLL per predicted token over fixed windows of ``seq_len`` tokens of
``"\\n\\n".join(rows)`` (raw, not detokenized; one BOS at the very start; the first token of each window
and the tail shorter than a window are not scored). The comparable lm-eval number is therefore::

    token_perplexity = exp(NLL / T) = word_perplexity ** (W / T)     T = tokens lm-eval scored

which ``run_lm_eval`` reports for ``wikitext2`` (with ``nll_sum``, ``tokens``, ``words``, ``bytes``).
Per word is far larger than per token: on the 60 articles stories260k's 512-token vocabulary gives
T = 766,068 tokens for W = 241,331 words, so word perplexity = token perplexity ** 3.17 (75.5 -> 915,946).
Our fixed windows over the same detokenized articles give 75.3 (0.3 % below); over the raw rows (not
detokenized, as ``eval.perplexity`` is run) 122.3: the detokenization, not the windowing, is the big step.
"""

import argparse
import copy
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
DEFAULT_TASKS = ("wikitext2", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "siqa")


def read_task_yaml(path: Union[str, Path]) -> dict:
    """A task YAML as a dict, ``!function x.y`` kept as the string ``"!function x.y"`` (nothing imported)."""
    import yaml  # PyYAML comes with transformers and lm-eval; imported here to keep `torchao-mx` startup light

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load(Path(path).read_text(), Loader=Loader)


def available_tasks(tasks_dir: Path = TASKS_DIR) -> Dict[str, dict]:
    """``{task name: {"yaml": path, "data_file": relative path, "output_type": ...}}`` of the shipped tasks."""
    tasks = {}
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        cfg = read_task_yaml(path)
        kwargs = cfg.get("dataset_kwargs") or {}
        tasks[cfg["task"]] = {"yaml": path, "data_file": kwargs.get("data_file"), "output_type": cfg.get("output_type")}
    return tasks


def resolve_tasks(tasks: Union[str, Iterable[str]]) -> List[str]:
    """Task names from a comma list or an iterable; an unknown name raises ``ValueError`` listing the known ones."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = list(dict.fromkeys(t for t in names if t))
    known = available_tasks()
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(map(repr, unknown)) or repr(tasks)}; "
            f"available: {', '.join(sorted(known))}"
        )
    return names


def check_data_files(tasks: Iterable[str], data_dir: Optional[Union[str, Path]] = None) -> Path:
    """The data folder, after checking every task's file is there (``FileNotFoundError`` naming file and task)."""
    from .lm_eval_tasks.utils import resolve_data_dir

    folder = resolve_data_dir(data_dir)
    known = available_tasks()
    for task in tasks:
        path = folder / known[task]["data_file"]
        if not path.is_file():
            raise FileNotFoundError(f"lm-eval task {task!r}: data file not found: {path} (data dir {folder})")
    return folder


class _QuietCustomKwargs(logging.Filter):
    # lm-eval warns "Custom kwargs can be passed to `--metadata`..." for every custom_dataset task.
    def filter(self, record):
        return "Custom kwargs can be passed" not in record.getMessage()


def _metric_table(task_results: dict) -> dict:
    out = {}
    for key, value in task_results.items():
        if key in ("alias", "name", "sample_len") or "," not in key:
            continue
        metric = key.split(",")[0]
        out[metric] = None if value in ("N/A", None) else float(value)
    return out


def run_lm_eval(
    model,
    tokenizer,
    tasks: Union[str, Iterable[str]],
    data_dir: Optional[Union[str, Path]] = None,
    limit: Optional[Union[int, float]] = None,
    batch_size: int = 4,
    max_length: int = 2048,
    bootstrap_iters: int = 100000,
) -> dict:
    """Evaluate ``model`` (a HF causal LM, in memory) on the shipped lm-eval tasks, offline.

    ``tasks``: names or a comma list (see ``available_tasks()``); ``limit``: the first ``limit`` documents
    of each task (an int), or a fraction (a float below 1), as lm-eval's ``limit``. Unknown tasks raise
    ``ValueError`` and missing data files ``FileNotFoundError`` before the model is touched.

    Returns ``{"tasks": {task: {metric: value, metric_stderr: value, "samples": n}}, "settings": {...}}``;
    ``wikitext2`` also gets ``nll_sum``, ``tokens``, ``words``, ``bytes`` and ``token_perplexity``
    (``exp(nll_sum / tokens)``, comparable to ``eval.perplexity``; see the module docstring).
    """
    names = resolve_tasks(tasks)
    folder = check_data_files(names, data_dir)
    if limit is not None and (limit <= 0 or (isinstance(limit, float) and not limit.is_integer() and limit >= 1)):
        raise ValueError(f"limit must be a positive number of documents or a fraction below 1, got {limit}")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1 and max_length ({max_length}) >= 2")

    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and max_length > max_positions:
        logger.info("max_length %d capped at the model's max_position_embeddings %d", max_length, max_positions)
        max_length = max_positions
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)

    quiet = _QuietCustomKwargs()
    task_logger = logging.getLogger("lm_eval.api.task")  # where that warning is logged
    task_logger.addFilter(quiet)
    rng_states = _save_rng_states()  # simple_evaluate reseeds random, numpy and torch globally
    try:
        task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(folder)})
        # HFLM sets a pad token on the tokenizer it is given: hand it a copy.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), max_length=max_length, batch_size=batch_size)
        raw = simple_evaluate(
            model=lm,
            tasks=names,
            limit=limit,
            task_manager=task_manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=True,
        )
    finally:
        task_logger.removeFilter(quiet)
        _restore_rng_states(rng_states)

    results = {}
    for task in names:
        entry = _metric_table(raw["results"][task])
        samples = raw["samples"][task]
        entry["samples"] = len(samples)
        if task == "wikitext2":
            entry.update(_wikitext_token_counts(lm, samples))
        results[task] = entry
    return {
        "tasks": results,
        "settings": {
            "data_dir": str(folder),
            "limit": limit,
            "batch_size": batch_size,
            "max_length": max_length,
            "num_fewshot": 0,
            "lm_eval": getattr(lm_eval, "__version__", None) or raw.get("lm_eval_version"),
            "task_versions": {t: raw.get("versions", {}).get(t) for t in names},
        },
    }


def _save_rng_states():
    import random

    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_rng_states(states) -> None:
    import random

    import numpy as np
    import torch

    py, npy, cpu, cuda = states
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _wikitext_token_counts(lm, samples: list) -> dict:
    """Total NLL and the tokens / words / bytes it is spread over, from lm-eval's per-document samples."""
    nll = tokens = words = n_bytes = 0
    for s in samples:
        ll, n_words = s["word_perplexity"]
        _, b = s["byte_perplexity"]
        nll -= ll
        words += n_words
        n_bytes += b
        # exactly the token list loglikelihood_rolling predicts (every token, BOS included if the tokenizer adds it)
        tokens += len(lm.tok_encode(s["target"]))
    return {
        "nll_sum": nll,
        "tokens": tokens,
        "words": words,
        "bytes": n_bytes,
        "token_perplexity": math.exp(nll / tokens),
    }


# ---- command line: `torchao-mx eval` -----------------------------------------------------------------


def format_lm_eval_table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"model {report.get('model', '?')}  |  lm-eval {s['lm_eval']}, 0-shot, limit {s['limit']}, max_length {s['max_length']}",
        f"{'task':<14} {'metric':<18} {'value':>12} {'stderr':>9} {'n':>6}",
    ]
    for task, r in report["tasks"].items():
        for metric, value in r.items():
            if metric.endswith("_stderr") or metric in ("samples", "nll_sum", "tokens", "words", "bytes") or value is None:
                continue
            err = r.get(f"{metric}_stderr")
            err = f"{err:.4f}" if err is not None else ""
            lines.append(f"{task:<14} {metric:<18} {value:>12.4f} {err:>9} {r['samples']:>6}")
        if "tokens" in r:
            lines.append(f"{'':<14} {'(tokens / words)':<18} {r['tokens']:>12d} {r['words']:>9d}")
    return "\n".join(lines)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma list of: {', '.join(DEFAULT_TASKS)}")
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
    from ..cli import check_model_or_exit, check_output_path, user_errors

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
    from ..zoo import load_model

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


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m torchao_mx_ext.eval.lm_eval_runner eval ...`` (the same as ``torchao-mx eval``)."""
    parser = argparse.ArgumentParser(prog="torchao-mx")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_subcommand(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
