"""MXFP4 quantize / dequantize along the last dimension, in blocks of ``block_size`` (32 in OCP MX).

A block ``x_1..x_32`` gets one E8M0 exponent ``e`` (rule in ``e8m0.py``) and elements
``q_i = RNE_E2M1(x_i / (2^e * m))`` (``m = 4/3`` for ``fp_quant``, else 1), so ``x_i ~ q_i * 2^e * m``.
Computation is in float32 whatever the input dtype; dividing by a power of two is exact there, so the
result is bit-exact with the OCP definition. Storage: codes packed two per uint8, scales as uint8.

All functions are pure torch and compile into fused Inductor kernels (no lookup tables, no
``float8_e8m0fnu`` tensors, which Inductor's C++ backend cannot handle).
"""

from typing import Tuple

import torch

from .e2m1 import code_to_e2m1, e2m1_to_code, round_to_e2m1
from .e8m0 import (
    E8M0_MAX_EXP,
    E8M0_NAN,
    check_scale_rule,
    e8m0_to_exponent,
    element_multiplier,
    exp2_int,
    exponent_to_e8m0,
    shared_exponent,
)
from .packing import pack_uint4, unpack_uint4


def _to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    if x.shape[-1] % block_size:
        raise ValueError(
            f"MXFP4 quantizes the last dimension in blocks of {block_size}; got width {x.shape[-1]}. "
            "Pad it with zeros first (the tensor subclasses do this for linear layers)."
        )
    return x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def round_onto_scales(x: torch.Tensor, inv_scale: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """E2M1 values of ``x`` on fixed block scales: ``RNE_E2M1(x * inv_scale / multiplier)`` in float32.

    ``inv_scale`` holds exact powers of two ``2^-e`` (broadcast against ``x``) and ``multiplier`` is
    :func:`~.e8m0.element_multiplier` of the scale rule. The one element rounding of the format: the
    quantizers here and GPTQ's column loop (which fixes the scales before it rounds) both use it, so
    they agree bit for bit.
    """
    v = x.to(torch.float32) * inv_scale
    if multiplier != 1.0:
        v = v * (1.0 / multiplier)
    return round_to_e2m1(v)


def _elements_for_exponent(xb: torch.Tensor, e: torch.Tensor, multiplier: float) -> torch.Tensor:
    return round_onto_scales(xb, exp2_int(-e).unsqueeze(-1), multiplier)


def quantize_blocks(xb: torch.Tensor, scale_rule: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks ``[..., n, B]`` (float32) -> (E2M1 values ``[..., n, B]``, int32 exponents, non-finite mask)."""
    amax = xb.abs().amax(dim=-1)
    nonfinite = ~torch.isfinite(amax)
    multiplier = element_multiplier(scale_rule)
    e = shared_exponent(torch.where(nonfinite, 0.0, amax), scale_rule)
    q = _elements_for_exponent(xb, e, multiplier)
    if scale_rule == "mse":
        # Our rule: also try one exponent up (halves the resolution, removes the clipping) and keep
        # whichever reconstructs the block with the smaller squared error.
        e_up = torch.clamp(e + 1, max=E8M0_MAX_EXP)
        q_up = _elements_for_exponent(xb, e_up, multiplier)
        err = (xb - q * exp2_int(e).unsqueeze(-1)).square().sum(-1)
        err_up = (xb - q_up * exp2_int(e_up).unsqueeze(-1)).square().sum(-1)
        take_up = err_up < err
        e = torch.where(take_up, e_up, e)
        q = torch.where(take_up.unsqueeze(-1), q_up, q)
    return q, e, nonfinite


def mxfp4_quantize(x: torch.Tensor, block_size: int = 32, scale_rule: str = "floor") -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> (packed codes uint8 ``[..., K/2]``, E8M0 scales uint8 ``[..., K/block_size]``)."""
    check_scale_rule(scale_rule)
    xb = _to_blocks(x, block_size)
    q, e, nonfinite = quantize_blocks(xb, scale_rule)
    codes = e2m1_to_code(q).reshape(*x.shape)
    return pack_uint4(codes), exponent_to_e8m0(e, nonfinite)


def mxfp4_dequantize(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    block_size: int = 32,
    scale_rule: str = "floor",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`mxfp4_quantize`: ``q * 2^e * m`` in float32, returned as ``dtype``."""
    codes = unpack_uint4(qdata)
    values = code_to_e2m1(codes).reshape(*scale.shape, block_size)
    block_scale = exp2_int(torch.clamp(e8m0_to_exponent(scale), max=E8M0_MAX_EXP))
    multiplier = element_multiplier(scale_rule)
    if multiplier != 1.0:
        block_scale = block_scale * multiplier
    block_scale = torch.where(scale == E8M0_NAN, float("nan"), block_scale)
    out = values * block_scale.unsqueeze(-1)
    return out.reshape(*qdata.shape[:-1], qdata.shape[-1] * 2).to(dtype)


def mxfp4_fake_quantize(x: torch.Tensor, block_size: int = 32, scale_rule: str = "floor") -> torch.Tensor:
    """``dequantize(quantize(x))`` without materialising codes: the emulated activation path.

    Equal bit for bit to the round trip through codes (tested); returns ``x.dtype``.
    """
    check_scale_rule(scale_rule)
    xb = _to_blocks(x, block_size)
    q, e, nonfinite = quantize_blocks(xb, scale_rule)
    block_scale = exp2_int(e)
    multiplier = element_multiplier(scale_rule)
    if multiplier != 1.0:
        block_scale = block_scale * multiplier
    block_scale = torch.where(nonfinite, float("nan"), block_scale)
    return (q * block_scale.unsqueeze(-1)).reshape(x.shape).to(x.dtype)
