"""Scaled dot-product attention for prompts on AVX-512 CPUs, flash-style, with grouped key/value heads.

``softmax(scale * q k^T + mask) v`` for ``q [B, H, Lq, D]``, ``k [B, H_kv, L, D]``, ``v [B, H_kv, L, Dv]``
(``H`` a multiple of ``H_kv``: query head ``h`` reads key/value head ``h // (H / H_kv)``) and a boolean
(keep) or additive mask broadcastable to ``[B, H, Lq, L]``, or ``is_causal`` (key ``l <= i``, the
top-left alignment of ``F.scaled_dot_product_attention``): the math of ``F.scaled_dot_product_attention``
with ``enable_gqa`` and no dropout. ATen's CPU flash attention runs a SmolLM2-135M prompt's attention
(9 heads x 512 rows, 544 cached keys, bf16) at about 10.5 ms a layer on a Zen 4 core without AMX,
whatever the mask (a third of a W4A4 prefill there); this kernel (``prompt_attention.cpp``, built with
the other CPU kernels by :mod:`.cpu_extension`) sweeps the keys in blocks of 16 for 4 query rows at a
time with an online softmax, and skips the blocks the mask leaves out (half of a causal prompt). It is
registered as the CPU kernel of ``torch.ops.torchao_mx_ext.prompt_attention``, with a fake kernel
(``torch.compile`` keeps it as one extern call) and a pure-torch fallback.

Numbers: float32 scores, softmax and weighted sum (the weights are not rounded to bf16 before the
product with ``v``, as ATen's bf16 flash attention rounds them), one rounding of the output to ``q``'s
dtype; a row whose keys are all left out gives zeros, as ATen's CPU kernel does.
"""

from __future__ import annotations

import math

import torch

from . import cpu_extension

__all__ = ["MIN_QUERY_ROWS", "applies", "prompt_attention", "reference_prompt_attention"]

OP = "torchao_mx_ext::prompt_attention"
# Fewer query rows per head are decode steps: cpu_decode_attention's kernel (GQA-packed) takes those.
MIN_QUERY_ROWS = 17
# Where the kernel runs: ATen at AVX-512 (its capability also caps ours) on a CPU without AMX, where
# oneDNN's bf16 attention GEMMs are fast (not measured against this kernel there).
AVX512_WITHOUT_AMX = cpu_extension.ATEN_AVX512 and not cpu_extension.AMX

_lib = torch.library.Library("torchao_mx_ext", "FRAGMENT")
_lib.define("prompt_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal=False) -> Tensor")


@torch.library.register_fake(OP, lib=_lib)
def _fake_prompt_attention(q, k, v, mask, scale, is_causal=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def reference_prompt_attention(q, k, v, mask, scale, is_causal=False):
    """The operator in pure torch (float32 math; a row with every key masked out gives zeros)."""
    groups = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all -inf rows: NaN -> zeros
    return torch.matmul(p, vf).to(q.dtype)


@torch.library.impl(_lib, "prompt_attention", "CompositeExplicitAutograd")
def _fallback_prompt_attention(q, k, v, mask, scale, is_causal=False):
    # Reached only while the C++ CPU kernel is not registered (or off the CPU): build it once, then
    # redispatch to it; without it, compute the same numbers in pure torch.
    if q.device.type == "cpu" and AVX512_WITHOUT_AMX and cpu_extension.is_available():
        return torch.ops.torchao_mx_ext.prompt_attention.default(q, k, v, mask, scale, is_causal)
    return reference_prompt_attention(q, k, v, mask, scale, is_causal)


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask, dropout: float = 0.0) -> bool:
    """Whether the kernel should replace ``F.scaled_dot_product_attention(query, key, value, attn_mask,
    enable_gqa=True)``: CPU tensors, 4-D, float32 or bfloat16 (one dtype), ``H`` a multiple of ``H_kv``,
    ``D`` a multiple of 16 and ``Dv`` 64 or 128, at least :data:`MIN_QUERY_ROWS` query rows, a boolean
    or floating mask (or none), no dropout, no gradient needed, an AVX-512 CPU without AMX
    (:data:`AVX512_WITHOUT_AMX`), and the kernels not known to be unavailable."""
    if not AVX512_WITHOUT_AMX or cpu_extension.known_unavailable() or dropout:
        return False
    tensors = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    if any(t.device.type != "cpu" for t in tensors) or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    if query.dtype not in (torch.float32, torch.bfloat16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3] or query.shape[1] % key.shape[1] or query.shape[3] != key.shape[3]:
        return False
    if query.shape[2] < MIN_QUERY_ROWS or query.shape[3] % 16 or value.shape[3] not in (64, 128):
        return False
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))


def prompt_attention(query, key, value, attn_mask=None, scale: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(query, key, value, attn_mask, scale=scale, is_causal=is_causal,
    enable_gqa=True)`` for prompts (default scale ``1 / sqrt(D)``)."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return torch.ops.torchao_mx_ext.prompt_attention(query, key, value, attn_mask, scale, is_causal)
