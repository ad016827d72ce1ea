"""Offline lm-eval (0.4.x) evaluation of an in-memory model on the tasks in ``lm_eval_tasks/``.

    from torchao_mx_ext.eval.lm_eval_runner import run_lm_eval
    report = run_lm_eval(model, tokenizer, ["wikitext2", "arc_easy"], limit=100)
    report["tasks"]["arc_easy"]["acc"], report["tasks"]["wikitext2"]["token_perplexity"]

    torchao-mx eval --model stories260k --tasks wikitext2,arc_easy --limit 100 --json out.json

The task YAMLs (``lm_eval_tasks/*.yaml``) follow lm-eval's stock ``wikitext``, ``arc_easy``,
``arc_challenge``, ``piqa``, ``winogrande``, ``openbookqa`` and ``social_iqa`` definitions, but read local
JSONL files under a data folder (default ``torchao_mx_ext.paths.data_dir()``) through
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

import copy
import logging
import math
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
