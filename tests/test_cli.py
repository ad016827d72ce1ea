import json
import logging
import shutil
import sys

import pytest
import torch

from torchao_mx_ext import cli
from torchao_mx_ext.cli import main



def _run(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["compare", "--model", "stories260k", "--eval-windows", "2", "--quiet", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_compare_writes_the_json_contract_and_is_deterministic(tmp_path, capsys):
    args = ("--methods", "fp,rtn,block-rot,global-rot", "--seeds", "0,1")
    report = _run(tmp_path, "a.json", *args)
    table = capsys.readouterr().out
    assert report["model"] == "stories260k" and report["settings"]["seq_len"] == 512
    methods = report["methods"]
    assert set(methods) == {"fp", "rtn", "block-rot", "global-rot"}
    for r in methods.values():
        assert r["ppl"] > 1 and r["wall_s"] > 0 and r["peak_mem_mb"] > 0 and r["windows"] == 2
    assert methods["rtn"]["ppl"] > methods["fp"]["ppl"]
    assert set(methods["global-rot"]["ppl_per_seed"]) == {"0", "1"} and "ppl_std" in methods["global-rot"]
    for key in methods:
        assert key in table
    again = _run(tmp_path, "b.json", *args)
    assert {k: v["ppl"] for k, v in again["methods"].items()} == {k: v["ppl"] for k, v in methods.items()}


def test_compare_all_scale_rules_in_one_table(tmp_path):
    report = _run(tmp_path, "rules.json", "--methods", "rtn", "--scale-rule", "all", "--weight-only")
    assert set(report["methods"]) == {f"rtn[{r}]" for r in ("floor", "even", "rceil", "fp_quant", "mse")}
    assert report["settings"]["weight_only"] is True


def test_compare_quantize_head(tmp_path):
    """--quantize-head applies to every row (fp included) and is recorded; int8 moves the fp perplexity by
    far less than an RTN MXFP4 head does."""
    fp = _run(tmp_path, "fp.json", "--methods", "fp")["methods"]["fp"]["ppl"]
    report = {h: _run(tmp_path, f"{h}.json", "--methods", "fp", "--quantize-head", h) for h in ("int8", "mxfp4")}
    assert report["int8"]["settings"]["lm_head"] == "int8 weight-only, per-row scales"
    assert report["mxfp4"]["settings"]["lm_head"] == "MXFP4 weight-only (RTN)"
    int8, mxfp4 = (report[h]["methods"]["fp"]["ppl"] for h in ("int8", "mxfp4"))
    assert int8 != fp and abs(int8 / fp - 1) < 0.01
    assert abs(mxfp4 / fp - 1) > 3 * abs(int8 / fp - 1)


def test_compare_gptaq_alpha_names_its_row(tmp_path):
    """--gptaq-alpha reaches GPTAQ (other weights than the default's) and names its row, so a merge never
    takes it for the default's; other methods are untouched by it."""
    common = ("--seq-len", "64", "--calib-samples", "2", "--calib-seq-len", "64", "--eval-windows", "1")
    default = _run(tmp_path, "d.json", "--methods", "gptaq,gptq", *common)["methods"]
    half = _run(tmp_path, "h.json", "--methods", "gptaq,gptq", "--gptaq-alpha", "1", *common)["methods"]
    assert set(half) == {"gptaq[alpha=1]", "gptq"} and half["gptaq[alpha=1]"]["gptaq_alpha"] == 1.0
    assert default["gptaq"]["gptaq_alpha"] == 0.25 and "gptaq_alpha" not in default["gptq"]
    assert half["gptaq[alpha=1]"]["ppl"] != default["gptaq"]["ppl"] and half["gptq"]["ppl"] == default["gptq"]["ppl"]


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_gptaq_alpha_out_of_range_is_refused(no_loading, tmp_path, value):
    _one_line_exit(["compare", "--model", "stories260k", "--methods", "gptaq", "--gptaq-alpha", value], "must be in")
    _one_line_exit(["quantize", "--model", "stories260k", "--method", "gptaq", "--out", str(tmp_path / "q"), "--gptaq-alpha", value],
                   "must be in")
    assert not (tmp_path / "q").exists()


def test_compare_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        main(["compare", "--model", "stories260k", "--methods", "rtn,awq"])
    with pytest.raises(SystemExit, match="unknown scale rule"):
        main(["compare", "--model", "stories260k", "--scale-rule", "ceil"])
    with pytest.raises(SystemExit, match="no such folder"):
        main(["compare", "--model", str(tmp_path / "nothing")])
    assert not list(tmp_path.iterdir())


def test_quantize_saves_a_reloadable_checkpoint_for_model_level_methods(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from torchao_mx_ext import RotatedMXFP4Tensor
    from torchao_mx_ext.recipes import METHODS, QuantSettings
    from torchao_mx_ext.zoo import load_model

    out = tmp_path / "brq"
    assert main(["quantize", "--model", "stories260k", "--method", "brq", "--scale-rule", "floor", "--out", str(out)]) == 0
    assert "MB safetensors" in capsys.readouterr().out
    assert sorted(p.suffix for p in out.glob("*.safetensors")) == [".safetensors"] and not list(out.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded.model.layers[0].mlp.down_proj.weight, RotatedMXFP4Tensor)
    expected, _ = load_model("stories260k")
    METHODS["brq"].apply(expected, QuantSettings("floor"))
    ids = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected(ids).logits)
    with pytest.raises(SystemExit, match="exists"):
        main(["quantize", "--model", "stories260k", "--method", "brq", "--out", str(out)])
    with pytest.raises(SystemExit, match="unknown method"):
        main(["quantize", "--model", "stories260k", "--method", "awq", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_compare_keeps_finished_methods_when_interrupted(tmp_path, monkeypatch):
    import torchao_mx_ext.eval as tme_eval

    real, calls = tme_eval.perplexity, []

    def perplexity_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. the user stops a multi-hour run
        return real(*args, **kwargs)

    monkeypatch.setattr(tme_eval, "perplexity", perplexity_then_crash)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        main(["compare", "--model", "stories260k", "--eval-windows", "1", "--methods", "fp,rtn", "--quiet", "--json", str(out)])
    partial = json.loads(out.read_text())
    assert list(partial["methods"]) == ["fp"] and partial["complete"] is False


def test_merge_joins_one_method_per_run_reports(tmp_path, capsys):
    # One method per invocation (as the long SmolLM2 run does), then one table: the merged numbers are
    # the runs' own, and the quantization time is part of the wall time.
    fp = _run(tmp_path, "fp.json", "--methods", "fp")
    rot = _run(tmp_path, "rot.json", "--methods", "global-rot", "--seeds", "1")
    out = tmp_path / "all.json"
    assert main(["merge", str(tmp_path / "fp.json"), str(tmp_path / "rot.json"), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert list(merged["methods"]) == ["fp", "global-rot"]
    assert merged["methods"]["global-rot"] == rot["methods"]["global-rot"]
    assert merged["methods"]["fp"] == fp["methods"]["fp"]
    assert merged["settings"]["seeds"] == [1]  # the seeds a seeded method used
    assert 0 < rot["methods"]["global-rot"]["quantize_s"] < rot["methods"]["global-rot"]["wall_s"]
    assert "global-rot" in capsys.readouterr().out


def test_merge_joins_runs_of_one_method_on_different_seeds(tmp_path):
    # Seeds run one per process (in the background, one JSON each) must merge into what one run over
    # all of them reports: the same per-seed perplexities, their mean and their sample spread.
    whole = _run(tmp_path, "s012.json", "--methods", "fp,global-rot", "--seeds", "0,1,2")["methods"]["global-rot"]
    _run(tmp_path, "s0.json", "--methods", "fp,global-rot", "--seeds", "0")
    _run(tmp_path, "s21.json", "--methods", "global-rot", "--seeds", "2,1")
    out = tmp_path / "all.json"
    assert main(["merge", str(tmp_path / "s0.json"), str(tmp_path / "s21.json"), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    joined = merged["methods"]["global-rot"]
    assert list(joined["ppl_per_seed"]) == ["0", "1", "2"]
    assert joined["ppl_per_seed"] == pytest.approx(whole["ppl_per_seed"], rel=1e-9)
    ppls = list(whole["ppl_per_seed"].values())
    mean = sum(ppls) / 3
    assert joined["ppl"] == pytest.approx(mean, rel=1e-9)
    assert joined["ppl_std"] == pytest.approx((sum((p - mean) ** 2 for p in ppls) / 2) ** 0.5, rel=1e-9)
    assert merged["settings"]["seeds"] == [0, 1, 2] and list(merged["methods"]) == ["fp", "global-rot"]
    # the same seed twice is one measurement counted twice: refused
    with pytest.raises(SystemExit, match="seed"):
        main(["merge", str(tmp_path / "s0.json"), str(tmp_path / "s012.json")])
    # runs with other thread counts merge, and a merged report (its thread counts a list) merges again
    other = json.loads((tmp_path / "s21.json").read_text())
    first_threads = json.loads((tmp_path / "s0.json").read_text())["settings"]["threads"]
    other["settings"]["threads"] = first_threads + 1
    (tmp_path / "s21_other_threads.json").write_text(json.dumps(other))
    assert main(["merge", str(tmp_path / "s0.json"), str(tmp_path / "s21_other_threads.json"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["threads"] == [first_threads, first_threads + 1]
    _run(tmp_path, "rtn.json", "--methods", "rtn")
    again = tmp_path / "again.json"
    assert main(["merge", str(out), str(tmp_path / "rtn.json"), "--json", str(again)]) == 0
    assert list(json.loads(again.read_text())["methods"]) == ["fp", "global-rot", "rtn"]


def test_merge_refuses_reports_that_do_not_belong_together(tmp_path):
    _run(tmp_path, "fp.json", "--methods", "fp")
    _run(tmp_path, "fp3.json", "--methods", "fp", "--eval-windows", "3")  # the later flag wins
    _run(tmp_path, "rtn_wo.json", "--methods", "rtn", "--weight-only")
    partial = json.loads((tmp_path / "fp.json").read_text())
    (tmp_path / "partial.json").write_text(json.dumps(dict(partial, complete=False)))
    for pair in (("fp.json", "fp3.json"), ("fp.json", "rtn_wo.json"), ("fp.json", "fp.json"), ("partial.json",)):
        with pytest.raises(SystemExit, match="merge"):
            main(["merge", *[str(tmp_path / p) for p in pair]])
    with pytest.raises(SystemExit, match="merge"):
        main(["merge", str(tmp_path / "missing.json")])


# ---- user errors: one line naming what to fix, before anything heavy ----------------------------------


def _one_line_exit(argv, match: str) -> str:
    with pytest.raises(SystemExit, match=match) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("torchao-mx") and "\n" not in message, message
    return message


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: the errors below must come before that."""
    import torchao_mx_ext.zoo as zoo

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(zoo, "load_model", load_model)


def test_cli_names_match_the_library():
    from torchao_mx_ext.mx import SCALE_RULES
    from torchao_mx_ext.recipes import METHODS
    from torchao_mx_ext.rotation import fusion
    from torchao_mx_ext.zoo import MODEL_ALIASES

    assert cli.METHOD_NAMES == tuple(METHODS)
    assert cli.SCALE_RULE_NAMES == tuple(SCALE_RULES)
    assert cli.MODEL_ALIASES == tuple(MODEL_ALIASES)
    from torchao_mx_ext.experiments.moe_compare import DEFAULT_METHODS, MOE_METHODS

    assert cli.MOE_METHOD_NAMES == tuple(MOE_METHODS) and cli.MOE_DEFAULT_METHODS == DEFAULT_METHODS
    assert {m for m in METHODS if cli._is_model_level(m)} == {
        "quarot", "brq", "quarot+gptq", "brq+gptq", "dartquant", "dartquant-block", "dartquant-block+gptq",
        "mxrot-block", "mxrot-block+gptq", "brq+gptaq", "smooth+block-rot", "smooth+gptq-block-rot",
        "smooth+gptaq-block-rot", "smooth-search+block-rot", "smooth-search+gptaq-block-rot",
    }
    assert "check_supported" in vars(fusion)


@pytest.mark.parametrize("command", [
    ["compare"], ["quantize", "--method", "rtn", "--out", "OUT"], ["eval", "--tasks", "wikitext2"], ["moe-compare"],
])
def test_missing_model_path_is_refused_with_the_aliases(tmp_path, no_loading, command):
    command = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    missing = tmp_path / "no-such-model"
    message = _one_line_exit([*command, "--model", str(missing)], "no such folder")
    assert str(missing) in message and "stories260k" in message and "smollm2-135m" in message
    (tmp_path / "empty").mkdir()
    _one_line_exit([*command, "--model", str(tmp_path / "empty")], "no config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def _tiny_gpt2(folder):
    """A 1-layer GPT-2 built offline, with stories260k's tokenizer: a family model-level rotation lacks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from torchao_mx_ext.zoo import model_path

    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_path("stories260k") / name, folder)
    return str(folder)


def test_model_level_rotation_refuses_other_architectures_before_any_method(tmp_path, monkeypatch):
    import torchao_mx_ext.eval as tme_eval

    def no_method_runs(*args, **kwargs):
        raise AssertionError("a method ran before the unsupported architecture was refused")

    monkeypatch.setattr(tme_eval, "perplexity", no_method_runs)
    gpt2 = _tiny_gpt2(tmp_path / "gpt2")
    message = _one_line_exit(["compare", "--model", gpt2, "--methods", "fp,rtn,brq,quarot+gptq", "--seq-len", "32"],
                             "GPT2LMHeadModel")
    assert "brq, quarot+gptq" in message and "LlamaForCausalLM" in message
    _one_line_exit(["quantize", "--model", gpt2, "--method", "dartquant-block", "--out", str(tmp_path / "q")],
                   "dartquant-block: model-level rotation supports")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv, match", [
    (["compare", "--seeds", "a,b"], "--seeds must be a comma list of distinct integers"),
    (["compare", "--seeds", ","], "--seeds must be"),
    (["compare", "--seeds", "1,1"], "--seeds must be"),
    (["compare", "--calib-samples", "0"], "--calib-samples must be >= 1, got 0"),
    (["compare", "--calib-samples=-3"], "--calib-samples must be >= 1, got -3"),
    (["compare", "--calib-seq-len", "0"], "--calib-seq-len must be >= 2"),
    (["compare", "--seq-len", "0"], "--seq-len must be >= 2"),
    (["compare", "--seq-len", "1"], "--seq-len must be >= 2"),  # was: ppl nan, exit 0
    (["compare", "--eval-windows", "0"], "--eval-windows must be >= 1"),
    (["compare", "--threads", "0"], "--threads must be >= 1"),
    (["quantize", "--method", "gptq", "--out", "OUT", "--calib-samples", "0"], "--calib-samples must be >= 1"),
    (["quantize", "--method", "gptq", "--out", "OUT", "--calib-seq-len", "1"], "--calib-seq-len must be >= 2"),
    (["moe-compare", "--seq-len", "1"], "--seq-len must be >= 2"),
    (["moe-compare", "--calib-samples", "0"], "--calib-samples must be >= 1"),
    (["moe-compare", "--timing-rounds", "0"], "--timing-rounds must be >= 1"),
    (["eval", "--tasks", "wikitext2", "--max-length", "1"], "--max-length must be >= 2"),
])
def test_bad_numbers_are_refused_before_loading(tmp_path, no_loading, argv, match):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    _one_line_exit([*argv, "--model", "stories260k"], match)
    assert not list(tmp_path.iterdir())


def test_calibration_longer_than_the_context_is_refused(tmp_path):
    # stories260k has 512 positions
    _one_line_exit(["compare", "--model", "stories260k", "--methods", "fp,gptq", "--calib-seq-len", "1024"],
                   "--calib-seq-len 1024 exceeds the model's max_position_embeddings 512")
    _one_line_exit(["quantize", "--model", "stories260k", "--method", "gptq", "--calib-seq-len", "600",
                    "--out", str(tmp_path / "q")], "--calib-seq-len 600 exceeds")
    _one_line_exit(["compare", "--model", "stories260k", "--methods", "fp", "--seq-len", "513"], "--seq-len 513 exceeds")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [
    ["compare", "--model", "stories260k"], ["moe-compare"], ["merge", "MISSING"], ["eval", "--tasks", "wikitext2"],
])
def test_unwritable_json_is_refused_before_the_run(tmp_path, no_loading, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")  # chmod does not stop root: a path under a file is unwritable for everyone
    command = [str(tmp_path / "missing.json") if a == "MISSING" else a for a in command]
    message = _one_line_exit([*command, "--json", str(a_file / "sub" / "out.json")], "cannot write --json")
    assert f"{a_file} is not a folder" in message
    _one_line_exit([*command, "--json", str(tmp_path)], "it is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_quantize_refuses_an_unwritable_out_folder(tmp_path, no_loading):
    (tmp_path / "a_file").write_text("")
    _one_line_exit(["quantize", "--model", "stories260k", "--method", "rtn", "--out", str(tmp_path / "a_file" / "q")],
                   "cannot write --out")


def test_eval_without_lm_eval_names_the_extra(monkeypatch, no_loading):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    message = _one_line_exit(["eval", "--model", "stories260k", "--tasks", "wikitext2", "--limit", "2"], "needs lm-eval")
    assert "pip install 'torchao-mx-ext[eval]'" in message


def test_setup_installs_the_eval_extra_by_default():
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[1] / "scripts" / "setup.sh").read_text()
    default_extras = next(line for line in setup.splitlines() if line.startswith("extras="))
    assert "eval" in default_extras.split("=", 1)[1].strip('"').split(",")


def test_library_input_errors_become_one_line_exits(tmp_path):
    _one_line_exit(["compare", "--model", "stories260k", "--methods", "gptq", "--calib-source", str(tmp_path / "x.txt")],
                   "calibration file not found")
    _one_line_exit(["quantize", "--model", "stories260k", "--method", "gptq", "--calib-source",
                    str(tmp_path / "wiki.test.txt"), "--out", str(tmp_path / "q")], "refusing to calibrate on an evaluation split")
    _one_line_exit(["compare", "--model", "stories260k", "--methods", "fp", "--data-dir", str(tmp_path)],
                   "WikiText-2 test rows not found")
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    _one_line_exit(["compare", "--model", "stories260k", "--methods", "fp,gptq", "--calib-source", str(short),
                    "--calib-seq-len", "64"], "too short for one calibration window")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_programming_errors_keep_their_traceback(monkeypatch):
    import torchao_mx_ext.eval as tme_eval

    def bug(*args, **kwargs):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(tme_eval, "perplexity", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["compare", "--model", "stories260k", "--methods", "fp", "--eval-windows", "1", "--quiet"])


def test_known_third_party_noise_is_filtered_and_nothing_else(caplog):
    cli.quiet_known_noise()
    cli.quiet_known_noise()  # idempotent
    torchao_log, pytree_log = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    assert sum(isinstance(f, cli._DropMatching) for f in torchao_log.filters) == 1
    with caplog.at_level(logging.WARNING):
        torchao_log.warning("Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
                            "Could not load this library")
        pytree_log.warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque "
                           "value type. Calling register_constant() on Enum subclasses is deprecated", "<enum 'X'>")
        torchao_log.warning("Failed to load config from x.json")  # not the native-library line: kept
        pytree_log.warning("some other pytree warning")
    assert [r.getMessage() for r in caplog.records] == ["Failed to load config from x.json", "some other pytree warning"]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("compare", "quantize", "merge", "moe-compare", "eval"):
        assert command in out


# ---- export -----------------------------------------------------------------------------------------

def _tiny_llama_folder(folder):
    """A 1-layer Llama (widths multiples of 32, so every linear exports) with stories260k's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchao_mx_ext.zoo import model_path

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    source = model_path("stories260k")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder)
    return str(folder)


@pytest.mark.parametrize("argv, match", [
    (["--format", "gguf", "--method", "block-rot", "--weight-only"], r"gguf cannot express method 'block-rot'.*rtn, gptq, gptaq"),
    (["--format", "gguf", "--method", "rtn"], r"GGUF holds weights only.*--weight-only"),
    (["--format", "compressed-tensors", "--method", "global-rot"], r"cannot express method 'global-rot'"),
])
def test_export_refuses_what_the_format_cannot_express_before_loading(tmp_path, no_loading, argv, match):
    _one_line_exit(["export", "--model", "stories260k", "--out", str(tmp_path / "out"), *argv], match)


def test_export_writes_a_compressed_tensors_folder_and_a_gguf_file(tmp_path, capsys):
    from safetensors import safe_open

    model = _tiny_llama_folder(tmp_path / "tiny")
    folder, gguf_file = tmp_path / "ct", tmp_path / "model.gguf"
    assert main(["export", "--model", model, "--method", "block-rot", "--format", "compressed-tensors", "--out", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mxfp4-pack-quantized" and "transform_config" in config
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.up_proj.weight_packed" in f.keys()
    assert main(["export", "--model", model, "--method", "rtn", "--format", "gguf", "--weight-only", "--out", str(gguf_file)]) == 0
    import gguf

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(gguf_file)).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.MXFP4
    _one_line_exit(["export", "--model", model, "--method", "rtn", "--format", "gguf", "--weight-only", "--out", str(gguf_file)],
                   "exists; pass --overwrite")


def test_export_of_the_default_recipe(tmp_path):
    """The default recipe (recipes.DEFAULT_METHOD: smoothing, then GPTAQ on the block Hadamard) exports to
    compressed-tensors: the same format as any per-linear block Hadamard, with the smoothed norms."""
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    from torchao_mx_ext.recipes import DEFAULT_METHOD

    model = _tiny_llama_folder(tmp_path / "tiny")
    folder = tmp_path / "ct"
    assert main(["export", "--model", model, "--method", DEFAULT_METHOD, "--format", "compressed-tensors",
                 "--calib-source", "tinystories", "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mxfp4-pack-quantized" and "transform_config" in config
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        norm = f.get_tensor("model.layers.0.post_attention_layernorm.weight")
    assert packed.dtype == torch.uint8 and packed.shape == (64, 64)  # [out, in / 2]
    original = LlamaForCausalLM.from_pretrained(model).model.layers[0].post_attention_layernorm.weight
    assert not torch.allclose(norm.float(), original.float())  # the smoothing scales travel with the export
