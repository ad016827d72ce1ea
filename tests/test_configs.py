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

    configs._REPORTED_PADDING.clear()
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
