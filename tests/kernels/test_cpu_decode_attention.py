"""CPU attention for a few query rows (decode steps): against a float64 reference written here, on every
code path, masks of both kinds, the fallback, opcheck, and the packed-GQA attention that calls it."""

import pytest
import torch
import torch.nn.functional as F

from torchao_mx_ext.kernels import cpu_decode_attention, cpu_extension
from torchao_mx_ext.regional_compile import packed_gqa_sdpa_attention

from kernel_paths import kernel_path_fixtures

kernel, isa = kernel_path_fixtures(cpu_decode_attention.set_isa, {0: "scalar", 1: "avx2", 3: "avx512_bf16"})


def reference(q, k, v, mask, scale):
    """float64 softmax(scale q k^T + mask) v; rows with every key masked out are zeros."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return (torch.softmax(s, dim=-1).nan_to_num(0.0) @ v.double())


def check(y, ref, v, dtype):
    """float32 arithmetic (a few ulps per weight and sum) and one rounding to the output dtype."""
    scale = v.double().abs().amax(dim=-2, keepdim=True)  # |out| <= max |v| per dimension
    bound = 1e-5 * scale + torch.finfo(dtype).eps * ref.abs()
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_reference(isa, dtype):
    gen = torch.Generator().manual_seed(0)
    # (B, H, Lq, L, D, Dv): decode shapes, an odd key count (the AVX2 softmax tail), D != Dv, D not a
    # multiple of 8 (the scalar loops on every path), 16 query rows.
    for b, h, lq, L, d, dv in [(1, 3, 3, 578, 64, 64), (2, 2, 1, 13, 16, 24), (1, 1, 16, 40, 128, 72), (1, 2, 2, 9, 12, 20)]:
        q = torch.randn(b, h, lq, d, generator=gen).to(dtype)
        k = torch.randn(b, h, L, d, generator=gen).to(dtype)
        v = torch.randn(b, h, L, dv, generator=gen).to(dtype)
        keep = torch.rand(b, 1, lq, L, generator=gen) > 0.3
        keep[..., 0] = True
        additive = torch.where(keep, torch.randn(b, 1, lq, L, generator=gen), torch.tensor(float("-inf")))
        for mask in (None, keep, keep[:, :, :1], additive, additive.to(dtype)):
            scale = d**-0.5
            y = cpu_decode_attention.decode_attention(q, k, v, mask, scale)
            assert y.shape == (b, h, lq, dv) and y.dtype == dtype
            check(y, reference(q, k, v, mask, scale), v, dtype)


def test_masked_out_rows_and_keys(isa):
    """A row with every key masked out gives zeros (as ATen's CPU flash attention); keys far below the
    row maximum weigh nothing; large scores do not overflow."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 3, 16, generator=gen) * 30
    k = torch.randn(1, 1, 20, 16, generator=gen) * 30
    v = torch.randn(1, 1, 20, 8, generator=gen)
    keep = torch.ones(1, 1, 3, 20, dtype=torch.bool)
    keep[0, 0, 1] = False
    y = cpu_decode_attention.decode_attention(q, k, v, keep, 1.0)
    assert torch.equal(y[0, 0, 1], torch.zeros(8))
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0), atol=1e-5, rtol=1e-5)
    ref = reference(q, k, v, keep, 1.0)
    check(y, ref, v, torch.float32)
    assert bool(y.isfinite().all())


def test_errors_and_fallback():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 2, 8, generator=gen) for _ in range(3))
    with pytest.raises(RuntimeError, match="does not match"):
        cpu_decode_attention.decode_attention(q, k[:, :1], v)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_decode_attention.decode_attention(q, k.bfloat16(), v)
    with pytest.raises(RuntimeError, match="boolean .* or floating"):
        cpu_decode_attention.decode_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.int64))
    mask = torch.rand(1, 1, 2, 2, generator=gen) > 0.5
    mask[..., 0] = True
    kernel_out = cpu_decode_attention.decode_attention(q, k, v, mask)
    fallback = cpu_decode_attention.reference_decode_attention(q, k, v, mask, 8**-0.5)
    torch.testing.assert_close(kernel_out, fallback, atol=1e-6, rtol=1e-5)


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    op = torch.ops.torchao_mx_ext.decode_attention.default
    q, k, v = torch.randn(1, 2, 3, 16, generator=gen), torch.randn(1, 2, 7, 16, generator=gen), torch.randn(1, 2, 7, 8, generator=gen)
    mask = torch.ones(1, 1, 3, 7, dtype=torch.bool)
    for args in [(q, k, v, None, 0.25), (q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.25)]:
        torch.library.opcheck(op, args)


def test_packed_gqa_attention_calls_it_where_it_is_vectorised(monkeypatch):
    """The GQA-packed decode attention runs the kernel on AVX2 and AVX-512 CPUs and gives transformers'
    sdpa result within bf16 rounding; elsewhere it keeps ATen's."""
    gen = torch.Generator().manual_seed(4)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    q = torch.randn(1, 9, 1, 64, generator=gen).bfloat16()
    k = torch.randn(1, 3, 30, 64, generator=gen).bfloat16()
    v = torch.randn(1, 3, 30, 64, generator=gen).bfloat16()
    mask = torch.ones(1, 1, 1, 30, dtype=torch.bool)
    mask[..., 25:] = False
    calls = []
    real = cpu_decode_attention.decode_attention
    monkeypatch.setattr(cpu_decode_attention, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)
    for vectorized, n_calls in ((True, 1), (False, 1)):
        monkeypatch.setattr(cpu_extension, "VECTORIZED", vectorized)
        out, _ = packed_gqa_sdpa_attention(module, q, k, v, mask, scaling=0.125)
        assert len(calls) == n_calls
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2**-7)
