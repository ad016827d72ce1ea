"""Fused MXFP4 weight-only GEMV for CPUs: the packed weight is decoded inside the reduction.

Decoding is memory-bound: at small batch (decode, a few rows) a linear reads its whole weight once
per call, and an MXFP4 weight is 4.25 bits per parameter against bf16's 16. The pure-torch path
(:func:`torchao_mx_ext.mx.mxfp4_dequantize` then ``F.linear``) writes and re-reads a dense weight on
every call, and Inductor's fusion of decode + multiply + sum into one reduction is far slower than a
bf16 ``F.linear`` (``benchmarks/gemv_bench.py``), so this is a C++ kernel: ``mxfp4_gemv.cpp`` beside this file,
built on first use (:mod:`.cpu_extension`) and registered as the CPU kernel of
``torch.ops.torchao_mx_ext.mxfp4_gemv``.

The operator itself is defined here, at import, with a fake kernel (so ``torch.compile(fullgraph=True)``
keeps it as one extern call) and a pure-torch ``CompositeExplicitAutograd`` kernel that builds the
extension on its first call and otherwise computes the same numbers with ``mxfp4_dequantize`` +
``F.linear``. So a traced graph does not depend on whether this process could build the kernel
(Inductor's and AOTAutograd's on-disk caches do not see that): at worst it runs the fallback.

Numbers: every decoded weight equals ``mxfp4_dequantize``'s float32 value; ``x`` is widened to
float32 from the dtype the caller passes (``RotatedMXFP4Tensor.linear`` passes it already rounded to
its GEMM dtype, so bf16 inputs are rounded to bf16 first exactly as for the bf16 GEMM); products and
sums are float32 (the summation order differs from oneDNN/MKL's), the bias is added in float32 and the
result is rounded once to ``out_dtype``. A bf16 oneDNN GEMM also accumulates in float32 and rounds
its output once, so against the existing path only the summation order (float32 rounding) differs.

The input side of a W4A4 linear can run in the same call (``rotation``, ``act_scale_rule``): the
input is rotated and MX-quantized by the quantizer kernel's row function (the bits of
:func:`.cpu_mxfp4_quantize.rotate_and_quantize`), then multiplied. A decode-step W4A4 linear is then
one operator call (:func:`.cpu_mxfp4_quantize.fuses_into_gemv`).

If the build fails (no compiler, no ninja) one warning is logged and :func:`applies` turns false, so
linears keep the dequantize path. ``TORCHAO_MX_EXT_CPU_KERNELS=0`` turns the CPU kernels off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mx.e8m0 import element_multiplier
from ..mx.quantize import mxfp4_dequantize
from ..mx.quantize import mxfp4_fake_quantize as reference_mxfp4_fake_quantize
from ..rotation.rotations import apply_block_rotation
from . import cpu_extension, cpu_mxfp4_dequantize

__all__ = ["MAX_ROWS", "PANELS", "applies", "integer_calls", "is_available", "mxfp4_gemv", "mxfp4_gemv_group", "reference_mxfp4_gemv", "set_isa"]

OP = "torchao_mx_ext::mxfp4_gemv"
GROUP_OP = "torchao_mx_ext::mxfp4_gemv_group"
# Largest number of rows (M = x.numel() / K) sent to the kernel. The kernel re-decodes the weight for
# every 4 rows, so its time grows with M; the path it replaces decodes the whole weight first, and the
# crossover against that lies above M = 128 on AVX-512 CPUs (benchmarks/gemv_bench.py). Where the C++
# decode is vectorised (AVX-512), decode + library GEMM is faster still above FUSED_ROWS (8) rows and
# takes those (cpu_mxfp4_dequantize.prefers_dense_gemm).
MAX_ROWS = 64
# With a dense cache (``cache_dequantized_weights``) the alternative is a plain GEMM: the kernel is kept
# for batches it decodes the codes for once (its row block), where it reads a quarter of the bytes.
MAX_ROWS_CACHED = 4
# AVX-512 VNNI CPUs without AMX (ATen at AVX-512; Zen 4, Ice Lake): there the kernel's integer path runs
# more than 16 rows as a panel GEMM (mxfp4_panels.h: the weight repacked once per call so that
# vpdpbusd's lanes are 16 output columns) at 1.3-1.5x oneDNN's bf16 GEMM on SmolLM2's shapes from 64
# to 512 rows on a Zen 4 core, and 1.5-1.6x the decode + library GEMM route
# (benchmarks/w4a4_gemm_bench.py): W4A4 linears whose input transform runs in the kernel
# (cpu_mxfp4_quantize.fuses_into_gemv) take it at any row count, prompts included. AMX CPUs keep the
# decode + bf16 GEMM (AMX tiles multiply bf16 several times faster). Read once at import: compiled
# graphs see a constant.
PANELS = cpu_extension.ATEN_AVX512 and cpu_extension.AVX512_VNNI and not cpu_extension.AMX

_SCHEMA = (
    "mxfp4_gemv(Tensor x, Tensor qdata, Tensor scale, int block_size, float multiplier, Tensor? bias=None, "
    "ScalarType? out_dtype=None, Tensor? rotation=None, str? act_scale_rule=None) -> Tensor"
)
_GROUP_SCHEMA = (
    "mxfp4_gemv_group(Tensor x, Tensor[] qdata, Tensor[] scale, int block_size, float multiplier, Tensor?[] bias, "
    "ScalarType? out_dtype, Tensor?[] rotation, str? act_scale_rule=None) -> Tensor[]"
)
_lib = torch.library.Library("torchao_mx_ext", "FRAGMENT")
_lib.define(_SCHEMA)
_lib.define(_GROUP_SCHEMA)


@torch.library.register_fake(OP, lib=_lib)
def _fake_mxfp4_gemv(x, qdata, scale, block_size, multiplier, bias=None, out_dtype=None, rotation=None, act_scale_rule=None):
    torch._check(x.shape[-1] == qdata.shape[1] * 2, lambda: "mxfp4_gemv: x and the weight differ in width")
    return x.new_empty((*x.shape[:-1], qdata.shape[0]), dtype=out_dtype if out_dtype is not None else x.dtype)


def reference_mxfp4_gemv(x, qdata, scale, block_size, multiplier, bias=None, out_dtype=None, rotation=None, act_scale_rule=None):
    """The operator in pure torch (the input transform, float32 dequantize + float32 ``F.linear``), its fallback."""
    out_dtype = out_dtype if out_dtype is not None else x.dtype
    if rotation is not None:
        x = apply_block_rotation(x.to(torch.float32), rotation)
    if act_scale_rule is not None:
        x = reference_mxfp4_fake_quantize(x.to(torch.float32), block_size, act_scale_rule)
    w = mxfp4_dequantize(qdata, scale, block_size, "floor", torch.float32)
    if multiplier != 1.0:
        w = w * multiplier  # q 2^e is exact: the same float32 value as q * (2^e * multiplier)
    y = F.linear(x.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    return y.to(out_dtype)


@torch.library.impl(_lib, "mxfp4_gemv", "CompositeExplicitAutograd")
def _fallback_mxfp4_gemv(x, qdata, scale, block_size, multiplier, bias=None, out_dtype=None, rotation=None, act_scale_rule=None):
    # Reached only while the C++ CPU kernel is not registered (or off the CPU): build it once, then
    # redispatch to it; without it, compute the same numbers in pure torch.
    args = (x, qdata, scale, block_size, multiplier, bias, out_dtype, rotation, act_scale_rule)
    if x.device.type == "cpu" and qdata.device.type == "cpu" and is_available():
        return torch.ops.torchao_mx_ext.mxfp4_gemv.default(*args)
    return reference_mxfp4_gemv(*args)


@torch.library.register_fake(GROUP_OP, lib=_lib)
def _fake_mxfp4_gemv_group(x, qdata, scale, block_size, multiplier, bias, out_dtype, rotation, act_scale_rule=None):
    torch._check(len(qdata) == len(scale) == len(bias) == len(rotation), lambda: "mxfp4_gemv_group: lists of different lengths")
    return [
        _fake_mxfp4_gemv(x, q, s, block_size, multiplier, b, out_dtype, r, act_scale_rule)
        for q, s, b, r in zip(qdata, scale, bias, rotation)
    ]


@torch.library.impl(_lib, "mxfp4_gemv_group", "CompositeExplicitAutograd")
def _fallback_mxfp4_gemv_group(x, qdata, scale, block_size, multiplier, bias, out_dtype, rotation, act_scale_rule=None):
    if x.device.type == "cpu" and all(q.device.type == "cpu" for q in qdata) and is_available():
        return torch.ops.torchao_mx_ext.mxfp4_gemv_group.default(x, qdata, scale, block_size, multiplier, bias, out_dtype, rotation, act_scale_rule)
    return [
        reference_mxfp4_gemv(x, q, s, block_size, multiplier, b, out_dtype, r, act_scale_rule)
        for q, s, b, r in zip(qdata, scale, bias, rotation)
    ]


def is_available() -> bool:
    """Whether the C++ kernel is loaded; builds it on the first call (:mod:`.cpu_extension`)."""
    return cpu_extension.is_available()


def applies(weight, x: torch.Tensor, fused_input: bool = False) -> bool:
    """Whether ``RotatedMXFP4Tensor.linear`` should use the kernel for ``x`` (already rotated,
    ``[..., K_p]``) against ``weight``: CPU, 2-D weight, blocks of a multiple of 32, at most
    :data:`MAX_ROWS` rows (:data:`MAX_ROWS_CACHED` with a dense cache) and not more than the vectorised
    weight decode + library GEMM is faster for (:func:`.cpu_mxfp4_dequantize.prefers_dense_gemm`), no
    gradient needed (the kernel has no backward), and the kernel not known to be unavailable (the build is tried on the operator's
    first call). ``fused_input``: the kernel quantizes the input itself (a W4A4 input transform,
    :func:`.cpu_mxfp4_quantize.fuses_into_gemv`), so its integer path runs: with :data:`PANELS` (and no
    dense cache) any number of rows then."""
    if cpu_extension.known_unavailable():
        return False
    if x.device.type != "cpu" or weight.qdata.device.type != "cpu" or weight.qdata.dim() != 2:
        return False
    if weight.block_size % 32 or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if fused_input and PANELS and weight.dequantized is None:
        return True
    if x.numel() > (MAX_ROWS if weight.dequantized is None else MAX_ROWS_CACHED) * x.shape[-1]:
        return False
    return not cpu_mxfp4_dequantize.prefers_dense_gemm(weight, x)


def mxfp4_gemv(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    block_size: int,
    scale_rule: str,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    rotation: torch.Tensor | None = None,
    act_scale_rule: str | None = None,
) -> torch.Tensor:
    """``x @ mxfp4_dequantize(qdata, scale, block_size, scale_rule).T + bias`` in one pass over the
    packed weight (``x [..., K]``, ``qdata [N, K/2]``, ``scale [N, K/block_size]``) -> ``[..., N]``
    in ``out_dtype`` (default ``x.dtype``). Builds the kernel on first use (pure torch without it).

    With ``rotation`` (the float32 ``b x b`` block of ``R``) and/or ``act_scale_rule`` the input side of
    a W4A4 linear runs in the same call: ``x`` is replaced by ``Q_a(x R)`` in float32 (MX blocks of
    ``block_size``), the bits of :func:`.cpu_mxfp4_quantize.rotate_and_quantize`'s kernel."""
    return torch.ops.torchao_mx_ext.mxfp4_gemv(
        x, qdata, scale, block_size, element_multiplier(scale_rule), bias, out_dtype, rotation, act_scale_rule
    )


def mxfp4_gemv_group(x, qdata, scale, block_size, scale_rule, bias=None, out_dtype=None, rotation=None, act_scale_rule=None):
    """:func:`mxfp4_gemv` of one input ``x`` against several weights (lists ``qdata``, ``scale``; ``bias``
    and ``rotation`` lists or ``None`` for all), in one operator call: the linears that read one
    activation (q/k/v, gate/up). The input is transformed and laid out once per distinct rotation
    (weights of one config share it), so the results are those of separate calls, bit for bit."""
    n = len(qdata)
    bias = [None] * n if bias is None else list(bias)
    rotation = [None] * n if rotation is None else list(rotation)
    return torch.ops.torchao_mx_ext.mxfp4_gemv_group(
        x, list(qdata), list(scale), block_size, element_multiplier(scale_rule), bias, out_dtype, rotation, act_scale_rule
    )


def set_isa(isa: int | None) -> int:
    """Test hook: cap the kernel's code path (0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 with
    BF16 dot products for bf16 inputs; ``None`` = the best the
    CPU and ``ATEN_CPU_CAPABILITY`` allow). Returns the path now in use."""
    if not is_available():
        raise RuntimeError("the fused CPU MXFP4 GEMV kernel is not available")
    return torch.ops.torchao_mx_ext._mxfp4_gemv_set_isa(-1 if isa is None else isa)


def integer_calls() -> int:
    """Test hook: how many inputs so far took the kernel's integer path (AVX2; inputs whose every
    32-element chunk is an integer multiple of one power of two, as MX fake-quantized activations are):
    one per :func:`mxfp4_gemv` call, one per distinct rotation in a :func:`mxfp4_gemv_group` call."""
    if not is_available():
        raise RuntimeError("the fused CPU MXFP4 GEMV kernel is not available")
    return torch.ops.torchao_mx_ext._mxfp4_gemv_integer_calls()
