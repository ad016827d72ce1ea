"""Offline lm-eval tasks (torchao_mx_ext/eval/lm_eval_tasks) and runner, end to end on stories260k.

stories260k is a 260k-parameter TinyStories model: on the real multiple-choice sets it is at chance, so
"the accuracy metric moves" is checked on a small TinyStories-based set written to a temporary data folder
(original sentence against the same words shuffled), where the intact model is far above chance and a
broken copy is at chance.
"""

import argparse
import copy
import json
import math
import random
import re
import socket
from pathlib import Path

import pytest
import torch

from torchao_mx_ext.eval import perplexity, tokenize_for_perplexity
from torchao_mx_ext.eval.lm_eval_runner import (
    DEFAULT_TASKS,
    TASKS_DIR,
    available_tasks,
    read_task_yaml,
    run_lm_eval,
)
from torchao_mx_ext.cli import EVAL_TASK_NAMES, add_eval_subcommand
from torchao_mx_ext.eval.lm_eval_tasks.utils import read_jsonl, wikitext_detokenizer
from torchao_mx_ext.zoo import load_model

LIMIT = 3  # documents per task in the end-to-end run (wikitext2: 3 articles, about 25k tokens)
SEQ_LEN = 512  # stories260k's max_position_embeddings: lm-eval windows and ours
# Our fixed-window token perplexity vs lm-eval's rolling per-document one (converted to per token) on
# the same detokenized articles: measured 2.0 % apart on 3 articles, 0.3 % on all 60; allow 5 %.
PPL_REL_TOL = 0.05


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_task_names_are_the_runners_defaults():
    # The CLI lists them without importing the runner (a fast --help).
    assert EVAL_TASK_NAMES == DEFAULT_TASKS


@pytest.fixture(scope="module")
def stories():
    return load_model("stories260k")


@pytest.fixture(scope="module")
def no_network():
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def report(stories, no_network):
    model, tok = stories
    # max_length 2048 (the default) is capped at the model's 512 positions
    return run_lm_eval(model, tok, list(DEFAULT_TASKS), limit=LIMIT, batch_size=4)


def test_shipped_tasks_are_indexed_by_lm_eval(shared_data):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    # lm-eval skips a YAML it cannot parse without a word: every file must show up as a task
    assert sorted(tm.all_subtasks) == sorted(DEFAULT_TASKS) == sorted(available_tasks())
    assert sorted(p.stem for p in TASKS_DIR.glob("*.yaml")) == sorted(DEFAULT_TASKS)
    for name, info in available_tasks().items():
        assert (shared_data / info["data_file"]).is_file(), name


def test_prompts_follow_the_stock_tasks(shared_data):
    from lm_eval.tasks import TaskManager

    stock_dir = Path(__import__("lm_eval").__file__).parent / "tasks"
    stock = {n: read_task_yaml(stock_dir / p) for n, p in {
        "arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml", "siqa": "siqa/siqa.yaml",
        "openbookqa": "openbookqa/openbookqa.yaml", "wikitext": "wikitext/wikitext.yaml",
    }.items()}
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(shared_data)})
    # TaskManager.load() from lm-eval 0.4.12 on; load_task_or_group() before (deprecated since)
    tasks = tm.load(list(DEFAULT_TASKS))["tasks"] if hasattr(tm, "load") else tm.load_task_or_group(list(DEFAULT_TASKS))
    first = {n: next(iter(t.eval_docs)) for n, t in tasks.items()}

    assert tasks["arc_easy"].config.doc_to_text == stock["arc_easy"]["doc_to_text"]
    assert tasks["piqa"].config.doc_to_text == stock["piqa"]["doc_to_text"]
    assert stock["siqa"]["doc_to_text"] == "Q: {{context}} {{question}}\nA:"  # our question = context + " " + question
    assert stock["openbookqa"]["doc_to_text"] == tasks["openbookqa"].config.doc_to_text == "question_stem"
    assert [m["metric"] for m in tasks["wikitext2"].config.metric_list] == [m["metric"] for m in stock["wikitext"]["metric_list"]]
    for name in ("arc_easy", "arc_challenge", "openbookqa", "siqa"):
        doc = first[name]
        assert tasks[name].doc_to_choice(doc) == doc["choices"]
        assert tasks[name].doc_to_target(doc) == doc["label"]
    doc = first["arc_easy"]
    assert tasks["arc_easy"].doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:"
    doc = first["siqa"]
    assert tasks["siqa"].doc_to_text(doc) == f"Q: {doc['question']}\nA:"
    doc = first["piqa"]
    assert tasks["piqa"].doc_to_choice(doc) == [doc["sol1"], doc["sol2"]] and tasks["piqa"].doc_to_target(doc) == doc["label"]
    # WinoGrande: partial scoring, the context is the choice (sentence up to "_" + option), the target the rest
    doc = first["winogrande"]
    assert tasks["winogrande"].doc_to_choice(doc) == [doc["sentence"].split("_")[0] + o for o in (doc["option1"], doc["option2"])]
    assert tasks["winogrande"].doc_to_text(doc) == int(doc["answer"]) - 1
    assert tasks["winogrande"].doc_to_target(doc) == doc["sentence"].split("_", 1)[1].strip()
    assert len(tasks["wikitext2"].eval_docs) == 60
    assert tasks["wikitext2"].doc_to_target(first["wikitext2"]).startswith("\n= Robert Boulter =\n")


def test_every_task_runs_offline_with_valid_numbers(report):
    assert list(report["tasks"]) == list(DEFAULT_TASKS)
    assert report["settings"]["max_length"] == SEQ_LEN and report["settings"]["limit"] == LIMIT
    for name, r in report["tasks"].items():
        assert r["samples"] == LIMIT, name
        if name == "wikitext2":
            continue
        expected = {"acc", "acc_stderr"} | ({"acc_norm", "acc_norm_stderr"} if name not in ("winogrande", "siqa") else set())
        assert expected <= set(r), (name, r)
        for metric in ("acc", "acc_norm"):
            if metric in r:
                assert 0.0 <= r[metric] <= 1.0 and r[f"{metric}_stderr"] >= 0.0, (name, r)
                assert (r[metric] * LIMIT) == pytest.approx(round(r[metric] * LIMIT)), (name, r)
    w = report["tasks"]["wikitext2"]
    assert w["tokens"] > w["words"] > 0 and w["bytes"] > w["words"]
    assert 1.0 < w["token_perplexity"] < 512  # below a uniform guess over the 512-token vocabulary
    assert 1.0 < w["byte_perplexity"] < 256
    assert w["bits_per_byte"] == pytest.approx(math.log2(w["byte_perplexity"]), rel=1e-9)
    # one total NLL behind every metric: per word, per byte, per token
    assert w["word_perplexity"] == pytest.approx(math.exp(w["nll_sum"] / w["words"]), rel=1e-9)
    assert w["byte_perplexity"] == pytest.approx(math.exp(w["nll_sum"] / w["bytes"]), rel=1e-9)
    assert w["token_perplexity"] == pytest.approx(w["word_perplexity"] ** (w["words"] / w["tokens"]), rel=1e-9)
    json.dumps(report)  # JSON-ready


def test_wikitext2_agrees_with_our_token_perplexity(report, stories, shared_data):
    model, tok = stories
    w = report["tasks"]["wikitext2"]
    docs = read_jsonl(shared_data / "wikitext2" / "wikitext2_raw_test_docs.jsonl")[:LIMIT]
    texts = [wikitext_detokenizer(d) for d in docs]  # exactly the strings lm-eval scored

    # 1. lm-eval's loglikelihood_rolling rebuilt by hand: per article, tok.encode (BOS included), every token
    #    predicted, the first from one extra BOS, in disjoint windows of SEQ_LEN. Same NLL, same token count.
    nll, n_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tok.encode(text)
            inp = [tok.bos_token_id] + ids
            n_tokens += len(ids)
            for start in range(0, len(ids), SEQ_LEN):
                end = min(start + SEQ_LEN, len(ids))
                logp = torch.log_softmax(model(torch.tensor([inp[start:end]])).logits[0].double(), -1)
                nll -= logp.gather(1, torch.tensor(ids[start:end])[:, None]).sum().item()
    assert n_tokens == w["tokens"]
    assert nll == pytest.approx(w["nll_sum"], rel=1e-3)  # float32 batches vs one window at a time

    # 2. Our GPTQ-style perplexity over the same articles ("\n\n"-joined, fixed windows, first token of a
    #    window and the tail unscored) is the same quantity up to where the windows fall.
    ids = tokenize_for_perplexity(tok, "\n\n".join(texts))
    ours = perplexity(model, ids, seq_len=SEQ_LEN, progress=False)
    assert ours["ppl"] == pytest.approx(w["token_perplexity"], rel=PPL_REL_TOL)
    # ... while the per-word number is another scale altogether (about token_ppl ** (tokens / words))
    assert w["word_perplexity"] > ours["ppl"] ** 2


def _shuffled_sentence_set(shared_data, n=40, seed=0):
    """PIQA-shaped items from TinyStories: a sentence, then the next one against the same words shuffled."""
    rng = random.Random(seed)
    paragraphs = (shared_data / "tinystories" / "tinystories_val_subset.txt").read_text().split("\n\n")
    items = []
    for p in paragraphs[1:]:
        sents = re.split(r"(?<=[.!?])\s+", p.strip())
        if len(sents) < 2 or len(sents[1].split()) < 5 or '"' in sents[1]:
            continue
        words = sents[1].split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        label = len(items) % 2  # balanced: chance is exactly 0.5
        sols = [sents[1], " ".join(shuffled)][:: 1 if label == 0 else -1]
        items.append({"goal": sents[0], "sol1": sols[0], "sol2": sols[1], "label": label})
        if len(items) == n:
            return items
    raise AssertionError("not enough TinyStories sentences")


def test_accuracy_moves_with_the_model(stories, shared_data, tmp_path):
    model, tok = stories
    items = _shuffled_sentence_set(shared_data)
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "piqa_validation.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))

    intact = run_lm_eval(model, tok, ["piqa"], data_dir=tmp_path)["tasks"]["piqa"]
    broken_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # same weight values, structure destroyed: every matrix's entries permuted
        for p in broken_model.parameters():
            if p.dim() >= 2:
                p.copy_(p.flatten()[torch.randperm(p.numel(), generator=g)].view_as(p))
    broken = run_lm_eval(broken_model, tok, ["piqa"], data_dir=tmp_path)["tasks"]["piqa"]

    assert intact["samples"] == broken["samples"] == len(items) == 40
    assert intact["acc"] >= 0.9 and intact["acc_norm"] >= 0.9, intact  # measured 1.0
    assert 0.3 <= broken["acc"] <= 0.7, broken  # chance 0.5 (stderr 0.08 at n=40); measured 0.525


def test_bad_inputs_fail_before_any_model_work(tmp_path):
    class Untouchable:  # any attribute access means model work started
        def __getattr__(self, name):
            raise AssertionError(f"model touched: {name}")

    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) 'hellaswag'; available: arc_challenge, arc_easy, "):
        run_lm_eval(Untouchable(), Untouchable(), ["arc_easy", "hellaswag"])
    with pytest.raises(ValueError, match="available:"):
        run_lm_eval(Untouchable(), Untouchable(), "")
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "arc_easy_test.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "label": 0}\n')
    missing = tmp_path / "zeroshot" / "piqa_validation.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"lm-eval task 'piqa': data file not found: {re.escape(str(missing))}"):
        run_lm_eval(Untouchable(), Untouchable(), "arc_easy,piqa", data_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["arc_easy_test.jsonl", "zeroshot"]


def _eval_parser():
    parser = argparse.ArgumentParser(prog="torchao-mx")
    add_eval_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_bad_inputs_write_nothing(tmp_path, monkeypatch):
    import torchao_mx_ext.zoo as zoo

    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: pytest.fail("model loaded despite bad inputs"))
    out = tmp_path / "out" / "report.json"
    args = _eval_parser().parse_args(["eval", "--model", "stories260k", "--tasks", "arc_easy,nope", "--json", str(out)])
    with pytest.raises(SystemExit, match="torchao-mx eval: unknown lm-eval task.*'nope'.*available: arc_challenge"):
        args.handler(args)
    args = _eval_parser().parse_args(
        ["eval", "--model", "stories260k", "--tasks", "wikitext2", "--data-dir", str(tmp_path), "--json", str(out)]
    )
    with pytest.raises(SystemExit, match=r"lm-eval task 'wikitext2': data file not found: .*wikitext2_raw_test_docs\.jsonl"):
        args.handler(args)
    assert list(tmp_path.iterdir()) == []
    for bad in (["--limit", "0"], ["--limit", "1.5"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit):
            _eval_parser().parse_args(["eval", "--tasks", "arc_easy", *bad])


def test_cli_eval_prints_a_table_and_writes_json(tmp_path, capsys, no_network):
    out = tmp_path / "report.json"
    args = _eval_parser().parse_args(
        ["eval", "--model", "stories260k", "--tasks", "winogrande,arc_easy", "--limit", "2", "--batch-size", "2", "--json", str(out)]
    )
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "winogrande" in printed and "acc_norm" in printed and f"wrote {out}" in printed
    data = json.loads(out.read_text())
    assert data["model"] == "stories260k" and list(data["tasks"]) == ["winogrande", "arc_easy"]
    assert data["tasks"]["arc_easy"]["samples"] == 2 and data["settings"]["batch_size"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_run_leaves_the_callers_random_state_alone(stories, tmp_path):
    model, tok = stories
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_lm_eval(model, tok, ["winogrande"], limit=1)  # lm-eval's simple_evaluate reseeds torch with 1234
    assert torch.equal(torch.rand(3), expected)
