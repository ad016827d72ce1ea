"""E8M0 shared block scales: the rules that choose a block's power-of-two exponent.

An E8M0 scale is a biased 8-bit exponent: byte ``b`` means ``2^(b - 127)``, ``b = 255`` is NaN.
Every rule below produces a valid E8M0 scale; they differ in how they trade clipping the block's
largest values against resolution for the rest (OCP MX v1.0 section 6.3; peers' variants noted).

With ``k = floor(log2(amax))`` (exact, read from the float32 exponent field):

- ``floor`` (OCP reference, torchao ``ScaleCalculationMode.FLOOR``): ``e = k - 2``. Blocks whose
  ``amax / 2^k`` is at least 1.75 clip their largest values to 6 * 2^e.
- ``even`` (torchao ``EVEN``, llm-compressor, AMD Quark): round ``amax`` to E2M1's one mantissa bit
  (half up) first, then ``floor``: ``e = k - 2 + [amax / 2^k >= 1.75]``.
- ``rceil`` (NVIDIA hardware): ``e = ceil(log2(amax / 6)) = k - 2 + [amax / 2^k > 1.5]``; nothing clips.
- ``fp_quant`` (FP-Quant / QuTLASS): ``e = k - 2`` with the element grid stretched by 4/3, i.e. the
  effective scale is ``2^e * 4/3``; ``amax`` then lands in [3, 6) and never clips. The constant 4/3
  is global, so a hardware GEMM applies it once as its alpha. (Its largest value, 8 * 2^125, overflows
  float32: blocks with amax above about 2.8e38 dequantize to inf.)
- ``even`` is also compressed-tensors' dynamic activation rule (``quantization/utils/mxfp_utils.py``
  ``round_to_power_2``: add half an E2M1 ulp to the bits of ``amax`` and mask the mantissa, then
  ``e = log2 - 2``), so it is what a compressed-tensors / vLLM W4A4 MXFP4 model computes for its
  activations: bit for bit for every finite ``amax < 1.75 * 2^127`` (above that compressed-tensors'
  rounding overflows and stores the NaN byte 255; this rule keeps 126). ``tests/mx/`` checks it against
  compressed-tensors itself.
- ``mse`` (ours): per block, the exponent among ``{e_floor, e_floor + 1}`` with the smaller squared
  quantization error (ties keep ``e_floor``); it needs the elements, see ``quantize.py``.
"""

import torch

SCALE_RULES = ("floor", "even", "rceil", "fp_quant", "mse")
E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127

_F32_MANTISSA_BITS = 23
_F32_MANTISSA_MASK = (1 << _F32_MANTISSA_BITS) - 1
_F32_EXPONENT_MASK = 0xFF << _F32_MANTISSA_BITS


def check_scale_rule(rule: str) -> str:
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown MXFP4 scale rule {rule!r}; choose one of {', '.join(SCALE_RULES)}")
    return rule


def element_multiplier(rule: str) -> float:
    """Global factor between the E8M0 scale and the effective block scale (4/3 for ``fp_quant``)."""
    return 4.0 / 3.0 if rule == "fp_quant" else 1.0


def _floor_log2_bits(bits: torch.Tensor) -> torch.Tensor:
    # Unbiased exponent of a non-negative float32 given as int32 bits; zero and subnormals give -127,
    # which is exact enough: their floor(log2) - 2 is below -127 and clamps to -127 anyway.
    return ((bits & _F32_EXPONENT_MASK) >> _F32_MANTISSA_BITS) - E8M0_BIAS


def shared_exponent(amax: torch.Tensor, rule: str) -> torch.Tensor:
    """Unbiased int32 block exponents ``e`` in [-127, 127] from float32 block maxima ``amax >= 0``.

    Non-finite maxima are not handled here (see :func:`exponent_to_e8m0`). ``mse`` returns the
    ``floor`` exponent, its first candidate.
    """
    amax = amax.to(torch.float32)
    bits = amax.view(torch.int32)
    k = _floor_log2_bits(bits)
    if rule in ("floor", "fp_quant", "mse"):
        e = k - 2
    elif rule == "even":
        # Add half an E2M1 ulp (mantissa bit 21) and drop the mantissa: a carry bumps the exponent.
        rounded = (bits + (1 << (_F32_MANTISSA_BITS - 1 - 1))) & _F32_EXPONENT_MASK
        e = _floor_log2_bits(rounded) - 2
    elif rule == "rceil":
        e = k - 2 + ((bits & _F32_MANTISSA_MASK) > (1 << (_F32_MANTISSA_BITS - 1))).to(torch.int32)
    else:
        check_scale_rule(rule)
        raise AssertionError("unreachable")
    return torch.clamp(e, E8M0_MIN_EXP, E8M0_MAX_EXP)


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2^e`` for int32 ``e`` in [-127, 127], built from bits (exp2 is not exact everywhere).

    2^-127 is the only subnormal in range (mantissa bit 22 set, exponent field 0).
    """
    normal = ((e + E8M0_BIAS).clamp(min=1) << _F32_MANTISSA_BITS).view(torch.float32)
    subnormal = torch.full_like(normal, 2.0**E8M0_MIN_EXP)
    return torch.where(e >= E8M0_MIN_EXP + 1, normal, subnormal)


def exponent_to_e8m0(e: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """Biased uint8 E8M0 bytes; blocks with a NaN/Inf element get the E8M0 NaN byte 255."""
    return torch.where(nonfinite, E8M0_NAN, e + E8M0_BIAS).to(torch.uint8)


def e8m0_to_exponent(scale: torch.Tensor) -> torch.Tensor:
    """Unbiased int32 exponent of E8M0 bytes (255, NaN, maps to 128: callers mask it)."""
    return scale.to(torch.int32) - E8M0_BIAS
