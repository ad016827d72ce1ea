"""Dataset loaders and doc functions for the offline lm-eval tasks in this folder.

lm-eval (0.4.x) calls a task's ``custom_dataset`` function as
``custom_dataset(**task.metadata, **task.dataset_kwargs)``: the YAML's ``dataset_kwargs`` name the
data file (relative to the data folder) and the split, the folder itself comes from the TaskManager's
``metadata={"data_dir": ...}`` (``lm_eval --metadata '{"data_dir": "..."}'`` on the command line),
else from ``torchao_mx_ext.zoo.data_dir()``. Nothing here touches the network.

The WikiText and WinoGrande functions are copies of lm-eval's own
(``lm_eval/tasks/wikitext/preprocess_wikitext.py``, ``lm_eval/tasks/winogrande/preprocess_winogrande.py``)
so that prompts and metrics match the stock tasks.
"""

import json
import re
from pathlib import Path


def resolve_data_dir(data_dir=None) -> Path:
    if data_dir:
        return Path(data_dir)
    from torchao_mx_ext.paths import data_dir as default_data_dir

    return default_data_dir()


def read_jsonl(path: Path, task: str = "?") -> list:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task {task!r}: data file not found: {path}")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"lm-eval task {task!r}: {path} line {n} is not JSON: {e}") from None
    if not rows:
        raise ValueError(f"lm-eval task {task!r}: data file {path} is empty")
    return rows


def load_jsonl(data_file, split="test", data_dir=None, task=None, **_ignored):
    """``{split: datasets.Dataset}`` from ``<data_dir>/<data_file>`` (one JSON object a line)."""
    import datasets

    rows = read_jsonl(resolve_data_dir(data_dir) / data_file, task or data_file)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


# ---- WikiText (copied from lm_eval/tasks/wikitext/preprocess_wikitext.py, lm-eval 0.4.x) -------------


def wikitext_detokenizer(doc):
    string = doc["page"]
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def wikitext_word_count(doc) -> int:
    # As lm-eval: words of the *original* page, before detokenization.
    return len(re.split(r"\s+", doc["page"]))


def wikitext_process_results(doc, results):
    (loglikelihood,) = results
    _words = wikitext_word_count(doc)
    _bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, _words),
        "byte_perplexity": (loglikelihood, _bytes),
        "bits_per_byte": (loglikelihood, _bytes),
    }


# ---- WinoGrande (copied from lm_eval/tasks/winogrande/preprocess_winogrande.py): partial scoring ----


def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[str(doc["answer"])]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
