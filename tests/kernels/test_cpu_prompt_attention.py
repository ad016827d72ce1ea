"""Prompt attention for AVX-512 CPUs without AMX (torchao_mx_ext/kernels/cpu_prompt_attention.py): against
a float64 reference written here (float32 sums of a few ulps, then one rounding to the output dtype),
masks of every kind, grouped heads, shapes that leave partial row and key blocks, opcheck, the
pure-torch fallback, and the route from the GQA-packed attention. The kernel tests skip on other CPUs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from torchao_mx_ext.kernels import cpu_extension, cpu_prompt_attention

needs_kernel = pytest.mark.skipif(
    not cpu_prompt_attention.AVX512_WITHOUT_AMX, reason="the prompt attention kernel runs on AVX-512 CPUs without AMX"
)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not cpu_extension.is_available():
        pytest.fail("the CPU kernels did not build (see the logged warning): they need g++ and ninja")


def reference(q, k, v, mask, scale, is_causal=False):
    """float64 softmax(scale q k^T + mask) v with each query head reading key head h // (H / H_kv);
    a row with every key left out gives zeros."""
    groups = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = qd @ kd.transpose(-1, -2) * scale
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ vd


def check(y, ref, v, dtype):
    """float32 scores, softmax and sums: a few float32 ulps of max |v|; then one rounding to dtype."""
    bound = 64 * torch.finfo(torch.float32).eps * v.abs().max().item() + torch.finfo(dtype).eps * ref.abs()
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}"


CASES = [
    # (B, H, H_kv, Lq, L, D, Dv, mask kind)
    (1, 9, 3, 61, 77, 64, 64, "bool_causal_cache"),  # a prompt into a larger static cache, 3 query heads per key head
    (2, 4, 2, 37, 50, 32, 128, "additive"),
    (1, 2, 1, 40, 40, 64, 64, "causal"),
    (1, 3, 3, 20, 33, 16, 64, "none"),
    (2, 2, 2, 18, 16, 48, 128, "per_head_bool"),
    # more rows than a parallel task's chunk (64): causality and masks at row offsets
    (1, 4, 2, 150, 150, 32, 64, "causal_chunks"),
    (1, 3, 1, 130, 162, 64, 128, "bool_causal_cache_chunks"),
]


def make_mask(kind, B, H, Lq, L, gen):
    if kind.startswith("bool_causal_cache"):
        m = torch.ones(Lq, L, dtype=torch.bool).tril()[None, None].clone()
        m[..., 5, :] = False  # a row with every key left out
        return m
    if kind == "additive":
        m = torch.randn(B, 1, Lq, L, generator=gen)
        m[0, 0, 3, 10:] = float("-inf")
        m[1, 0, 7, :] = float("-inf")
        return m
    if kind == "per_head_bool":
        return torch.rand(B, H, Lq, L, generator=gen) > 0.3
    return None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[c[-1] for c in CASES])
def test_matches_float64_reference(case, dtype):
    B, H, Hkv, Lq, L, D, Dv, kind = case
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Lq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, Dv, generator=gen).to(dtype)
    mask = make_mask(kind, B, H, Lq, L, gen)
    causal = kind.startswith("causal")
    y = cpu_prompt_attention.prompt_attention(q, k, v, mask, 0.3, causal)
    assert y.dtype == dtype and y.shape == (B, H, Lq, Dv)
    ref = reference(q, k, v, mask, 0.3, causal)
    check(y, ref, v, dtype)
    if mask is not None and mask.dtype == torch.bool:
        empty = ~mask.expand(B, H, Lq, L).any(-1)
        assert bool((y[empty] == 0).all())  # every key left out: zeros, as ATen


@needs_kernel
def test_agrees_with_sdpa_and_errors():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 24, 64, generator=gen) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(cpu_prompt_attention.prompt_attention(q, k, v, is_causal=True), sdpa, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="mask and is_causal"):
        torch.ops.torchao_mx_ext.prompt_attention(q, k, v, torch.ones(24, 24, dtype=torch.bool), 0.1, True)
    with pytest.raises(RuntimeError, match="Dv 64 or 128"):
        torch.ops.torchao_mx_ext.prompt_attention(q, k, v[..., :32], None, 0.1, False)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.torchao_mx_ext.prompt_attention(q, k[:, :, :, :32], v, None, 0.1, False)
    with pytest.raises(RuntimeError, match="boolean .* or floating"):
        torch.ops.torchao_mx_ext.prompt_attention(q, k, v, torch.ones(24, 24, dtype=torch.int32), 0.1, False)


@needs_kernel
def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 20, 32, generator=gen)
    k, v = torch.randn(1, 2, 24, 32, generator=gen), torch.randn(1, 2, 24, 64, generator=gen)
    for mask, causal in [(None, False), (torch.rand(1, 1, 20, 24, generator=gen) > 0.2, False), (None, True)]:
        kk, vv = (k[:, :, :20], v[:, :, :20]) if causal else (k, v)
        torch.library.opcheck(torch.ops.torchao_mx_ext.prompt_attention.default, (q, kk, vv, mask, 0.2, causal))


def test_pure_torch_fallback_matches_float64():
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 20, 32, generator=gen), torch.randn(1, 2, 24, 32, generator=gen), torch.randn(1, 2, 24, 64, generator=gen)
    mask = torch.rand(1, 1, 20, 24, generator=gen) > 0.2
    mask[0, 0, 4] = False
    y = cpu_prompt_attention.reference_prompt_attention(q, k, v, mask, 0.2)
    check(y, reference(q, k, v, mask, 0.2), v, torch.float32)
    assert bool((y[0, :, 4] == 0).all())


def test_applies(monkeypatch):
    monkeypatch.setattr(cpu_prompt_attention, "AVX512_WITHOUT_AMX", True)
    q, k, v = torch.randn(1, 9, 32, 64), torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    mask = torch.ones(1, 1, 32, 40, dtype=torch.bool)
    assert cpu_prompt_attention.applies(q, k, v, mask)
    assert cpu_prompt_attention.applies(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert not cpu_prompt_attention.applies(q[:, :, :16], k, v, None)  # decode-sized: the decode kernel's
    assert not cpu_prompt_attention.applies(q.half(), k.half(), v.half(), None)
    assert not cpu_prompt_attention.applies(q, k, v, mask, dropout=0.1)
    assert not cpu_prompt_attention.applies(q[:, :8], k, v, None)  # 8 heads do not share 3 key heads
    assert not cpu_prompt_attention.applies(q, k, v[..., :48], None)  # Dv not 64 / 128
    assert not cpu_prompt_attention.applies(q, k, v, mask.int())
    with torch.enable_grad():
        assert not cpu_prompt_attention.applies(q.requires_grad_(), k, v, None)
    monkeypatch.setattr(cpu_prompt_attention, "AVX512_WITHOUT_AMX", False)
    assert not cpu_prompt_attention.applies(q.detach(), k, v, None)


@needs_kernel
def test_packed_attention_routes_prompts_to_the_kernel(monkeypatch):
    """The GQA-packed attention hands prompts to the kernel, with transformers' causality rules (no mask:
    causal, keys cut to the prompt), and returns transformers' layout [B, Lq, H, Dv]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from torchao_mx_ext.regional_compile import packed_gqa_sdpa_attention

    calls = []
    real = cpu_prompt_attention.prompt_attention
    monkeypatch.setattr(cpu_prompt_attention, "prompt_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 9, 30, 64, generator=gen), torch.randn(1, 3, 40, 64, generator=gen), torch.randn(1, 3, 40, 64, generator=gen)
    mask = torch.ones(30, 40, dtype=torch.bool).tril()[None, None]
    for m in (mask, None):
        out, _ = packed_gqa_sdpa_attention(module, q, k, v, m, scaling=1 / math.sqrt(64))
        ref, _ = sdpa_attention_forward(module, q, k, v, m, scaling=1 / math.sqrt(64))
        assert out.shape == ref.shape == (1, 30, 9, 64)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2
