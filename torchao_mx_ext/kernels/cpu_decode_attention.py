"""Scaled dot-product attention for a few query rows (decode steps) on CPUs.

``softmax(scale * q k^T + mask) v`` for ``q [B, H, Lq, D]``, ``k [B, H, L, D]``, ``v [B, H, L, Dv]``
and a boolean (keep) or additive mask broadcastable to ``[B, H, Lq, L]``: the math of
``F.scaled_dot_product_attention`` without dropout, for the GQA-packed one-token steps of
:func:`torchao_mx_ext.regional_compile.packed_gqa_sdpa_attention` (each key/value head's query heads
as ``Lq`` rows). ATen's CPU flash attention tiles for long queries; for a decode step on a CPU without
native bf16 GEMMs it spends most of its time in emulated bf16 GEMMs, so this is a C++ kernel
(``decode_attention.cpp``, built with the other CPU kernels by :mod:`.cpu_extension`) registered as
the CPU kernel of ``torch.ops.torchao_mx_ext.decode_attention``, with a fake kernel (``torch.compile``
keeps it as one extern call) and a pure-torch fallback.

Numbers: float32 scores, softmax and weighted sum (the weights are not rounded to bf16 before the
product with ``v``, as ATen's bf16 flash attention rounds them), one rounding of the output to ``q``'s
dtype; a row whose keys are all masked out gives zeros, as ATen's CPU kernel does.
"""

from __future__ import annotations

import math

import torch

from . import cpu_extension

__all__ = ["MAX_QUERY_ROWS", "applies", "decode_attention", "reference_decode_attention", "set_isa"]

OP = "torchao_mx_ext::decode_attention"
# Query rows per (batch, head) the kernel takes: a decode step's packed grouped heads (SmolLM2: 3,
# Llama-3-8B: 4, Qwen2-0.5B: 7), not a prompt.
MAX_QUERY_ROWS = 16

_lib = torch.library.Library("torchao_mx_ext", "FRAGMENT")
_lib.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")


@torch.library.register_fake(OP, lib=_lib)
def _fake_decode_attention(q, k, v, mask, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def reference_decode_attention(q, k, v, mask, scale):
    """The operator in pure torch (float32 math; a row with every key masked out gives zeros)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all -inf rows: NaN -> zeros
    return torch.matmul(p, v.float()).to(q.dtype)


@torch.library.impl(_lib, "decode_attention", "CompositeExplicitAutograd")
def _fallback_decode_attention(q, k, v, mask, scale):
    # Reached only while the C++ CPU kernel is not registered (or off the CPU): build it once, then
    # redispatch to it; without it, compute the same numbers in pure torch.
    if q.device.type == "cpu" and cpu_extension.is_available():
        return torch.ops.torchao_mx_ext.decode_attention.default(q, k, v, mask, scale)
    return reference_decode_attention(q, k, v, mask, scale)


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask, dropout: float = 0.0) -> bool:
    """Whether the kernel should replace ``F.scaled_dot_product_attention(query, key, value, attn_mask)``:
    CPU tensors of one floating dtype, 4-D with the same batch and head counts, at most
    :data:`MAX_QUERY_ROWS` query rows, no dropout, no gradient needed (no backward), a CPU where the
    kernel is vectorised (:data:`.cpu_extension.VECTORIZED`: AVX2 or AVX-512; 2x faster than ATen's
    flash attention on a Zen 4 core for a SmolLM2 step), and the kernels not known to be unavailable."""
    if not cpu_extension.VECTORIZED or cpu_extension.known_unavailable() or dropout:
        return False
    tensors = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or query.dtype != key.dtype or query.dtype != value.dtype:
        return False
    if query.shape[:2] != key.shape[:2] or query.shape[:2] != value.shape[:2] or query.shape[2] > MAX_QUERY_ROWS:
        return False
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))


def decode_attention(query, key, value, attn_mask=None, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(query, key, value, attn_mask, scale=scale)`` for few query rows
    (default scale ``1 / sqrt(D)``)."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return torch.ops.torchao_mx_ext.decode_attention(query, key, value, attn_mask, scale)


def set_isa(isa: int | None) -> int:
    """Test hook: cap the kernel's code path (0 scalar, 1 AVX2, 3 AVX-512 BF16 scores; ``None`` = the best
    the CPU and ``ATEN_CPU_CAPABILITY`` allow). Returns the path now in use."""
    if not cpu_extension.is_available():
        raise RuntimeError("the CPU kernels are not available")
    return torch.ops.torchao_mx_ext._decode_attention_set_isa(-1 if isa is None else isa)
