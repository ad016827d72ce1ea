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
(:mod:`.cpu_extension`) on its first call. Linears use it where the weight decode is vectorised too
(:data:`.cpu_mxfp4_dequantize.VECTORIZED`, the AVX-512 CPUs it was measured on); elsewhere Inductor's
fused kernel stays.
"""

from __future__ import annotations

import torch

from ..mx.quantize import mxfp4_fake_quantize as reference_mxfp4_fake_quantize
from . import cpu_extension, cpu_mxfp4_dequantize

__all__ = ["RULES", "applies", "fake_quantize", "mxfp4_fake_quantize", "reference_mxfp4_fake_quantize", "set_isa"]

OP = "torchao_mx_ext::mxfp4_fake_quantize"
RULES = ("floor", "even", "rceil", "mse")

_lib = torch.library.Library("torchao_mx_ext", "FRAGMENT")
_lib.define("mxfp4_fake_quantize(Tensor x, int block_size, str scale_rule) -> Tensor")


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


def applies(x: torch.Tensor, block_size: int, scale_rule: str) -> bool:
    """Whether :func:`fake_quantize` runs the kernel: a float32 CPU tensor whose width is a multiple
    of ``block_size`` (a multiple of 32), a rule of :data:`RULES`, no gradient needed, the weight
    decode vectorised here, and the C++ library not known to be unavailable."""
    if not cpu_mxfp4_dequantize.VECTORIZED or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if scale_rule not in RULES or block_size % 32 or x.dim() == 0 or x.shape[-1] % block_size:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return not cpu_extension.known_unavailable()


def mxfp4_fake_quantize(x: torch.Tensor, block_size: int, scale_rule: str) -> torch.Tensor:
    """The operator: ``dequantize(quantize(x))`` for a float32 ``x [..., K]``, in float32."""
    return torch.ops.torchao_mx_ext.mxfp4_fake_quantize(x, block_size, scale_rule)


def fake_quantize(x: torch.Tensor, block_size: int, scale_rule: str, kernel_preference: str = "auto") -> torch.Tensor:
    """The activation quantizer of the MXFP4 linears: the kernel where :func:`applies` (and the
    preference is not ``emulated``), :func:`torchao_mx_ext.mx.mxfp4_fake_quantize` otherwise."""
    if kernel_preference != "emulated" and applies(x, block_size, scale_rule):
        return mxfp4_fake_quantize(x, block_size, scale_rule)
    return reference_mxfp4_fake_quantize(x, block_size, scale_rule)


def set_isa(isa: int | None) -> int:
    """Test hook: cap the kernel's code path (0 scalar, 2 AVX-512; ``None`` = the best the CPU and
    ``ATEN_CPU_CAPABILITY`` allow). Returns the path now in use."""
    if not cpu_extension.is_available():
        raise RuntimeError("the CPU MXFP4 kernels are not available")
    return torch.ops.torchao_mx_ext._mxfp4_fake_quantize_set_isa(-1 if isa is None else isa)
