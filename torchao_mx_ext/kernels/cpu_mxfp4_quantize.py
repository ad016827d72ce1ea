"""MXFP4 quantize-dequantize of float32 activations on CPU in one pass (``mxfp4_fake_quantize.cpp``).

Every W4A4 linear quantizes its rotated input on every call. Inductor compiles the pure-torch
:func:`torchao_mx_ext.mx.mxfp4_fake_quantize` (block amax, exponent from the bits, E2M1 rounding, and
for ``mse`` a second candidate) into a kernel that ran at about 0.25 G elements/s on an AVX-512 CPU:
at a 512-token prefill of SmolLM2-135M the activation quantizers took more time than all the GEMMs.
This kernel makes the same float32 operations, 16 lanes at a time.

Numbers: bit-equal to the pure-torch function for ``floor``, ``even`` and ``rceil``; for ``mse`` a
block whose two candidates' squared errors agree to float32 rounding may take the other candidate
(both are valid; the summation order differs, as it does between eager torch and Inductor). Not for
``fp_quant`` (its 4/3 grid), not under autograd (no backward).

The operator ``torch.ops.torchao_mx_ext.mxfp4_fake_quantize`` has a fake kernel (``torch.compile``
and ``torch.export`` keep it as one call) and a pure-torch fallback that builds the C++ library
(:mod:`.cpu_extension`) on its first call. Linears use it where it is vectorised (:data:`VECTORIZED`:
AVX2 or AVX-512); elsewhere Inductor's fused kernel stays. On AVX2 CPUs W4A4 linears of 9 to 128 rows
take the integer GEMM, whose activation codes Inductor makes; the kernel serves the other row counts
(decode steps, prompts) and weight-only rotations (:func:`applies`).

``torch.ops.torchao_mx_ext.mxfp4_rotate_fake_quantize`` puts the online block rotation in the same pass:
``Q(pad(x) R)`` with ``R = diag(b x b block, ...)`` (``b`` a multiple of 16 up to
:data:`MAX_FUSED_ROTATION`), or the rotation alone for weight-only linears (``scale_rule="none"``).
For one row (a decode step) a rotation matmul ``[1, K/32, 32] @ [32, 32]`` and the quantizer cost
about 23 us together, the fused call 8-10 us (``benchmarks/activation_quant_bench.py``, one thread);
at 512 rows the two are equal. :func:`rotate_and_quantize` is the one call that replaces both. Numbers: each rotated value is one float32 FMA chain over its
block's rows (bit-equal between the kernel's scalar and AVX-512 paths); torch's matmul sums in
another order, so against the unfused path a value may differ in its last bit and, rarely, an
activation on a rounding boundary then takes the neighbouring E2M1 step. Eager and compiled models
both call the operator, so they still agree with each other bit for bit.
"""

from __future__ import annotations

import torch

from ..mx.quantize import mxfp4_fake_quantize as reference_mxfp4_fake_quantize
from ..rotation.rotations import apply_block_rotation, pad_and_rotate
from . import cpu_extension, cpu_mxfp4_dequantize, cpu_mxfp4_mm

__all__ = [
    "MAX_FUSED_ROTATION", "RULES", "VECTORIZED", "applies", "fake_quantize", "fuses_into_gemv", "takes_rotation", "mxfp4_fake_quantize", "mxfp4_rotate_fake_quantize",
    "reference_mxfp4_fake_quantize", "rotate_and_quantize", "rotation_applies", "set_isa",
]

OP = "torchao_mx_ext::mxfp4_fake_quantize"
ROTATE_OP = "torchao_mx_ext::mxfp4_rotate_fake_quantize"
RULES = ("floor", "even", "rceil", "mse")
# Whether the kernel has a SIMD path here (AVX2 + FMA or AVX-512, by ATen's CPU capability, which also
# picks the kernel's path). Read once at import, so compiled graphs see a constant.
VECTORIZED = cpu_extension.VECTORIZED
MAX_FUSED_ROTATION = 256  # the kernel's kMaxRotation; wider (global) rotations stay a library matmul

_lib = torch.library.Library("torchao_mx_ext", "FRAGMENT")
_lib.define("mxfp4_fake_quantize(Tensor x, int block_size, str scale_rule) -> Tensor")
_lib.define("mxfp4_rotate_fake_quantize(Tensor x, Tensor rotation, int block_size, str scale_rule) -> Tensor")


@torch.library.register_fake(OP, lib=_lib)
def _fake_mxfp4_fake_quantize(x, block_size, scale_rule):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.impl(_lib, "mxfp4_fake_quantize", "CompositeExplicitAutograd")
def _fallback_mxfp4_fake_quantize(x, block_size, scale_rule):
    # Reached only while the C++ kernel is not registered (or off the CPU): build it once, then
    # redispatch to it; without it, the same numbers in pure torch.
    if x.device.type == "cpu" and cpu_extension.is_available():
        return torch.ops.torchao_mx_ext.mxfp4_fake_quantize.default(x, block_size, scale_rule)
    return reference_mxfp4_fake_quantize(x, block_size, scale_rule)


@torch.library.register_fake(ROTATE_OP, lib=_lib)
def _fake_mxfp4_rotate_fake_quantize(x, rotation, block_size, scale_rule):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.impl(_lib, "mxfp4_rotate_fake_quantize", "CompositeExplicitAutograd")
def _fallback_mxfp4_rotate_fake_quantize(x, rotation, block_size, scale_rule):
    if x.device.type == "cpu" and cpu_extension.is_available():
        return torch.ops.torchao_mx_ext.mxfp4_rotate_fake_quantize.default(x, rotation, block_size, scale_rule)
    xr = apply_block_rotation(x, rotation.to(x.dtype))
    return xr if scale_rule == "none" else reference_mxfp4_fake_quantize(xr, block_size, scale_rule)


def applies(x: torch.Tensor, block_size: int, scale_rule: str | None) -> bool:
    """Whether :func:`fake_quantize` runs the kernel: a float32 CPU tensor whose width is a multiple
    of ``block_size`` (a multiple of 32), a rule of :data:`RULES` (``None``: the fused rotation alone),
    no gradient needed, the kernel vectorised here (:data:`VECTORIZED`), and the C++ library not known
    to be unavailable. In the row range where W4A4 linears run the integer GEMM (AVX2 CPUs, more
    than :data:`~.cpu_mxfp4_mm.GEMV_ROWS` and at most :data:`~.cpu_mxfp4_mm.MAX_ROWS`), inputs stay
    with Inductor: the GEMM's codes come from Inductor's kernel, which quantizes a shared input
    (``share_input_quantization``) in the same pass; this kernel would add one."""
    if not VECTORIZED or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if block_size % 32 or x.dim() == 0 or x.shape[-1] % block_size:
        return False
    if scale_rule is not None:
        if scale_rule not in RULES:
            return False
        rows = x.numel() // max(x.shape[-1], 1)
        if not cpu_mxfp4_dequantize.DENSE_FIRST and cpu_mxfp4_mm.GEMV_ROWS < rows <= cpu_mxfp4_mm.MAX_ROWS:
            return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return not cpu_extension.known_unavailable()


def mxfp4_fake_quantize(x: torch.Tensor, block_size: int, scale_rule: str) -> torch.Tensor:
    """The operator: ``dequantize(quantize(x))`` for a float32 ``x [..., K]``, in float32."""
    return torch.ops.torchao_mx_ext.mxfp4_fake_quantize(x, block_size, scale_rule)


def mxfp4_rotate_fake_quantize(x: torch.Tensor, rotation: torch.Tensor, block_size: int, scale_rule: str) -> torch.Tensor:
    """The fused operator: ``Q(x R)`` for a float32 ``x [..., K]`` and the float32 ``b x b`` block of ``R``
    (``scale_rule="none"``: ``x R``), in float32."""
    return torch.ops.torchao_mx_ext.mxfp4_rotate_fake_quantize(x, rotation, block_size, scale_rule)


def takes_rotation(rotation: torch.Tensor) -> bool:
    """Whether the C++ input transform takes this rotation block: float32, ``b`` a multiple of 16 up to
    :data:`MAX_FUSED_ROTATION`."""
    b = rotation.shape[0]
    return rotation.dtype == torch.float32 and b % 16 == 0 and b <= MAX_FUSED_ROTATION


def fuses_into_gemv(weight) -> bool:
    """Whether a W4A4 linear with this ``RotatedMXFP4Tensor`` weight hands its input side to the GEMV kernel
    (:func:`.cpu_mxfp4_gemv.mxfp4_gemv` with ``rotation`` and ``act_scale_rule``: one operator call per
    decode-step linear instead of two), with this kernel vectorised (:data:`VECTORIZED`): the GEMV's integer
    path then takes the quantized float32 input as it is. Needs a rule of :data:`RULES` and a rotation the
    fused kernel takes (float32, ``b`` a multiple of 16 up to :data:`MAX_FUSED_ROTATION`), or none."""
    if not VECTORIZED or weight.act_scale_rule not in RULES:
        return False
    if weight.rotation is not None and not takes_rotation(weight.rotation):
        return False
    return weight.kernel_preference != "emulated" and not cpu_extension.known_unavailable()


def rotation_applies(x: torch.Tensor, rotation: torch.Tensor, block_size: int, scale_rule: str | None) -> bool:
    """Whether :func:`rotate_and_quantize` fuses: what :func:`applies` asks of the (padded) ``x``
    (the rule may be ``None``: rotation alone), and a float32 CPU block of a multiple of 16 up to
    :data:`MAX_FUSED_ROTATION` that divides the width."""
    if rotation.device.type != "cpu" or not takes_rotation(rotation):
        return False
    if x.dim() == 0 or x.shape[-1] % rotation.shape[0]:
        return False
    return applies(x, block_size, scale_rule)


def rotate_and_quantize(
    x: torch.Tensor, width: int, rotation: torch.Tensor | None, block_size: int, scale_rule: str | None,
    kernel_preference: str = "auto",
) -> torch.Tensor:
    """The input side of an MXFP4 linear in float32: ``Q_a(pad(x) R)``, or ``pad(x) R`` where
    ``scale_rule`` is ``None`` (weight-only); ``x`` zero-padded to ``width``, ``rotation`` the ``b x b``
    block of ``R`` (``None``: no rotation). One fused kernel call where :func:`rotation_applies` (and the
    preference is not ``emulated``), else the rotation matmul and :func:`fake_quantize`."""
    x = x.to(torch.float32)
    if rotation is not None and kernel_preference != "emulated":
        xp = x if width == x.shape[-1] else torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        if rotation_applies(xp, rotation, block_size, scale_rule):
            return mxfp4_rotate_fake_quantize(xp, rotation, block_size, scale_rule or "none")
    xr = pad_and_rotate(x, width, rotation)
    return xr if scale_rule is None else fake_quantize(xr, block_size, scale_rule, kernel_preference)


def fake_quantize(x: torch.Tensor, block_size: int, scale_rule: str, kernel_preference: str = "auto") -> torch.Tensor:
    """The activation quantizer of the MXFP4 linears: the kernel where :func:`applies` (and the
    preference is not ``emulated``), :func:`torchao_mx_ext.mx.mxfp4_fake_quantize` otherwise."""
    if kernel_preference != "emulated" and applies(x, block_size, scale_rule):
        return mxfp4_fake_quantize(x, block_size, scale_rule)
    return reference_mxfp4_fake_quantize(x, block_size, scale_rule)


def set_isa(isa: int | None) -> int:
    """Test hook: cap the kernel's code path (0 scalar, 1 AVX2, 2 AVX-512; ``None`` = the best the CPU and
    ``ATEN_CPU_CAPABILITY`` allow). Returns the path now in use."""
    if not cpu_extension.is_available():
        raise RuntimeError("the CPU MXFP4 kernels are not available")
    return torch.ops.torchao_mx_ext._mxfp4_fake_quantize_set_isa(-1 if isa is None else isa)
