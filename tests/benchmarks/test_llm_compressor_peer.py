"""benchmarks/llm_compressor_peer.py without its llm-compressor venv: argument errors, the report it
writes (accepted by ``torchao-mx merge`` beside our rows), the message for a missing venv, the
progress parser for a GPTQ run stopped at its time limit, and its reference MXFP4 quantizer."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import llm_compressor_peer as peer  # noqa: E402

from torchao_mx_ext.cli import format_table, merge_reports  # noqa: E402

VERSIONS = {"torch": "2.13.0+cpu", "transformers": "5.17.0", "llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0"}


@pytest.mark.parametrize("argv, message", [
    (["--methods", "awq"], "--methods must be distinct names"),
    (["--methods", "rtn,rtn"], "--methods must be distinct names"),
    (["--methods", ","], "--methods must be distinct names"),
    (["--eval-windows", "0"], "--eval-windows must be >= 1"),
    (["--calib-samples", "0"], "--calib-samples must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--time-limit-min", "0"], "--time-limit-min must be > 0"),
    (["--setup", "--no-setup"], "contradict"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        peer.main(argv)


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="is not a folder"):
        peer.main(["--out-dir", str(blocker), "--no-setup"])


def test_missing_venv_without_setup_says_how_to_create_it(tmp_path):
    venv = tmp_path / "venv"
    with pytest.raises(SystemExit) as e:
        peer.main(["--methods", "rtn", "--venv", str(venv), "--no-setup", "--out-dir", str(tmp_path)])
    text = str(e.value)
    assert f"the llm-compressor venv {venv} is missing" in text and "--setup" in text and "llmcompressor==0.14.0.1" in text
    assert not venv.exists() and not list(tmp_path.glob("*.json"))
    # a venv whose setup did not finish (no marker) is not used either
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    with pytest.raises(SystemExit, match="is unfinished"):
        peer.require_venv(venv, setup_allowed=False)
    (venv / peer.MARKER).write_text(json.dumps({"pins": ["torch==2.12.0"], "versions": {}}))
    with pytest.raises(SystemExit, match="other pins"):
        peer.require_venv(venv, setup_allowed=False)
    (venv / peer.MARKER).write_text(json.dumps({"pins": [peer.TORCH_PIN, *peer.PINS], "versions": VERSIONS}))
    assert peer.require_venv(venv, setup_allowed=False) == VERSIONS


def _child_result(**extra):
    return {"ppl": 42.0, "nll": 3.74, "windows": 16, "wall_s": 300.0, "quantize_s": 3.0, "eval_s": 297.0,
            "peak_mem_mb": 1900.0, "threads": 2, "versions": VERSIONS, **extra}


def test_report_shape_and_merge_with_our_rows(tmp_path):
    reports = {}
    for method in ("fp", "rtn", "gptq"):
        report = peer.build_report(method, _child_result(checks={"quantized_linears": 210}), 16, 32, VERSIONS)
        path = peer.default_json_path(method, tmp_path)
        peer.write_report(path, report)
        assert path.name == f"compare_smollm2_llmcompressor-{method}.json"
        reports[method] = json.loads(path.read_text())
    rtn = reports["rtn"]
    assert rtn["model"] == "smollm2-135m" and "complete" not in rtn
    entry = rtn["methods"]["llmcompressor-rtn"]
    for key in ("ppl", "wall_s", "quantize_s", "peak_mem_mb", "method", "scale_rule", "windows"):
        assert key in entry
    assert entry["method"] == "llmcompressor-rtn" and entry["scale_rule"] == "even" and entry["ppl"] == 42.0
    assert entry["tool"] == "llmcompressor 0.14.0.1" and entry["versions"] == VERSIONS and entry["checks"]
    assert "MXFP4" in entry["recipe"] and "lm_head" in entry["recipe"]
    assert reports["fp"]["methods"]["llmcompressor-fp"]["scale_rule"] is None
    assert rtn["settings"]["calibration"] is None
    assert reports["gptq"]["settings"]["calibration"] == {"source": "wikitext2", "samples": 32, "seq_len": 2048, "seed": 0}

    # what `torchao-mx compare` writes for the same protocol (the settings keys must match for merge)
    ours_fp = {"model": "smollm2-135m", "settings": dict(rtn["settings"], calibration=None),
               "methods": {"fp": {"ppl": 20.7135, "wall_s": 89.0, "peak_mem_mb": 2436.0, "method": "fp",
                                  "scale_rule": None, "windows": 16}}}
    ours_gptq = {"model": "smollm2-135m", "settings": dict(reports["gptq"]["settings"]),
                 "methods": {"gptq": dict(ours_fp["methods"]["fp"], method="gptq", scale_rule="mse", quantize_s=1.0)}}
    committed = ROOT / "results" / "full" / "compare_smollm2_fp.json"
    if committed.is_file():  # the real row, where the checkout has it
        ours_fp = json.loads(committed.read_text())
    merged = merge_reports([ours_fp, ours_gptq, *reports.values()])
    assert list(merged["methods"])[-3:] == ["llmcompressor-fp", "llmcompressor-rtn", "llmcompressor-gptq"]
    assert "llmcompressor-rtn" in format_table(merged)


def test_timed_out_report_has_no_ppl_and_is_refused_by_merge(tmp_path):
    progress = peer.Progress()
    for line in [
        'PEER {"phase": "quantize"}',
        "(1/31): Calibrating: 100%|##########| 32/32 [00:10<00:00]",
        "2026-12-05T09:10:27.5680 | compress_module_list | INFO - Quantizing 1 module(s): ['model.layers.0.mlp.up_proj']",
        "2026-12-05T09:10:27.5680 | compress_module_list | INFO - Quantizing 3 module(s): ['model.layers.0.self_attn.q_proj', "
        "'model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj']",
        "(1/31): Propagating:  50%|#####     | 16/32",
        "(1/31): Propagating: 100%|##########| 32/32",
        "(2/31): Calibrating:  10%|#         | 3/32",
    ]:
        progress.feed(line)
    summary = progress.summary()
    assert summary == {
        "phase": "quantize", "subgraphs_total": 31, "subgraphs_done": 1, "last_progress": "(2/31): Calibrating",
        "modules_gptq_quantized": 4,
        "last_modules": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        "eval_windows_done": 0,
    }
    timeout = {"time_limit_s": 60.0, "elapsed_s": 61.0, "progress": summary, "log": "gptq.log"}
    report = peer.build_report("gptq", {"threads": 2}, 16, 32, VERSIONS, timeout=timeout)
    path = tmp_path / "gptq.json"
    peer.write_report(path, report)
    report = json.loads(path.read_text())
    entry = report["methods"]["llmcompressor-gptq"]
    assert report["complete"] is False and entry["ppl"] is None and entry["timed_out"]["time_limit_s"] == 60.0
    with pytest.raises(ValueError, match="unfinished"):
        merge_reports([report])


def test_reference_quantizer_is_our_even_rule():
    """The child checks llm-compressor's Linear against ``_reference_mxfp4``: its scales are the
    ``even`` rule of torchao_mx_ext.mx, and its elements lie on the E2M1 grid (ties to even)."""
    from torchao_mx_ext.mx import shared_exponent

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 32, generator=gen) * torch.exp2(torch.randint(-8, 8, (64, 4, 1), generator=gen).float())
    x[0, 0, 0] = 1.75 * x[0, 0].abs().max()  # a block maximum right on the rounding threshold
    xq, scale = peer._reference_mxfp4(x.reshape(64, 128))
    expected = torch.exp2(shared_exponent(x.abs().amax(-1), "even").float())
    assert torch.equal(scale, expected)
    codes = (xq.reshape(64, 4, 32) / scale.unsqueeze(-1)).abs()
    assert set(codes.unique().tolist()) <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    halves = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] + [0.0] * 24])
    q, s = peer._reference_mxfp4(halves, torch.ones(1, 1))
    assert q[0, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0] and s.item() == 1.0
