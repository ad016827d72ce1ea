"""Exact MXFP4 x MXFP4 GEMM for CPUs (W4A4) on integer dot products.

In a W4A4 linear both operands of every 32-element chunk are E2M1 values ``q`` on power-of-two
block scales, and ``2 q`` is an integer in [-12, 12]. A chunk's dot product is therefore exact in
int8 x int8 -> int32, and the whole product is

    y[m, n] = sum_c 2^(ea[m, c] + ew[n, c] - 2) * sum_{k in c} (2 qa[m, k]) (2 qw[n, k])  (+ bias[n])

with one float32 multiply per chunk by the two block scales (exact while their product is a normal
float32) and float32 sums over chunks. This is the arithmetic llama.cpp uses for its Q8 x Q4 and
MXFP4 dot products; it reads 4.25-bit weights and does 32 multiply-adds per AVX2 instruction (64 per
AVX-512 VNNI ``vpdpbusd``), instead of decoding the weight to float and running a float GEMM. Against the float emulation
(``mxfp4_fake_quantize`` + dequantized weight + float32 ``F.linear``) every product is the same exact
number, so only the float32 summation order differs; results whose partial sums are all
representable are bit-equal (tests/kernels/test_cpu_mxfp4_mm.py checks both against float64).

``torch.ops.torchao_mx_ext.mxfp4_mm`` takes the activation's codes and scales (from
``mxfp4_quantize``, which Inductor fuses with the rotation before it) and the weight's, the same
operands as the Blackwell tensor-core path (``cuda_mxfp4_mm``). It is defined here with a fake kernel
(``torch.compile`` and ``torch.export`` keep it as one call) and a pure-torch fallback (dequantize +
``F.linear``) that builds the C++ library (``mxfp4_mm.cpp``, :mod:`.cpu_extension`) on its first call.

Where it runs (:func:`applies`): CPU, W4A4 with plain E8M0 scales on both sides (not ``fp_quant``,
whose 4/3 element factor the integer path does not apply), no gradient, a CPU with AVX2, more than
:data:`GEMV_ROWS` rows (decode steps run the dequant-GEMV on the fake-quantized input, faster there)
and at most :data:`MAX_ROWS` (beyond, the vectorised weight decode + the float32 library GEMM is
faster), and not on AVX-512 CPUs, where that decode + GEMM is faster for many rows and the GEMV for few
(:mod:`.cpu_mxfp4_dequantize`). On a
CPU without AVX2 the scalar integer loop would be slower than the float emulation, so W4A4 linears keep
the emulation there and one log line says so.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..mx.quantize import mxfp4_dequantize
from . import cpu_extension, cpu_mxfp4_dequantize, cpu_mxfp4_gemv

__all__ = ["GEMV_ROWS", "MAX_ROWS", "applies", "mxfp4_mm", "reference_mxfp4_mm", "set_isa", "takes_weight"]

logger = logging.getLogger(__name__)

OP = "torchao_mx_ext::mxfp4_mm"
# Up to this many rows the dequant-GEMV on the fake-quantized input is faster where it applies
# (benchmarks/w4a4_gemm_bench.py, AVX2: 1.4-1.7x at one row, about even at 32): decode steps take it.
GEMV_ROWS = 8
# Beyond this many rows the weight decode (mxfp4_dequantize, AVX2) + the float32 library GEMM on the
# fake-quantized input is faster: benchmarks/w4a4_gemm_bench.py on an AVX2 CPU (Zen 3, one thread,
# SmolLM2's shapes; benchmarks/results/w4a4_gemm_bench_avx2.json), integer GEMM time / decode + GEMM
# time: 0.68-0.90 at 16 rows, 0.61-1.06 at 64, 1.14-1.21 at 128, 1.22-1.42 at 256, 1.23-1.36 at 512.
# (Chosen when the decode had only its scalar loop: 0.95-1.04 at 128; with the AVX2 decode the
# crossover lies between 64 and 128.) A 32-element chunk costs the integer path a sign, a multiply-add
# pair, a conversion and a scaled FMA per output; the float GEMM, 4 FMAs.
MAX_ROWS = 128
_SIMD_CAPABILITIES = ("AVX2", "AVX512")  # torch.backends.cpu.get_cpu_capability() values with AVX2

_lib = torch.library.Library("torchao_mx_ext", "FRAGMENT")
_lib.define(
    "mxfp4_mm(Tensor a_qdata, Tensor a_scale, Tensor w_qdata, Tensor w_scale, int block_size, Tensor? bias=None, "
    "ScalarType? out_dtype=None) -> Tensor"
)


@torch.library.register_fake(OP, lib=_lib)
def _fake_mxfp4_mm(a_qdata, a_scale, w_qdata, w_scale, block_size, bias=None, out_dtype=None):
    torch._check(a_qdata.shape[-1] == w_qdata.shape[1], lambda: "mxfp4_mm: the activation and the weight differ in width")
    return a_qdata.new_empty((*a_qdata.shape[:-1], w_qdata.shape[0]), dtype=out_dtype or torch.float32)


def reference_mxfp4_mm(a_qdata, a_scale, w_qdata, w_scale, block_size, bias=None, out_dtype=None):
    """The operator in pure torch (both operands dequantized to float32, float32 ``F.linear``)."""
    a = mxfp4_dequantize(a_qdata, a_scale, block_size, "floor", torch.float32)
    w = mxfp4_dequantize(w_qdata, w_scale, block_size, "floor", torch.float32)
    y = F.linear(a, w, None if bias is None else bias.to(torch.float32))
    return y.to(out_dtype or torch.float32)


@torch.library.impl(_lib, "mxfp4_mm", "CompositeExplicitAutograd")
def _fallback_mxfp4_mm(a_qdata, a_scale, w_qdata, w_scale, block_size, bias=None, out_dtype=None):
    # Reached only while the C++ kernel is not registered (or off the CPU): build it once, then
    # redispatch to it; without it, compute the same numbers in pure torch.
    if a_qdata.device.type == "cpu" and w_qdata.device.type == "cpu" and cpu_extension.is_available():
        return torch.ops.torchao_mx_ext.mxfp4_mm.default(a_qdata, a_scale, w_qdata, w_scale, block_size, bias, out_dtype)
    return reference_mxfp4_mm(a_qdata, a_scale, w_qdata, w_scale, block_size, bias, out_dtype)


_said_no_simd = False


def _cpu_has_simd() -> bool:
    global _said_no_simd
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in _SIMD_CAPABILITIES:
        return True
    if not _said_no_simd:
        _said_no_simd = True
        logger.info(
            "CPU capability %s (no AVX2): W4A4 MXFP4 linears keep the float emulation instead of the integer GEMM",
            capability,
        )
    return False


def takes_weight(weight) -> bool:
    """Whether W4A4 linears with this weight run the integer GEMM (on suitable inputs, see
    :func:`applies`): plain E8M0 scales on both operands, blocks of a multiple of 32, a 2-D CPU
    weight, not the ``emulated`` preference, AVX2 but not AVX-512 (AVX-512 CPUs run many-row linears
    as decode + library GEMM, faster: :data:`.cpu_mxfp4_dequantize.DENSE_FIRST`), and the C++ library
    not known to be unavailable."""
    if weight.act_scale_rule is None or "fp_quant" in (weight.scale_rule, weight.act_scale_rule):
        return False
    if weight.kernel_preference == "emulated" or weight.block_size % 32:
        return False
    if weight.qdata.device.type != "cpu" or weight.qdata.dim() != 2 or cpu_extension.known_unavailable():
        return False
    return not cpu_mxfp4_dequantize.DENSE_FIRST and _cpu_has_simd()


def applies(weight, x: torch.Tensor) -> bool:
    """Whether ``RotatedMXFP4Tensor.linear`` should run its input ``x`` (``[..., K]`` or rotated
    ``[..., K_p]``: only its rows, device and gradient flag count) through
    the integer GEMM: :func:`takes_weight`, a CPU input, no gradient needed (the kernel has no
    backward), more than :data:`GEMV_ROWS` rows unless the GEMV cannot take them, and at most
    :data:`MAX_ROWS`. The build is tried on the operator's first call."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    if x.numel() <= GEMV_ROWS * x.shape[-1] and cpu_mxfp4_gemv.applies(weight, x):
        return False
    return takes_weight(weight)


def mxfp4_mm(
    a_qdata: torch.Tensor,
    a_scale: torch.Tensor,
    w_qdata: torch.Tensor,
    w_scale: torch.Tensor,
    block_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dequantize(a) @ dequantize(w).T + bias`` for MXFP4 codes + E8M0 scales (``a_qdata [..., K/2]``,
    ``a_scale [..., K/block_size]``, ``w_qdata [N, K/2]``, ``w_scale [N, K/block_size]``) -> ``[..., N]``
    in ``out_dtype`` (default float32), on exact integer chunk dot products."""
    return torch.ops.torchao_mx_ext.mxfp4_mm(a_qdata, a_scale, w_qdata, w_scale, block_size, bias, out_dtype)


def set_isa(isa: int | None) -> int:
    """Test hook: cap the kernel's code path (0 scalar, 1 AVX2, 2 AVX-512 VNNI; ``None`` = the best the CPU and
    ``ATEN_CPU_CAPABILITY`` allow). Returns the path now in use."""
    if not cpu_extension.is_available():
        raise RuntimeError("the CPU MXFP4 kernels are not available")
    return torch.ops.torchao_mx_ext._mxfp4_mm_set_isa(-1 if isa is None else isa)
