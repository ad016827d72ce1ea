import logging

import pytest
import torch
from torchao.core.config import config_from_dict, config_to_dict
from torchao.quantization import FqnToConfig, quantize_
from transformers import LlamaConfig, LlamaForCausalLM

import torchao_mx_ext as tme
from torchao_mx_ext import RotatedMXFP4Tensor


def _tiny_llama(intermediate=172):
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("config", [tme.MXFP4Config(), tme.MXFP4BlockRotConfig(), tme.MXFP4BlockRotConfig(rotation_size=None)])
def test_quantize_hf_llama_every_linear(config, caplog):
    from torchao_mx_ext import configs

    configs.reset_padding_reports()
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    with caplog.at_level(logging.WARNING):
        quantize_(model, config)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.weight, RotatedMXFP4Tensor) for m in linears)
    assert "input width 172" in caplog.text  # down_proj is padded, and says so
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == ref.shape and bool(out.isfinite().all())
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.5


def test_fqn_to_config_picks_layers():
    model = _tiny_llama(intermediate=128)
    cfg = FqnToConfig({
        r"re:model\.layers\.0\.self_attn\..*_proj": tme.MXFP4BlockRotConfig(),
        "model.layers.1.mlp.down_proj": tme.MXFP4Config(act_quant=False),
    })
    quantize_(model, cfg, filter_fn=None)
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, RotatedMXFP4Tensor)
    assert model.model.layers[0].self_attn.q_proj.weight.rotation is not None
    down = model.model.layers[1].mlp.down_proj.weight
    assert isinstance(down, RotatedMXFP4Tensor) and down.act_scale_rule is None and down.rotation is None
    assert not isinstance(model.model.layers[0].mlp.up_proj.weight, RotatedMXFP4Tensor)
    assert not isinstance(model.lm_head.weight, RotatedMXFP4Tensor)


def test_fqn_to_config_by_parameter_name():
    # torchao passes parameter_name to the handler for keys naming a parameter ("0.weight").
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    reference = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    reference.load_state_dict(model.state_dict())
    quantize_(model, FqnToConfig({"0.weight": tme.MXFP4BlockRotConfig()}), filter_fn=None)
    quantize_(reference, tme.MXFP4BlockRotConfig(), filter_fn=lambda m, fqn: fqn == "0")
    assert isinstance(model[0].weight, RotatedMXFP4Tensor) and type(model[1].weight) is torch.nn.Parameter
    assert torch.equal(model[0].weight.qdata, reference[0].weight.qdata)
    assert torch.equal(model[0].weight.scale, reference[0].weight.scale)


@pytest.mark.parametrize(
    "config",
    [tme.MXFP4Config(scale_rule="floor", act_quant=False), tme.MXFP4BlockRotConfig(rotation="random_hadamard", rotation_size=None, seed=7)],
)
def test_configs_round_trip_through_torchao_serialisation(config):
    data = config_to_dict(config)
    assert data["_type"] == type(config).__name__
    assert config_from_dict(data) == config


def test_defaults_match_the_public_api():
    cfg = tme.MXFP4BlockRotConfig()
    assert (cfg.block_size, cfg.rotation, cfg.rotation_size, cfg.act_quant) == (32, "hadamard", 32, True)
    assert cfg.scale_rule == tme.DEFAULT_SCALE_RULE and tme.MXFP4Config().rotation == "identity"
    assert tme.MXFP4Config(act_quant=False).activation_scale_rule is None
    assert tme.MXFP4Config(scale_rule="floor", act_scale_rule="even").activation_scale_rule == "even"


# -- bad values and failures: refused up front, nothing changed ----------------------------------

@pytest.mark.parametrize("kwargs, error, field", [
    ({"act_quant": "no"}, TypeError, "act_quant"),
    ({"act_quant": 1}, TypeError, "act_quant"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"block_size": True}, ValueError, "block_size"),
    ({"rotation_size": False}, ValueError, "rotation_size"),
    ({"rotation_size": 0}, ValueError, "rotation_size"),
    ({"scale_rule": "round"}, ValueError, "scale rule"),
])
def test_config_refuses_bad_values_naming_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        tme.MXFP4Config(**kwargs)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_quantize_with_a_bad_weight_in_a_late_layer_changes_nothing_and_a_retry_works():
    model = _tiny_llama(intermediate=96)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.weight has 1 NaN.*changed nothing"):
        quantize_(model, tme.MXFP4BlockRotConfig())
    after = model.state_dict()
    assert all(
        type(after[k]) is torch.Tensor and torch.allclose(after[k], v, rtol=0, atol=0, equal_nan=True)
        for k, v in before.items()
    )
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = 0.0
    quantize_(model, tme.MXFP4BlockRotConfig())
    assert all(isinstance(m.weight, RotatedMXFP4Tensor) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_quantize_twice_names_every_quantized_layer_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    quantize_(model, tme.MXFP4Config(), filter_fn=lambda m, fqn: fqn == "1")
    before = _state(model)
    with pytest.raises(TypeError, match=r"1\.weight is already MXFP4-quantized.*changed nothing"):
        quantize_(model, tme.MXFP4Config())
    assert type(model[0].weight) is torch.nn.Parameter and torch.equal(model[0].weight, before["0.weight"])


def test_padding_cost_is_warned_with_its_factor(caplog):
    from torchao_mx_ext import configs

    configs.reset_padding_reports()
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    with caplog.at_level(logging.WARNING):
        quantize_(model, tme.MXFP4BlockRotConfig(rotation_size=100))
    assert "width 64" in caplog.text and "to 800" in caplog.text and "12.50x" in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert model[0].weight.padded_in_features == 800
