"""Inference-time options: the weight-only int8 or MXFP4 output head (``quantize_output_head``)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torchao_mx_ext as tme
from torchao_mx_ext.hf import save_pretrained
from torchao_mx_ext.inference import Int8WeightOnlyLinear
from torchao_mx_ext.recipes import quantize_linears

from reference import ref_fake_quantize, ref_hadamard

VOCAB, HIDDEN = 96, 64
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def final_hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return model.model(TOKENS).last_hidden_state


def ref_int8(weight: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 round trip in float64: s = max|w| / 127, round half to even."""
    w = weight.detach().to(torch.float64)
    s = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / s).clamp(-127, 127) * s


@pytest.mark.parametrize("tied", [True, False])
def test_int8_head_logits_equal_float64_reference(tied):
    model = tiny_llama(tied)
    weight = model.lm_head.weight.detach().clone()
    embedding = model.model.embed_tokens.weight.detach().clone()
    tme.quantize_output_head(model)  # int8 by default

    head = model.lm_head
    assert isinstance(head, Int8WeightOnlyLinear) and model.get_output_embeddings() is head
    assert head.qweight.dtype == torch.int8 and int(head.qweight.abs().max()) == 127
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.config.tie_word_embeddings is False
    h = final_hidden(model).to(torch.float64)
    with torch.no_grad():
        got = model(TOKENS).logits.to(torch.float64)
    torch.testing.assert_close(got, h @ ref_int8(weight).T, rtol=1e-5, atol=1e-5)
    # The int8 error bound: each element moves by at most max|W_n| / 254.
    deq = head.qweight.to(torch.float64) * head.scales.to(torch.float64)[:, None]
    bound = weight.abs().amax(dim=1, keepdim=True).to(torch.float64) / 254
    assert bool(((deq - weight.to(torch.float64)).abs() <= bound * (1 + 1e-6)).all())


def test_int8_head_bf16_and_compiled():
    model = tiny_llama(True).to(torch.bfloat16)
    tme.quantize_output_head(model)
    assert model.lm_head.scales.dtype == torch.bfloat16
    h = final_hidden(model)
    expected = model.lm_head.qweight.to(torch.float64) * model.lm_head.scales.to(torch.float64)[:, None]
    with torch.no_grad():
        eager = model.lm_head(h)
        compiled = torch.compile(model.lm_head, fullgraph=True)(h)
    assert eager.dtype == torch.bfloat16
    # bf16 output: within a bf16 rounding of the float64 product; compiled equals eager.
    torch.testing.assert_close(eager.to(torch.float64), h.to(torch.float64) @ expected.T, rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_int8_head_with_bias_and_zero_row():
    linear = torch.nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[2] = 0
    head = Int8WeightOnlyLinear.from_linear(linear)
    x = torch.randn(3, 5, 64)
    w = ref_int8(linear.weight)
    w[2] = 0
    expected = x.to(torch.float64) @ w.T + linear.bias.to(torch.float64)
    torch.testing.assert_close(head(x).to(torch.float64), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_mxfp4_head_logits_equal_float64_reference(tied):
    model = tiny_llama(tied)
    weight = model.lm_head.weight.detach().clone()
    embedding = model.model.embed_tokens.weight.detach().clone()
    tme.quantize_output_head(model, tme.MXFP4Config(act_quant=False))

    assert isinstance(model.lm_head.weight, tme.RotatedMXFP4Tensor)
    # The embedding keeps its high-precision table; the head no longer shares it.
    assert model.model.embed_tokens.weight is not model.lm_head.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.config.tie_word_embeddings is False
    # logits = h Q(W)^T, with Q the float64 MXFP4 reference of the default (mse) rule, RTN.
    h = final_hidden(model).to(torch.float64)
    expected = h @ ref_fake_quantize(weight, "mse").T
    with torch.no_grad():
        got = model(TOKENS).logits.to(torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # A real change: the quantized head is not the original one.
    assert (got - h @ weight.to(torch.float64).T).abs().max() > 1e-3


def test_block_rotated_head_matches_reference():
    model = tiny_llama(True)
    weight = model.lm_head.weight.detach().to(torch.float64)
    tme.quantize_output_head(model, tme.MXFP4BlockRotConfig(act_quant=False))
    r = torch.block_diag(*[ref_hadamard(32)] * (HIDDEN // 32))
    h = final_hidden(model).to(torch.float64)
    expected = (h @ r) @ ref_fake_quantize(weight @ r, "mse").T  # y = (x R) Q(W R)^T
    with torch.no_grad():
        got = model(TOKENS).logits.to(torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_head_after_recipe_leaves_the_rest_alone():
    model = tiny_llama(True)
    quantize_linears(model, tme.MXFP4BlockRotConfig())
    body = {n: p for n, p in model.named_parameters() if "lm_head" not in n}
    tme.quantize_output_head(model, tme.MXFP4Config(act_quant=False))
    assert all(p is body[n] for n, p in model.named_parameters() if n in body)
    assert model.lm_head.weight.act_scale_rule is None  # weight-only, whatever the body is
    assert model.model.layers[0].mlp.up_proj.weight.act_scale_rule == "mse"


@pytest.mark.parametrize(
    "config, error",
    [
        (tme.MXFP4Config(), "act_quant=False"),
        ("mxfp4", "'int8' or an MXFP4Config"),
    ],
)
def test_bad_config_is_refused_and_model_unchanged(config, error):
    model = tiny_llama(True)
    with pytest.raises((ValueError, TypeError), match=error):
        tme.quantize_output_head(model, config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is True


@pytest.mark.parametrize("first", ["int8", tme.MXFP4Config(act_quant=False)])
def test_twice_is_refused(first):
    model = tme.quantize_output_head(tiny_llama(False), first)
    with pytest.raises(ValueError, match="already quantized"):
        tme.quantize_output_head(model)


def test_no_linear_head_is_refused():
    with pytest.raises(ValueError, match="no nn.Linear output head"):
        tme.quantize_output_head(torch.nn.Sequential(torch.nn.Linear(32, 32)))


@pytest.mark.parametrize("head", ["int8", tme.MXFP4Config(act_quant=False)])
def test_save_refuses_a_quantized_head(tmp_path, head):
    model = tiny_llama(False)
    quantize_linears(model, tme.MXFP4BlockRotConfig())
    tme.quantize_output_head(model, head)
    with pytest.raises(ValueError, match="output head in high precision"):
        save_pretrained(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("head", ["int8", tme.MXFP4Config(act_quant=False)])
def test_nan_head_is_refused_and_stays_tied(head):
    model = tiny_llama(True)
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tme.quantize_output_head(model, head)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is True
