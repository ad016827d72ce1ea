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
