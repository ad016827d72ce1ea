"""The whole quantized decoder under ``torch.compile(fullgraph=True)``: prefill and static-cache decode
match eager, nothing breaks the graph or recompiles, and shared inputs are quantized once per group.

stories260k cut to its first layer (the kernels of every layer are alike; fewer layers compile faster).
Each variant compiles two graphs: the prompt ``[1, L]`` and the decode step ``[1, 1]``.
"""

import copy
import re

import pytest
import torch
import torch._dynamo.testing
from torch._inductor.utils import run_and_get_code

import torchao_mx_ext as tme
from torchao_mx_ext.eval.generation import greedy_generate, static_cache
from torchao_mx_ext.recipes import quantize_linears
from torchao_mx_ext.shared_quant import share_input_quantization, shared_groups
from torchao_mx_ext.zoo import load_model

from torchao_mx_ext.kernels import cpu_mxfp4_gemv

# the CPU dequant-GEMV kernel takes linears with at most MAX_ROWS rows (the decode steps)
MAX_ROWS = cpu_mxfp4_gemv.MAX_ROWS

LAYERS = 1
PROMPT = MAX_ROWS + 16  # the prompt takes the dequantize + GEMM path
STEPS = 2
VARIANTS = {
    "w4a4": (tme.MXFP4BlockRotConfig(), False),
    "weight_only": (tme.MXFP4BlockRotConfig(act_quant=False), False),
    "w4a4_shared": (tme.MXFP4BlockRotConfig(), True),
}


@pytest.fixture(scope="module")
def base():
    model, _ = load_model("stories260k")
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    return model


def activation_quant_calls(code: str) -> int:
    """Calls, in the compiled graph's ``call``, of kernels that quantize an activation: the MXFP4
    quantizer's block max (``amax``) is in their name (weight decoding has none, nor RMSNorm or RoPE),
    or the C++ quantizer ops (AVX-512 CPUs; the fused rotation + quantizer with a scale rule, not
    "none", the rotation alone). ``benchmarks/compile_report.py`` classifies every kernel the same way."""
    body = code.split("def call(", 1)[1]
    fused = sum(1 for name in re.findall(r"\b(cpp_fused\w*|triton_\w+)\(", body) if "amax" in name)
    plain = re.findall(r"torch\.ops\.torchao_mx_ext\.mxfp4_fake_quantize\.default\(", body)
    rotating = re.findall(r"torch\.ops\.torchao_mx_ext\.mxfp4_rotate_fake_quantize\.default\(.*?'(\w+)'\)", body)
    return fused + len(plain) + sum(rule != "none" for rule in rotating)


@pytest.fixture(scope="module")
def runs(base):
    """Per variant: eager and compiled prefill/decode logits, the prefill code, the graph count. The
    prompt takes the dequantize + GEMM route (pinned: on AVX-512 VNNI CPUs W4A4 prompts would run the
    GEMV's panel GEMM, which quantizes inside the call; tests/test_gemv_grouping.py compiles that route)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_mxfp4_gemv, "PANELS", False)
        yield _runs(base)


def _runs(base):
    out = {}
    prompt = torch.randint(0, base.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    for name, (config, shared) in VARIANTS.items():
        model = quantize_linears(copy.deepcopy(base), config)
        with torch.inference_mode():
            eager = greedy_generate(model, prompt, STEPS, logits_to_keep=0)
        if shared:
            assert share_input_quantization(model) == 2 * LAYERS
            assert set(shared_groups(model).values()) == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        cache = static_cache(model, PROMPT + STEPS)
        with torch.inference_mode():
            # The first call compiles the prompt graph and returns its logits with the code.
            (logits, code) = run_and_get_code(
                lambda: compiled(prompt, cache=cache, use_cache=True, logits_to_keep=0).logits
            )
            result = greedy_generate(compiled, prompt, STEPS, cache=cache, logits_to_keep=0)
        out[name] = {"eager": eager, "compiled": result, "first_logits": logits, "code": "\n".join(code), "graphs": counter.frame_count}
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_prefill_and_decode_match_eager(runs, variant):
    r = runs[variant]
    eager, compiled = r["eager"], r["compiled"]
    scale = eager["prefill_logits"].abs().max().item()
    tol = dict(atol=1e-5 * scale, rtol=1e-5)  # float32 rounding: Inductor reorders sums
    torch.testing.assert_close(r["first_logits"], eager["prefill_logits"], **tol)
    torch.testing.assert_close(compiled["prefill_logits"], eager["prefill_logits"], **tol)
    assert torch.equal(compiled["tokens"], eager["tokens"])
    for c, e in zip(compiled["step_logits"], eager["step_logits"]):
        torch.testing.assert_close(c, e, **tol)
    # fullgraph=True raised on any graph break; two graphs (prompt, decode step) and no recompiles
    # over the decode steps and the repeated prompt.
    assert r["graphs"] == 2


def test_shared_input_is_quantized_once_per_group(runs):
    # Per layer, W4A4: q/k/v share one input, gate/up another; o_proj and down_proj have their own.
    per_layer = {name: activation_quant_calls(runs[name]["code"]) / LAYERS for name in ("w4a4", "w4a4_shared", "weight_only")}
    assert per_layer["w4a4_shared"] == 4, per_layer
    assert per_layer["w4a4"] == 7, per_layer  # each linear quantizes its own input: the counter sees it
    assert per_layer["weight_only"] == 0, per_layer

