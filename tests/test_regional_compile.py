"""compile_decoder_layers: one Dynamo cache per layer (prompt + decode-step graph each, no recompiles),
same logits as eager; compile_model: one cache per model (prompt + decode-step graph); the GQA-packed
decode attention against a float64 reference."""

import copy
import math

import pytest
import torch
import torch._dynamo.testing

import torchao_mx_ext as tme
from torchao_mx_ext.eval.generation import greedy_generate
from torchao_mx_ext.recipes import quantize_linears
from torchao_mx_ext.regional_compile import packed_gqa_sdpa_attention
from torchao_mx_ext.zoo import load_model


def reference_attention(query, key, value, mask):
    """float64 softmax attention, each query head on its key/value head ``h // (H / H_kv)``."""
    q, k, v = (t.double() for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


class _Attention(torch.nn.Module):
    num_key_value_groups = 3


@pytest.mark.parametrize("with_mask", [False, True])
def test_packed_gqa_attention_matches_float64(with_mask):
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, h, n, 16, generator=g) for h, n in ((6, 1), (2, 11), (2, 11)))
    mask = None
    if with_mask:  # a static cache: only the first positions are filled
        mask = (torch.arange(11) < torch.tensor([[7], [11]])).view(2, 1, 1, 11)
    out, weights = packed_gqa_sdpa_attention(_Attention(), query, key, value, mask)
    assert weights is None and out.shape == (2, 1, 6, 16)
    torch.testing.assert_close(out.double(), reference_attention(query, key, value, mask), atol=1e-6, rtol=1e-6)
    # Prefill (several queries) goes to transformers' sdpa, the same reference.
    query = torch.randn(2, 6, 4, 16, generator=g)
    out, _ = packed_gqa_sdpa_attention(_Attention(), query, key, value, None, is_causal=False)
    torch.testing.assert_close(out.double(), reference_attention(query, key, value, None), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def quantized():
    model, _ = load_model("stories260k")
    return quantize_linears(model, tme.MXFP4BlockRotConfig())


def test_each_layer_compiles_twice_and_matches_eager(quantized):
    prompt = torch.randint(0, quantized.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    eager = greedy_generate(quantized, prompt, 3, logits_to_keep=0)
    model = copy.deepcopy(quantized)
    tme.share_input_quantization(model)  # before compiling: module guards are skipped
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    tme.compile_decoder_layers(model, backend=counter)
    assert model.config._attn_implementation == tme.PACKED_GQA_SDPA
    first = greedy_generate(model, prompt, 3, logits_to_keep=0)
    again = greedy_generate(model, prompt, 3, logits_to_keep=0)
    layers = model.config.num_hidden_layers
    # A prompt graph and a decode-step graph per layer, and no recompile over steps and runs.
    assert counter.frame_count == 2 * layers
    for run in (first, again):
        assert torch.equal(run["tokens"], eager["tokens"])
        torch.testing.assert_close(run["prefill_logits"], eager["prefill_logits"], atol=1e-5, rtol=1e-5)
        for c, e in zip(run["step_logits"], eager["step_logits"]):
            torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


def test_whole_model_compiles_twice_per_model_and_matches_eager(quantized):
    prompt = torch.randint(0, quantized.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    eager = greedy_generate(quantized, prompt, 3, logits_to_keep=0)
    torch._dynamo.reset()
    counters = []
    for _ in range(2):  # two models compiled alike: each its own cache, its own two graphs
        model = copy.deepcopy(quantized)
        tme.share_input_quantization(model)
        counters.append(torch._dynamo.testing.CompileCounterWithBackend("eager"))
        assert tme.compile_model(model, backend=counters[-1]) is model
        assert model.config._attn_implementation == tme.PACKED_GQA_SDPA
        for run in (greedy_generate(model, prompt, 3, logits_to_keep=0), greedy_generate(model, prompt, 3, logits_to_keep=0)):
            assert torch.equal(run["tokens"], eager["tokens"])
            torch.testing.assert_close(run["prefill_logits"], eager["prefill_logits"], atol=1e-5, rtol=1e-5)
            for c, e in zip(run["step_logits"], eager["step_logits"]):
                torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
    assert [c.frame_count for c in counters] == [2, 2]
    with pytest.raises(ValueError, match="already replaced"):
        tme.compile_model(model)


def test_kernels_loading_after_tracing_does_not_recompile(quantized, monkeypatch):
    """Which path a linear takes depends on whether the C++ kernels are known to be unavailable; a graph
    traced before their first build must stay valid once it succeeds (no ~10 s recompile of the
    prompt graph on the next call)."""
    from torchao_mx_ext.kernels import cpu_extension

    prompt = torch.randint(0, quantized.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(quantized)
    tme.share_input_quantization(model)  # its pre-hook picks the quantizer's path in the traced code
    monkeypatch.setattr(cpu_extension, "_state", None)  # not built yet
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    tme.compile_model(model, backend=counter)
    first = greedy_generate(model, prompt, 2)
    frames = counter.frame_count
    monkeypatch.setattr(cpu_extension, "_state", True)  # the build has finished
    again = greedy_generate(model, prompt, 2)
    assert counter.frame_count == frames == 2
    assert torch.equal(first["tokens"], again["tokens"])


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(NotImplementedError, match="compile_decoder_layers needs a decoder with model.model.layers"):
        tme.compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)), packed_gqa=False)


@pytest.mark.parametrize("compile_fn", ["compile_decoder_layers", "compile_model"])
def test_bfloat16_w4a4_compiled_with_inductor_equals_eager(compile_fn):
    # Activation quantization turns rounding differences into whole FP4 steps: Inductor must round
    # fused bfloat16 intermediates as eager does (emulate_precision_casts, on by default here).
    model, _ = load_model("stories260k", torch.bfloat16)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    quantize_linears(model, tme.MXFP4BlockRotConfig())
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    eager = greedy_generate(model, prompt, 2, logits_to_keep=0)
    torch._dynamo.reset()
    getattr(tme, compile_fn)(model)
    compiled = greedy_generate(model, prompt, 2, logits_to_keep=0)
    assert torch.equal(compiled["prefill_logits"], eager["prefill_logits"])
    assert torch.equal(compiled["tokens"], eager["tokens"])


def test_compile_model_computes_the_rotary_embedding_once():
    """transformers computes the rotary cos / sin once a forward; Inductor's default heuristics recompute
    them inside every layer's kernels. compile_model stores them once (realize_opcount_threshold): in
    the prompt graph, the kernels that evaluate cos run once in all, not once a layer. The logits stay
    eager's, bit for bit (same attention implementation on both sides)."""
    import re

    from torch._inductor.utils import run_and_get_code

    model, _ = load_model("stories260k", torch.bfloat16)
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    quantize_linears(model, tme.MXFP4BlockRotConfig())
    eager = copy.deepcopy(model)
    tme.regional_compile.register_packed_gqa_sdpa()
    eager.set_attn_implementation(tme.PACKED_GQA_SDPA)
    prompt = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    tme.compile_model(model)
    with torch.inference_mode(), torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        logits, code = run_and_get_code(lambda: model(prompt, use_cache=False).logits)
        expected = eager(prompt, use_cache=False).logits
    code = "\n".join(code)
    kernels = dict(re.findall(r"\n(cpp_fused\w*) = async_compile\.cpp_pybinding\(.*?r'''(.*?)'''", code, flags=re.S))
    with_cos = [name for name, body in kernels.items() if re.search(r"\bcos\(|\.cos\(\)", body)]
    body = code.split("def call(", 1)[1]
    calls = sum(len(re.findall(rf"\b{name}\(", body)) for name in with_cos)
    assert with_cos and calls == 1, (with_cos, calls)
    assert torch.equal(logits, expected)
