"""Int8 weight-only GEMV for CPUs: the product of ``quantize_output_head("int8")``'s head.

``y = fl32(x @ q^T) * s (+ bias)`` for int8 codes ``q [N, K]`` and one scale per output row ``s [N]``
(:class:`torchao_mx_ext.inference.Int8WeightOnlyLinear`). At batch 1 the output head is the largest
single GEMV of a small decoder and reads one byte per weight; ATen's ``_weight_int8pack_mm`` runs it
well below the memory bandwidth on AVX2 CPUs and on a Zen 4 core's AVX-512, so this is a C++ kernel
(``int8_gemv.cpp`` beside this file, built with the other CPU kernels by :mod:`.cpu_extension`)
registered as the CPU kernel of ``torch.ops.torchao_mx_ext.int8_gemv``.

The operator is defined here, at import, with a fake kernel (``torch.compile`` keeps it as one extern
call) and a pure-torch ``CompositeExplicitAutograd`` kernel that builds the extension on its first call
and otherwise computes the same numbers (:func:`reference_int8_gemv`).

Numbers: ``x`` is widened to float32, every product is exact in float32, the sums are float32 (the
order differs from ATen's), the row sum is multiplied by the float32 scale, the bias added in float32,
and the result rounded once to ``out_dtype`` (default ``x.dtype``): the numbers of
``_weight_int8pack_mm`` up to float32 summation order, with the bias added before the rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_extension

__all__ = ["applies", "int8_gemv", "reference_int8_gemv", "set_isa"]

OP = "torchao_mx_ext::int8_gemv"

_lib = torch.library.Library("torchao_mx_ext", "FRAGMENT")
_lib.define("int8_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor")


@torch.library.register_fake(OP, lib=_lib)
def _fake_int8_gemv(x, qweight, scales, bias=None, out_dtype=None):
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "int8_gemv: x and the weight differ in width")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=out_dtype if out_dtype is not None else x.dtype)


def reference_int8_gemv(x, qweight, scales, bias=None, out_dtype=None):
    """The operator in pure torch: float32 ``F.linear`` on the codes, then the row scales and bias."""
    y = F.linear(x.to(torch.float32), qweight.to(torch.float32)) * scales.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype if out_dtype is not None else x.dtype)


@torch.library.impl(_lib, "int8_gemv", "CompositeExplicitAutograd")
def _fallback_int8_gemv(x, qweight, scales, bias=None, out_dtype=None):
    # Reached only while the C++ CPU kernel is not registered (or off the CPU): build it once, then
    # redispatch to it; without it, compute the same numbers in pure torch.
    if x.device.type == "cpu" and qweight.device.type == "cpu" and cpu_extension.is_available():
        return torch.ops.torchao_mx_ext.int8_gemv.default(x, qweight, scales, bias, out_dtype)
    return reference_int8_gemv(x, qweight, scales, bias, out_dtype)


def applies(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether the kernel should run ``x`` against ``qweight``: both on the CPU, the kernel vectorised
    here (:data:`.cpu_extension.VECTORIZED`; on a Zen 4 core it runs SmolLM2's head in 2.1 ms where
    ATen's AVX-512 ``_weight_int8pack_mm`` takes 5.3), no gradient needed (the kernel has no backward),
    and the kernels not known to be unavailable (the build is tried on the operator's first call)."""
    if x.device.type != "cpu" or qweight.device.type != "cpu" or cpu_extension.known_unavailable():
        return False
    if not cpu_extension.VECTORIZED:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(x @ qweight^T) * scales + bias`` (``x [..., K]``, ``qweight`` int8 ``[N, K]``, ``scales [N]``) ->
    ``[..., N]`` in ``out_dtype`` (default ``x.dtype``)."""
    return torch.ops.torchao_mx_ext.int8_gemv(x, qweight, scales, bias, out_dtype)


def set_isa(isa: int | None) -> int:
    """Test hook: cap the kernel's code path (0 scalar, 1 AVX2; ``None`` = the best the CPU and
    ``ATEN_CPU_CAPABILITY`` allow). Returns the path now in use."""
    if not cpu_extension.is_available():
        raise RuntimeError("the CPU kernels are not available")
    return torch.ops.torchao_mx_ext._int8_gemv_set_isa(-1 if isa is None else isa)
