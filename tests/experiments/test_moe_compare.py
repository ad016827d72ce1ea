"""``torchao-mx moe-compare`` end to end on a tiny Qwen2-MoE saved with a real tokenizer."""

import json

import pytest
import torch
from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

from torchao_mx_ext.cli import main
from torchao_mx_ext.zoo import shared_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_moe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_moe")
    tokenizer = AutoTokenizer.from_pretrained(shared_dir() / "models" / "stories260k")
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, qkv_bias=False, max_position_embeddings=256,
    )
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)  # a spread of router logits, as trained routers have
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_moe_compare_reports_every_method(tiny_moe_folder, tmp_path, capsys):
    out = tmp_path / "moe.json"
    assert main([
        "moe-compare", "--model", str(tiny_moe_folder), "--seq-len", "64", "--eval-windows", "2",
        "--calib-samples", "4", "--calib-seq-len", "32", "--prompt-len", "16", "--new-tokens", "4",
        "--timing-rounds", "2", "--quiet", "--json", str(out),
    ]) == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    methods = report["methods"]
    assert list(methods) == ["baseline", "pesf-0.3", "pesf-0.7", "ban", "pick", "ban+pick", "mxfp4", "mxfp4+qesc"]
    assert report["settings"]["lm_eval"] is None
    assert report["settings"]["num_experts"] == 8 and report["settings"]["top_k"] == 4
    assert report["settings"]["experts_implementation"] == "torchao_mx_ext" and report["settings"]["timing_rounds"] == 2
    base = methods["baseline"]
    assert base["active_experts"] == 4.0 and base["topk_agreement"] == 1.0
    assert base["prefill_speedup"] == 1.0 and base["decode_speedup"] == 1.0
    for name, r in methods.items():
        assert name in table
        assert r["ppl"] > 1 and r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0 and r["decode_speedup"] > 0
    # pruning passes route fewer experts, the aggressive PESF setting fewer than the safe one
    assert methods["pesf-0.7"]["active_experts"] <= methods["pesf-0.3"]["active_experts"] < 4.0
    assert methods["ban"]["active_experts"] < 4.0
    assert methods["pick"]["active_experts"] == 4.0  # Pick re-ranks, it does not prune
    # quantization leaves the routers untouched, so only changed inputs move the selection
    assert methods["mxfp4"]["topk_agreement"] < 1.0
    assert methods["mxfp4+qesc"]["qesc_calibration_agreement_after"] >= methods["mxfp4+qesc"]["qesc_calibration_agreement_before"]


def test_moe_compare_other_methods_and_lm_eval(tiny_moe_folder, tmp_path):
    """The PESF curve, the Ban&Pick rule alternatives, GPTQ for the experts and the deployed combination
    (MXFP4 + QESC + Ban&Pick calibrated on the quantized model), with an offline lm-eval task."""
    out = tmp_path / "moe.json"
    names = ["baseline", "pesf-0.1", "pesf-0.5", "pesf-0.9", "ban+pick", "ban+pick:frequency-picks",
             "ban+pick:uniform-tau", "mxfp4", "mxfp4-gptq", "mxfp4+qesc+ban+pick"]
    assert main([
        "moe-compare", "--model", str(tiny_moe_folder), "--seq-len", "64", "--eval-windows", "1",
        "--calib-samples", "4", "--calib-seq-len", "32", "--prompt-len", "8", "--new-tokens", "2",
        "--timing-rounds", "1", "--methods", ",".join(names), "--lm-eval-task", "arc_easy", "--lm-eval-limit", "4",
        "--quiet", "--json", str(out),
    ]) == 0
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert list(methods) == names
    assert report["settings"]["lm_eval"] == {"task": "arc_easy", "limit": 4}
    for r in methods.values():
        assert r["lm_eval"]["samples"] == 4 and 0 <= r["lm_eval"]["acc"] <= 1
    # PESF prunes more as alpha grows
    pesf = [methods[f"pesf-{a}"]["active_experts"] for a in (0.1, 0.5, 0.9)]
    assert pesf == sorted(pesf, reverse=True) and pesf[-1] < 4.0
    for name in ("ban+pick", "ban+pick:frequency-picks", "ban+pick:uniform-tau", "mxfp4+qesc+ban+pick"):
        assert methods[name]["active_experts"] < 4.0, name
    # GPTQ and RTN quantize the same modules: both move the routing off the fp model's
    assert methods["mxfp4-gptq"]["topk_agreement"] < 1.0 and methods["mxfp4-gptq"]["ppl"] != methods["mxfp4"]["ppl"]
    assert "qesc_calibration_agreement_after" in methods["mxfp4+qesc+ban+pick"]


def test_moe_compare_rejects_a_dense_model_and_unknown_methods():
    with pytest.raises(SystemExit, match="no MoE layer"):
        main(["moe-compare", "--model", "stories260k", "--methods", "baseline", "--quiet"])
    with pytest.raises(SystemExit, match="unknown MoE method"):
        main(["moe-compare", "--model", "stories260k", "--methods", "baseline,prune-all", "--quiet"])
