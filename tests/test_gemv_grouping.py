"""The GEMV-grouping post-grad pass (torchao_mx_ext/gemv_grouping.py): the rewritten graph has one
``mxfp4_gemv_group`` call per shared input and gives the original graph's outputs bit for bit; compiled
decoders (compile_model) use it and still equal eager."""

import copy
import re

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import torchao_mx_ext as tme
from torchao_mx_ext.eval.generation import greedy_generate
from torchao_mx_ext.gemv_grouping import group_shared_input_gemvs
from torchao_mx_ext.kernels import cpu_extension, cpu_mxfp4_dequantize, cpu_mxfp4_gemv, cpu_mxfp4_mm, cpu_mxfp4_quantize
from torchao_mx_ext.recipes import quantize_linears
from torchao_mx_ext.rotation import rotation_block
from torchao_mx_ext.zoo import load_model

GEMV = torch.ops.torchao_mx_ext.mxfp4_gemv.default
GROUP = torch.ops.torchao_mx_ext.mxfp4_gemv_group.default
ROTATE_QUANTIZE = torch.ops.torchao_mx_ext.mxfp4_rotate_fake_quantize.default


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not cpu_mxfp4_gemv.is_available():
        pytest.fail("the CPU kernels did not build: they need g++ and ninja")


def weights(gen, *rows, k=96):
    return [(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen),
             torch.randint(118, 132, (n, k // 32), dtype=torch.uint8, generator=gen)) for n in rows]


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_gemvs_of_one_input_become_one_call_with_the_same_bits():
    gen = torch.Generator().manual_seed(0)
    (q1, s1), (q2, s2), (q3, s3) = weights(gen, 24, 8, 8)
    rotation = rotation_block("hadamard", 32)

    def per_linear(x, q1, s1, q2, s2, q3, s3, r):  # three W4A4 linears, each its own transform
        return [GEMV(x, q, s, 32, 1.0, None, torch.bfloat16, r, "mse") for q, s in ((q1, s1), (q2, s2), (q3, s3))]

    def shared(x, q1, s1, q2, s2, q3, s3, r):  # share_input_quantization: one transform, members re-quantize
        xs = ROTATE_QUANTIZE(x.to(torch.float32), r, 32, "mse").to(torch.bfloat16)
        return [GEMV(xs, q, s, 32, 1.0, None, torch.bfloat16, None, "mse") for q, s in ((q1, s1), (q2, s2), (q3, s3))]

    def shared_taken_as_is(x, q1, s1, q2, s2, q3, s3, r):  # share_input_quantization, members without a rule
        xs = ROTATE_QUANTIZE(x.to(torch.float32), r, 32, "mse").to(torch.bfloat16)
        return [GEMV(xs, q, s, 32, 1.0, None, torch.bfloat16, None, None) for q, s in ((q1, s1), (q2, s2), (q3, s3))]

    def other_input(x, q1, s1, q2, s2, q3, s3, r):  # the third reads another tensor: not grouped with the others
        return [GEMV(x, q1, s1, 32, 1.0, None, torch.bfloat16, r, "mse"), GEMV(x, q2, s2, 32, 1.0, None, torch.bfloat16, r, "mse"),
                GEMV(x * 2, q3, s3, 32, 1.0, None, torch.bfloat16, r, "mse")]

    args = (torch.randn(1, 96, generator=gen).bfloat16(), q1, s1, q2, s2, q3, s3, rotation)
    for fn, groups, gemvs_left, quantizers_left in [(per_linear, 1, 0, 0), (shared, 1, 0, 0), (shared_taken_as_is, 1, 0, 0),
                                                    (other_input, 1, 1, 0)]:
        gm = make_fx(fn)(*args)
        expected = gm(*args)
        assert group_shared_input_gemvs(gm.graph) == groups
        gm.recompile()
        assert targets(gm).count(GROUP) == groups
        assert targets(gm).count(GEMV) == gemvs_left and targets(gm).count(ROTATE_QUANTIZE) == quantizers_left
        got = gm(*args)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_left_alone_where_grouping_would_change_the_graph():
    gen = torch.Generator().manual_seed(1)
    (q1, s1), (q2, s2) = weights(gen, 16, 16)

    def different_rules(x, q1, s1, q2, s2):
        return GEMV(x, q1, s1, 32, 1.0, None, torch.float32, None, "floor"), GEMV(x, q2, s2, 32, 1.0, None, torch.float32, None, "even")

    def rotation_only(x, q1, s1, q2, s2):  # weight-only members of a shared rotation: nothing to fold
        xs = ROTATE_QUANTIZE(x, torch.eye(32), 32, "none")
        return GEMV(xs, q1, s1, 32, 1.0, None, torch.float32, None, None), GEMV(xs, q2, s2, 32, 1.0, None, torch.float32, None, None)

    def quantizer_used_elsewhere(x, q1, s1, q2, s2):  # the shared input also feeds an addition: it must stay
        r = torch.eye(32)
        xs = ROTATE_QUANTIZE(x, r, 32, "floor")
        return GEMV(xs, q1, s1, 32, 1.0, None, torch.float32, None, "floor"), GEMV(xs, q2, s2, 32, 1.0, None, torch.float32, None, "floor"), xs + 1

    args = (torch.randn(2, 96, generator=gen), q1, s1, q2, s2)
    gm = make_fx(different_rules)(*args)
    assert group_shared_input_gemvs(gm.graph) == 0
    gm = make_fx(rotation_only)(*args)
    assert group_shared_input_gemvs(gm.graph) == 1  # grouped on the rotated input, which stays
    gm.recompile()
    assert targets(gm).count(ROTATE_QUANTIZE) == 1
    gm = make_fx(quantizer_used_elsewhere)(*args)
    expected = gm(*args)
    assert group_shared_input_gemvs(gm.graph) == 1  # grouped, but on the quantized input
    gm.recompile()
    assert targets(gm).count(ROTATE_QUANTIZE) == 1 and targets(gm).count(GROUP) == 1
    assert all(torch.equal(g, e) for g, e in zip(gm(*args), expected))


@pytest.mark.parametrize("share,route", [(True, "avx2"), (False, "avx2"), (True, "avx512"), (True, "avx512_panels")])
def test_compiled_decode_step_groups_and_equals_eager(monkeypatch, share, route):
    """A bfloat16 W4A4 decoder compiled whole (the GEMV quantizes its input): its decode graph makes two
    group calls a layer (q/k/v, gate/up) and no quantizer call for the shared inputs, and its tokens and
    logits equal eager's (with the same, GQA-packed, attention). Shared inputs on every prompt route: the
    integer GEMM's (members quantize again), the AVX-512 CPUs' dense one (members take the input as is)
    and the GEMV's panel GEMM on AVX-512 VNNI (members quantize again; the prompt graph groups too)."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", route != "avx2")
    monkeypatch.setattr(cpu_mxfp4_gemv, "PANELS", route == "avx512_panels")
    monkeypatch.setattr(cpu_mxfp4_quantize, "VECTORIZED", True)
    model, _ = load_model("stories260k", torch.bfloat16)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    quantize_linears(model, tme.MXFP4BlockRotConfig())
    if share:
        tme.share_input_quantization(model)
    eager = copy.deepcopy(model)
    tme.regional_compile.register_packed_gqa_sdpa()
    eager.set_attn_implementation(tme.PACKED_GQA_SDPA)
    # More rows than the GEMV and the integer GEMM take: only the decode graph groups, and the prompt's
    # activations are quantized by the same C++ kernel in both models (Inductor's and eager torch's
    # quantizers may round an mse tie differently, and a different KV cache would hide what is tested).
    rows = max(cpu_mxfp4_gemv.MAX_ROWS, cpu_mxfp4_mm.MAX_ROWS) + 2
    prompt = torch.randint(0, model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(3))
    expected = greedy_generate(eager, prompt, 2, logits_to_keep=0)
    torch._dynamo.reset()
    tme.compile_model(model)
    got, code = run_and_get_code(greedy_generate, model, prompt, 2, logits_to_keep=0)
    grouped = [c for c in code if "mxfp4_gemv_group" in c]
    assert len(grouped) == (2 if route == "avx512_panels" else 1)  # the decode-step graph (compiled last), and the prompt's
    calls = re.findall(r"torch\.ops\.torchao_mx_ext\.(\w+)\.default\(", grouped[-1])
    assert calls.count("mxfp4_gemv_group") == 4 and calls.count("mxfp4_gemv") == 4  # o_proj, down_proj stay single
    assert "mxfp4_rotate_fake_quantize" not in calls and "mxfp4_fake_quantize" not in calls
    assert torch.equal(got["tokens"], expected["tokens"])
    assert torch.equal(got["prefill_logits"], expected["prefill_logits"])
    if cpu_extension.VECTORIZED:  # both run our decode attention (else eager and Inductor's SDPA may differ)
        for g, e in zip(got["step_logits"], expected["step_logits"]):
            assert torch.equal(g, e)
