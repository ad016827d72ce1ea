"""MXFP4 codes + E8M0 scales -> a dense bfloat16 / float32 tensor on CPU, bit-equal to the pure-torch
:func:`torchao_mx_ext.mx.mxfp4_dequantize` (``mxfp4_dequantize.cpp`` beside this file).

Many-row linears on CPUs with fast float GEMMs (oneDNN on AMX / AVX-512 BF16 for bfloat16, MKL for
float32) run fastest as "decode the weight once per call, then the library GEMM": the decoded weight
is a transient buffer, not the dense cache (``cache_dequantized_weights``), so the model keeps its
4.25-bit footprint. The pure-torch decode takes several passes over the tensor and costs more than the
GEMM itself; this kernel writes each output once (a table lookup of the code's bfloat16 bits and an
add to the exponent field, 32 values at a time on AVX-512, 16 on AVX2; see the .cpp for why that is
exact). Inductor's fused kernel for the pure-torch decode is no match either: on an AVX2 CPU (Zen 3, one
thread, ad-hoc timings) a 1536 x 576 weight took 8.8-9.1 ms there, 1.1 ms in this kernel's scalar loop
and 0.23 ms in its AVX2 path.

Where the library GEMM wins (:func:`prefers_dense_gemm`): on AVX-512 CPUs (:data:`DENSE_FIRST`) beyond
:data:`FUSED_ROWS` rows; on AVX2 CPUs beyond the fused kernels' ranges (the dequant-GEMV's
``MAX_ROWS`` for weight-only linears, the integer GEMM's ``MAX_ROWS`` for W4A4), which is where the
linear's own routing hands them over.

The operator ``torch.ops.torchao_mx_ext.mxfp4_dequantize`` has a fake kernel (``torch.compile`` and
``torch.export`` keep it as one call) and a pure-torch fallback that builds the C++ library
(:mod:`.cpu_extension`) on its first call.
"""

from __future__ import annotations

import torch

from ..mx.e8m0 import element_multiplier
from ..mx.quantize import mxfp4_dequantize as reference_mxfp4_dequantize
from . import cpu_extension

__all__ = ["DENSE_FIRST", "FUSED_ROWS", "VECTORIZED", "applies", "mxfp4_dequantize", "prefers_dense_gemm", "reference_mxfp4_dequantize", "set_isa"]

OP = "torchao_mx_ext::mxfp4_dequantize"
DTYPES = (torch.float32, torch.bfloat16)
# Whether the kernel has a vectorised path here (AVX2 or AVX-512, by ATen's CPU capability, which also
# picks the kernel's path). Read once at import, so compiled graphs see a constant.
VECTORIZED = cpu_extension.VECTORIZED
# AVX-512 CPUs, whose library GEMMs (oneDNN bf16 on AMX / AVX512-BF16, MKL float32) beat the fused
# kernels from a few rows on: W4A4 runs no integer GEMM there, and many-row linears decode + GEMM.
DENSE_FIRST = cpu_extension.ATEN_AVX512
# There, linears of more rows than this decode the weight and run the library GEMM; up to it the
# fused kernels (dequant-GEMV, integer GEMM) are faster. benchmarks/w4a4_gemm_bench.py on an AMX CPU
# (Xeon family 6 model 207, 2 threads, SmolLM2's shapes), decode + bf16 GEMM against the faster fused
# kernel: 0.2x at one row, 0.4-0.8x at 8, 1.2-2.3x at 64 (and 1.4-2x at 16, a one-off timing); against
# the integer GEMM 3.6-8x at 512 rows.
FUSED_ROWS = 8

_lib = torch.library.Library("torchao_mx_ext", "FRAGMENT")
_lib.define("mxfp4_dequantize(Tensor qdata, Tensor scale, int block_size, ScalarType dtype) -> Tensor")


@torch.library.register_fake(OP, lib=_lib)
def _fake_mxfp4_dequantize(qdata, scale, block_size, dtype):
    return qdata.new_empty((*qdata.shape[:-1], qdata.shape[-1] * 2), dtype=dtype)


@torch.library.impl(_lib, "mxfp4_dequantize", "CompositeExplicitAutograd")
def _fallback_mxfp4_dequantize(qdata, scale, block_size, dtype):
    # Reached only while the C++ kernel is not registered (or off the CPU): build it once, then
    # redispatch to it; without it, the same numbers in pure torch.
    if qdata.device.type == "cpu" and cpu_extension.is_available():
        return torch.ops.torchao_mx_ext.mxfp4_dequantize.default(qdata, scale, block_size, dtype)
    return reference_mxfp4_dequantize(qdata, scale, block_size, "floor", dtype)


def applies(qdata: torch.Tensor, block_size: int, scale_rule: str, dtype: torch.dtype) -> bool:
    """Whether the kernel can decode these codes: CPU, blocks of a multiple of 32, plain E8M0 scales
    (not ``fp_quant``'s 4/3 element factor), a float32 or bfloat16 result, and the C++ library not
    known to be unavailable (the build is tried on the operator's first call)."""
    if qdata.device.type != "cpu" or block_size % 32 or dtype not in DTYPES:
        return False
    return element_multiplier(scale_rule) == 1.0 and not cpu_extension.known_unavailable()


def prefers_dense_gemm(weight, x: torch.Tensor) -> bool:
    """Whether a CPU linear of ``x`` (``[..., K_p]``) against the MXFP4 ``weight`` should leave the
    fused kernels for a decoded (or cached) weight and the library GEMM: an AVX-512 CPU
    (:data:`DENSE_FIRST`), more than :data:`FUSED_ROWS` rows, and the weight decodable by this kernel
    (or cached dense). Elsewhere each fused kernel hands over beyond its own row limit."""
    if not DENSE_FIRST or x.device.type != "cpu" or x.numel() <= FUSED_ROWS * x.shape[-1]:
        return False
    if weight.dequantized is not None:
        return True
    if weight.kernel_preference == "emulated" or weight.qdata.dim() != 2:
        return False
    return applies(weight.qdata, weight.block_size, weight.scale_rule, torch.float32)


def mxfp4_dequantize(qdata: torch.Tensor, scale: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``q * 2^(e - 127)`` (NaN for scale byte 255) for codes ``[..., K/2]`` and scales
    ``[..., K/block_size]`` -> ``[..., K]`` in ``dtype`` (float32 or bfloat16)."""
    return torch.ops.torchao_mx_ext.mxfp4_dequantize(qdata, scale, block_size, dtype)


def set_isa(isa: int | None) -> int:
    """Test hook: cap the kernel's code path (0 scalar, 1 AVX2, 2 AVX-512; ``None`` = the best the CPU and
    ``ATEN_CPU_CAPABILITY`` allow). Returns the path now in use."""
    if not cpu_extension.is_available():
        raise RuntimeError("the CPU MXFP4 kernels are not available")
    return torch.ops.torchao_mx_ext._mxfp4_dequantize_set_isa(-1 if isa is None else isa)
