import json

import pytest

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


def test_compare_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        main(["compare", "--model", "stories260k", "--methods", "rtn,awq"])
    with pytest.raises(SystemExit, match="unknown scale rule"):
        main(["compare", "--model", "stories260k", "--scale-rule", "ceil"])
    with pytest.raises(FileNotFoundError, match="neither a known alias"):
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
