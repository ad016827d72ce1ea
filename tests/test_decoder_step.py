"""FusedDecodeStep (the one-call C++ decode step): the eager model is the reference. Its logits, its
greedy tokens and the keys / values it writes to the static cache match the eager model's step by step
(attention as PACKED_GQA_SDPA, whose float32 softmax the engine's kernel shares) for Llama, Qwen2 and
Qwen3 layers with dense, W4A4, weight-only, shared-input and int8/MXFP4-head linears; compile_model routes
batch-1 steps to it and everything else to the graph; what it does not take is refused with a reason."""

import copy

import pytest
import torch

import torchao_mx_ext as tme
from decoder_families import MODELS, randomise_biases, randomise_norms
from torchao_mx_ext.decoder_step import FusedDecodeStep, why_not
from torchao_mx_ext.eval.generation import greedy_generate, greedy_token, static_cache
from torchao_mx_ext.kernels import cpu_extension, cpu_mxfp4_quantize
from torchao_mx_ext.recipes import quantize_linears
from torchao_mx_ext.regional_compile import PACKED_GQA_SDPA, register_packed_gqa_sdpa

pytestmark = [
    pytest.mark.skipif(not cpu_extension.is_available(), reason="the C++ CPU kernels could not be built"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def small_model(family: str, setup: str, dtype=torch.bfloat16):
    if setup.startswith("w4a4") and not cpu_mxfp4_quantize.VECTORIZED:
        pytest.skip("a W4A4 input transform fuses into the GEMV (what the fused step runs) on AVX2 / AVX-512 CPUs only")
    torch.manual_seed(0)
    model = randomise_biases(randomise_norms(MODELS[family]())).to(dtype).eval()
    register_packed_gqa_sdpa()
    model.set_attn_implementation(PACKED_GQA_SDPA)
    if setup.startswith("w4a4"):
        quantize_linears(model, tme.MXFP4BlockRotConfig())
    elif setup.startswith("weight_only"):
        quantize_linears(model, tme.MXFP4BlockRotConfig(act_quant=False))
    if setup.endswith("_shared_int8_head"):
        assert tme.share_input_quantization(model) > 0
        tme.quantize_output_head(model, "int8")
    if setup.endswith("_mxfp4_head"):
        tme.quantize_output_head(model, tme.MXFP4Config(act_quant=False))
    if setup.endswith("_cached"):  # one-row linears read the codes also with a dense cache
        tme.cache_dequantized_weights(model)
    return model


def relative_error(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    "setup", ["dense", "w4a4", "weight_only", "w4a4_shared_int8_head", "weight_only_mxfp4_head", "w4a4_cached", "weight_only_cached"]
)
def test_steps_match_the_eager_model(family, setup):
    model = small_model(family, setup)
    assert why_not(model) is None
    step = FusedDecodeStep(model)
    prompt = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        eager_cache, fused_cache = static_cache(model, 24), static_cache(model, 24)
        token = greedy_token(model(prompt, cache=eager_cache, use_cache=True, logits_to_keep=1).logits)
        model(prompt, cache=fused_cache, use_cache=True, logits_to_keep=1)
        for _ in range(10):
            assert step.accepts(token, fused_cache, {"use_cache": True, "logits_to_keep": 1})
            expected = model(token, cache=eager_cache, use_cache=True, logits_to_keep=1).logits
            out = step(token, fused_cache)
            assert out.logits.shape == expected.shape == (1, 1, model.config.vocab_size) and out.logits.dtype == torch.bfloat16
            # Same kernels for linears and attention; elsewhere eager's bf16 roundings with float32 sums in
            # another order and another exp: a bf16 step at most, in a few elements.
            assert relative_error(out.logits, expected) < 2e-2
            assert torch.equal(greedy_token(out.logits), greedy_token(expected))
            token = greedy_token(expected)
    assert int(fused_cache.layers[0].cumulative_length) == int(eager_cache.layers[0].cumulative_length) == 19
    for a, b in zip(fused_cache.layers, eager_cache.layers):
        assert relative_error(a.keys, b.keys) < 2e-2 and relative_error(a.values, b.values) < 2e-2


def test_float32_model_matches_to_float32_rounding():
    model = small_model("llama", "w4a4", torch.float32)
    step = FusedDecodeStep(model)
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        eager_cache, fused_cache = static_cache(model, 16), static_cache(model, 16)
        token = greedy_token(model(prompt, cache=eager_cache, use_cache=True).logits)
        model(prompt, cache=fused_cache, use_cache=True)
        for _ in range(4):
            assert step.accepts(token, fused_cache, {})
            expected = model(token, cache=eager_cache, use_cache=True).logits[:, -1:]
            got = step(token, fused_cache).logits
            assert got.dtype == torch.float32 and relative_error(got, expected) < 1e-4
            token = greedy_token(expected)


def test_compile_model_routes_batch_one_steps_to_it(monkeypatch):
    model = small_model("llama", "w4a4_shared_int8_head")
    reference = copy.deepcopy(model)
    prompt = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    expected = greedy_generate(reference, prompt, 6)
    tme.compile_model(model, backend="eager")
    assert isinstance(model._tme_decode_step, FusedDecodeStep)
    calls = []
    fused_call = FusedDecodeStep.__call__
    monkeypatch.setattr(FusedDecodeStep, "__call__", lambda self, t, cache: calls.append(t) or fused_call(self, t, cache))
    cache = static_cache(model, 16)
    for _ in range(2):  # the second time on the same cache, reset in place
        got = greedy_generate(model, prompt, 6, cache=cache)
        assert torch.equal(got["tokens"], expected["tokens"])
        for a, b in zip(got["step_logits"], expected["step_logits"]):
            assert relative_error(a, b) < 2e-2
    assert len(calls) == 12  # every one-token step, not the prompts
    # A batch of two, a mask or a dynamic cache go to the compiled forward instead.
    with torch.inference_mode():
        cache = static_cache(model, 16, batch_size=2)
        model(prompt.repeat(2, 1), cache=cache, use_cache=True, logits_to_keep=1)
        model(prompt[:, :1].repeat(2, 1), cache=cache, use_cache=True, logits_to_keep=1)
        cache = static_cache(model, 16)
        model(prompt, cache=cache, use_cache=True)
        padded = torch.ones(1, 8, dtype=torch.long)
        padded[0, 0] = 0  # a padded position: not what the step computes
        masked = model(prompt[:, :1], cache=cache, use_cache=True, attention_mask=padded)
        assert masked.logits.shape == (1, 1, model.config.vocab_size)
    assert len(calls) == 12


def test_generate_with_a_static_cache_takes_it(monkeypatch):
    """generate(cache_implementation="static") passes a [1, 1, 1, L] mask of the cached keys each step."""
    model = small_model("qwen2", "w4a4_shared_int8_head")
    reference = copy.deepcopy(model)
    prompt = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=5, do_sample=False, cache_implementation="static")
    with torch.inference_mode():
        expected = reference.generate(prompt, **kwargs)
        tme.compile_model(model, backend="eager")
        calls = []
        fused_call = FusedDecodeStep.__call__
        monkeypatch.setattr(FusedDecodeStep, "__call__", lambda self, t, cache: calls.append(t) or fused_call(self, t, cache))
        got = model.generate(prompt, **kwargs)
    assert torch.equal(got, expected)
    assert len(calls) == 4  # the first new token comes from the prompt's logits


def test_accepts_only_what_it_computes():
    model = small_model("llama", "w4a4")
    step = FusedDecodeStep(model)
    token = torch.tensor([[5]])
    with torch.inference_mode():
        cache = static_cache(model, 8)
        assert step.accepts(token, cache, {"use_cache": True, "logits_to_keep": 0})
        assert not step.accepts(token, cache, {"use_cache": False})
        assert step.accepts(token, cache, {"attention_mask": torch.ones(1, 1), "return_dict": True})  # keys 0 .. 0
        assert step.accepts(token, cache, {"attention_mask": torch.tensor([True] + [False] * 7).view(1, 1, 1, 8)})
        assert not step.accepts(token, cache, {"attention_mask": torch.zeros(1, 1)})
        assert not step.accepts(token, cache, {"attention_mask": torch.ones(1, 2)})
        assert not step.accepts(token, cache, {"attention_mask": torch.tensor([True, True] + [False] * 6).view(1, 1, 1, 8)})
        assert not step.accepts(token, cache, {"return_dict": False})
        assert not step.accepts(token, cache, {"output_hidden_states": True})
        assert not step.accepts(torch.tensor([[5, 6]]), cache, {})
        assert not step.accepts(token.int(), cache, {})
        assert not step.accepts(token, static_cache(model, 8, batch_size=2), {})
        assert not step.accepts(token, static_cache(model, 8, dtype=torch.float32), {})
        from transformers import DynamicCache

        assert not step.accepts(token, DynamicCache(config=model.config), {})
    assert not step.accepts(token, cache, {})  # gradients enabled


def test_bad_inputs_raise_clear_errors():
    model = small_model("llama", "w4a4")
    step = FusedDecodeStep(model)
    with torch.inference_mode():
        cache = static_cache(model, 3)
        assert step.accepts(torch.tensor([[5]]), cache, {})
        with pytest.raises(RuntimeError, match="out of the vocabulary"):
            step(torch.tensor([[model.config.vocab_size]]), cache)
        for _ in range(3):
            step(torch.tensor([[5]]), cache)
        with pytest.raises(RuntimeError, match="the cache is full"):
            step(torch.tensor([[5]]), cache)
    assert int(cache.layers[0].cumulative_length) == 3


@pytest.mark.parametrize(
    "family, reason",
    [("phi3", "Phi3DecoderLayer"), ("gemma", "not a plain nn.Embedding")],
)
def test_other_layouts_are_refused_with_the_reason(family, reason):
    model = small_model(family, "weight_only")
    assert reason in why_not(model)
    with pytest.raises(ValueError, match="does not apply"):
        FusedDecodeStep(model)
    tme.compile_model(model, backend="eager")  # still compiles, decode steps in the graph
    assert not hasattr(model, "_tme_decode_step")


def test_a_replaced_mlp_is_refused():
    model = small_model("llama", "weight_only")
    model.model.layers[1].mlp = torch.nn.Identity()
    assert "Identity" in why_not(model)


def test_unfused_mxfp4_weights_are_refused():
    model = small_model("llama", "dense")
    quantize_linears(model, tme.MXFP4BlockRotConfig(kernel_preference="emulated"))
    assert "emulated" in why_not(model)
