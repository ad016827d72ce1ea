"""Hardware MXFP4 GEMM on NVIDIA Blackwell (sm_100 and newer): ``F.scaled_mm`` on FP4 codes.

Our packed codes are ``torch.float4_e2m1fn_x2``'s layout (first element in the low nibble,
``mx/packing.py``) and our scales are E8M0 bytes, so a W4A4 linear needs no repacking: the activation
``Q_a(x R)`` is quantized to codes (``MXFP4ActivationTensor``), both scale matrices are rearranged into
cuBLAS's swizzled 128 x 4 tiles (torchao's ``to_blocked``), and
``y = F.scaled_mm(a, w^T, BlockWise1x32 scales) * m_a * m_w`` (``m`` = the scale rule's global element
multiplier, 4/3 for ``fp_quant``, else 1), accumulated in float32 by the tensor cores. The emulation
computes the same products in float32 (bfloat16 operands are exact), so results agree to accumulation
order and the bfloat16 output rounding (the GEMM writes bfloat16, as in torchao's MX inference path).

Used by weights whose ``kernel_preference`` is ``hw_mxfp4`` (``TORCHAO_MX_EXT_HW_MXFP4=1`` turns ``auto``
into that): no Blackwell GPU has run this code yet (this project's CI has no GPU);
``benchmarks/gpu_check.py`` compares it against the emulation and times it where one exists.
Hopper (sm_90) has no MXFP4 tensor-core instruction: there the emulation runs (Inductor's Triton
kernels for rotate+quantize and weight decode, cuBLAS for the GEMM).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ..mx import element_multiplier

__all__ = ["ENV_FLAG", "applies", "hardware_available", "mxfp4_scaled_mm"]

ENV_FLAG = "TORCHAO_MX_EXT_HW_MXFP4"


def hardware_available(device: torch.device) -> bool:
    """A CUDA device with MXFP4 tensor cores (compute capability >= 10.0) and a torch that has the FP4 dtype."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "float4_e2m1fn_x2"):
        return False
    return torch.cuda.get_device_capability(device) >= (10, 0) and hasattr(F, "scaled_mm")


def applies(weight, x: torch.Tensor) -> bool:
    """Whether ``RotatedMXFP4Tensor.linear`` can run its input ``x`` (only its device counts) through the
    hardware GEMM: W4A4, 32-element blocks, a 2-D weight, on an MXFP4-capable GPU (the caller decides
    by the weight's kernel preference whether it should)."""
    return (
        x.device.type == "cuda"  # first: every CPU linear call passes here
        and weight.act_scale_rule is not None
        and weight.block_size == 32
        and weight.qdata.dim() == 2
        and hardware_available(x.device)
    )


def mxfp4_scaled_mm(
    a_qdata: torch.Tensor,
    a_scale: torch.Tensor,
    a_rule: str,
    w_qdata: torch.Tensor,
    w_scale: torch.Tensor,
    w_rule: str,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``Q(a) Q(w)^T (+ bias)`` from codes ``[M, K/2]`` / ``[N, K/2]`` (uint8) and E8M0 scales
    ``[M, K/32]`` / ``[N, K/32]`` (uint8), in ``out_dtype``."""
    from torch.nn.functional import ScalingType, SwizzleType
    from torchao.prototype.mx_formats.utils import to_blocked

    y = F.scaled_mm(
        a_qdata.contiguous().view(torch.float4_e2m1fn_x2),
        w_qdata.contiguous().view(torch.float4_e2m1fn_x2).t(),
        scale_a=to_blocked(a_scale.view(torch.float8_e8m0fnu)),
        scale_recipe_a=ScalingType.BlockWise1x32,
        scale_b=to_blocked(w_scale.view(torch.float8_e8m0fnu)),
        scale_recipe_b=ScalingType.BlockWise1x32,
        swizzle_a=SwizzleType.SWIZZLE_32_4_4,
        swizzle_b=SwizzleType.SWIZZLE_32_4_4,
        output_dtype=torch.bfloat16,  # what torchao's MX inference path uses with FP4
    )
    alpha = element_multiplier(a_rule) * element_multiplier(w_rule)
    if alpha != 1.0 or bias is not None or out_dtype != torch.bfloat16:
        y = y.float() * alpha
        y = y if bias is None else y + bias.float()
    return y.to(out_dtype)
