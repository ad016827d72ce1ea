"""MoE router passes (PESF, Ban, Pick) survive save_pretrained -> from_pretrained through our HF method.

Their values live in non-persistent buffers, so the save records them in
``quantization_config.router_passes`` and the load re-installs them after the weights.
"""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import torchao_mx_ext as tme
from torchao_mx_ext.hf import MXFP4HfConfig, save_pretrained
from torchao_mx_ext.moe import (
    BanConfig,
    BanPickConfig,
    PESFConfig,
    PickConfig,
    apply_router_pass,
    remove_router_passes,
    set_router_pass_buffer,
)
from torchao_mx_ext.moe.router_configs import router_pass_settings
from torchao_mx_ext.moe.router_pass import installed_passes
from torchao_mx_ext.recipes import quantize_linears

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = tme.MXFP4BlockRotConfig()
TOKENS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
ROUTER0 = "model.layers.0.mlp.gate"
ROUTER1 = "model.layers.1.mlp.gate"

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tiny(arch: str) -> torch.nn.Module:
    """A random tiny MoE (8 experts), router logits spread like a trained router's, quantized with
    ``quantize_linears`` (linears but lm_head, and the fused experts)."""
    torch.manual_seed(0)
    if arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**_COMMON, num_key_value_heads=2, intermediate_size=96,
                                          moe_intermediate_size=32, num_experts=8, num_experts_per_tok=4,
                                          shared_expert_intermediate_size=64)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    elif arch == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(**_COMMON, num_key_value_heads=4, intermediate_size=96,
                                            moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=4,
                                            n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None,
                                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                                            first_k_dense_replace=0, n_group=4, topk_group=2,
                                            routed_scaling_factor=2.5, norm_topk_prob=True)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.2)
            if arch == "deepseek_v3":
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return quantize_linears(model, CONFIG)


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def pass_state(model):
    """Per module: installed passes, added buffers (name -> (dtype, values)), sentinel flag of experts."""
    state = {}
    for fqn, m in model.named_modules():
        passes = installed_passes(m)
        if passes:
            added = type(m)._router_pass_buffers
            state[fqn] = (passes, {n: (m._buffers[n].dtype, m._buffers[n].tolist()) for n in added})
        if hasattr(m, "_is_expert_parallel"):
            state[fqn + ":sentinel"] = bool(m._is_expert_parallel)
    return state


def saved_config(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def assert_round_trip(model, folder):
    """Save, reload: same logits bit for bit, same passes and buffers; a second save writes the same config."""
    out = save_pretrained(model, folder / "q")
    assert saved_config(out)["router_passes"] == router_pass_settings(model)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded), logits(model))
    assert pass_state(reloaded) == pass_state(model)
    again = save_pretrained(reloaded, folder / "again")
    assert saved_config(again) == saved_config(out)
    return out, reloaded


@pytest.fixture(scope="module")
def pick_ban(tmp_path_factory):
    """Qwen2-MoE with Pick then Ban, one value changed afterwards; saved and reloaded."""
    model = tiny("qwen2_moe")
    plain = logits(model)
    apply_router_pass(model, PickConfig(experts=[1, 5], boost=1.0))
    apply_router_pass(model, BanConfig(tau=0.6, k_min=1, protected=[2]))
    set_router_pass_buffer(model, "ban_tau", {ROUTER1: 0.5})
    # Changing the picks after Ban leaves ban_protected as it was: the saved buffers must say so.
    set_router_pass_buffer(model, "pick_mask", {ROUTER0: [i == 3 for i in range(8)]})
    assert not torch.equal(logits(model), plain)  # the passes do something
    out, reloaded = assert_round_trip(model, tmp_path_factory.mktemp("pick_ban"))
    return model, plain, out, reloaded


def test_pick_then_ban_round_trip(pick_ban):
    model, _, out, reloaded = pick_ban
    passes = saved_config(out)["router_passes"]
    assert passes[ROUTER0] == [
        {"pass": "pick", "experts": [3], "boost": 1.0},
        {"pass": "ban", "tau": pytest.approx(0.6), "k_min": 1, "protected": [1, 2, 5]},
    ]
    assert passes[ROUTER1][1]["tau"] == 0.5 and passes[ROUTER1][0]["experts"] == [1, 5]
    gate = reloaded.model.layers[0].mlp.gate
    assert installed_passes(gate) == ("pick", "ban") and isinstance(gate, transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter)
    assert float(reloaded.model.layers[1].mlp.gate.ban_tau) == 0.5
    assert reloaded.config.quantization_config == MXFP4HfConfig.from_dict(saved_config(out))


def test_changed_buffer_after_reload_round_trips(pick_ban, tmp_path):
    _, _, _, reloaded = pick_ban
    set_router_pass_buffer(reloaded, "pick_boost", 2.5)
    set_router_pass_buffer(reloaded, "ban_k_min", {ROUTER0: 2})
    out = save_pretrained(reloaded, tmp_path / "changed")
    passes = saved_config(out)["router_passes"]
    assert [p[0]["boost"] for p in passes.values()] == [2.5, 2.5] and passes[ROUTER0][1]["k_min"] == 2
    again = AutoModelForCausalLM.from_pretrained(out)
    assert pass_state(again) == pass_state(reloaded)
    assert torch.equal(logits(again), logits(reloaded))


def test_removing_passes_after_reload(pick_ban, tmp_path):
    _, plain, _, _ = pick_ban
    reloaded = AutoModelForCausalLM.from_pretrained(pick_ban[2])
    assert remove_router_passes(reloaded) == 2
    assert pass_state(reloaded) == pass_state(tiny("qwen2_moe"))
    assert torch.equal(logits(reloaded), plain)
    out = save_pretrained(reloaded, tmp_path / "none")
    assert "router_passes" not in saved_config(out)  # no passes: config.json as before
    assert pass_state(AutoModelForCausalLM.from_pretrained(out)) == pass_state(reloaded)


def test_pesf_round_trip_rewires_the_blocks(tmp_path):
    model = tiny("qwen2_moe")
    plain = logits(model)
    apply_router_pass(model, PESFConfig(alpha=0.7))
    assert not torch.equal(logits(model), plain)
    set_router_pass_buffer(model, "pesf_alpha", {ROUTER0: 0.9})
    _, reloaded = assert_round_trip(model, tmp_path)
    block = reloaded.model.layers[0].mlp
    assert installed_passes(block) == ("gate_sees_sequences",) and installed_passes(block.gate) == ("pesf",)
    assert float(block.gate.pesf_alpha) == pytest.approx(0.9)
    # sequences matter for PESF: a batch of two must give what each row gives alone
    tokens = torch.cat([TOKENS, TOKENS.flip(1)])
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))


def test_deepseek_v3_per_layer_ban_pick_round_trip(tmp_path):
    model = tiny("deepseek_v3")
    plain = logits(model)
    config = BanPickConfig(k_min=1, layer_taus={ROUTER0: 0.5, ROUTER1: 0.8}, layer_picks={ROUTER0: [2], ROUTER1: []},
                           layer_boosts={ROUTER0: 0.7, ROUTER1: 0.0})
    apply_router_pass(model, config)
    apply_router_pass(model, PESFConfig(alpha=0.5))
    assert not torch.equal(logits(model), plain)
    _, reloaded = assert_round_trip(model, tmp_path)
    assert installed_passes(reloaded.model.layers[0].mlp.gate) == ("pick", "ban", "pesf")


def test_config_fields_round_trip():
    passes = {ROUTER0: [{"pass": "pesf", "alpha": 0.3}, {"pass": "ban", "tau": 0.8, "k_min": 1, "protected": (1,)}]}
    config = MXFP4HfConfig(CONFIG, router_passes=passes)
    data = config.to_dict()
    assert data["router_passes"][ROUTER0][1]["protected"] == [1]
    assert MXFP4HfConfig.from_dict(json.loads(json.dumps(data))) == config
    assert config != MXFP4HfConfig(CONFIG)
    assert "router_passes" not in MXFP4HfConfig(CONFIG).to_dict()
    assert MXFP4HfConfig(CONFIG, router_passes={}) == MXFP4HfConfig(CONFIG)


@pytest.mark.parametrize("passes, match", [
    ({ROUTER0: [{"pass": "quantum", "alpha": 1.0}]}, "unknown pass 'quantum'"),
    ({ROUTER0: [{"pass": "pesf"}]}, "needs the values"),
    ({ROUTER0: [{"pass": "pesf", "alpha": 0.3}, {"pass": "pesf", "alpha": 0.3}]}, "listed twice"),
    ({ROUTER0: [{"pass": "ban", "tau": 0.8, "k_min": 1.5, "protected": []}]}, "invalid value"),
])
def test_malformed_router_passes_are_refused(passes, match):
    with pytest.raises(ValueError, match=match):
        MXFP4HfConfig(CONFIG, router_passes=passes)


def _edit_router_passes(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"]["router_passes"])
    path.write_text(json.dumps(config))


def test_unknown_pass_or_router_in_checkpoint_is_a_clear_error(pick_ban, tmp_path):
    import shutil

    for edit, match in (
        (lambda p: p[ROUTER0].append({"pass": "turbo"}), "unknown pass 'turbo'"),
        (lambda p: p.update({"model.layers.7.mlp.gate": p[ROUTER0]}), "name no MoE router"),
        (lambda p: p.update({"model.layers.0.self_attn": p[ROUTER0]}), "name no MoE router"),
    ):
        folder = tmp_path / "edited"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pick_ban[2], folder)
        _edit_router_passes(folder, edit)
        with pytest.raises(ValueError, match=match):
            AutoModelForCausalLM.from_pretrained(folder)
