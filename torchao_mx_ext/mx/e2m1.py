"""FP4 E2M1 element format (OCP Microscaling Formats v1.0, section 5.3.3).

E2M1 has one sign bit, two exponent bits (bias 1) and one mantissa bit. Its non-negative values are
``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``: spacing 0.5 below 2, 1 in [2, 4), 2 in [4, 6]. A 4-bit code is
``sign << 3 | index`` with ``index`` the position of the magnitude in that list.

Everything here is arithmetic (no lookup-table constants): lookup tables inside ops break Dynamo's
fake tensors, and the arithmetic form fuses into one Inductor kernel.
"""

import torch

E2M1_MAX = 6.0
# Largest power of two of E2M1 (6 = 1.5 * 2^2): the OCP rule subtracts it from floor(log2(amax)).
E2M1_EMAX = 2
E2M1_MBITS = 1


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round ``v`` (already divided by its block scale) to the nearest E2M1 value.

    Round half to even on the E2M1 mantissa (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
    3.5 -> 4, 5 -> 4) and saturate at +-6. Dividing by the local spacing is exact (a power of two),
    so ``torch.round`` (half to even) on ``|v| / spacing`` is exactly E2M1's RNE. NaN stays NaN.
    """
    a = v.abs()
    spacing = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    q = torch.clamp(torch.round(a / spacing) * spacing, max=E2M1_MAX)
    return torch.copysign(q, v)


def e2m1_to_code(q: torch.Tensor) -> torch.Tensor:
    """Map E2M1 values (outputs of :func:`round_to_e2m1`) to 4-bit codes in a uint8 tensor."""
    a = q.abs()
    index = torch.where(a < 2.0, a * 2.0, torch.where(a < 4.0, a + 2.0, a * 0.5 + 4.0))
    sign = torch.signbit(q).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def code_to_e2m1(code: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode 4-bit E2M1 codes (uint8, low nibble used) to floating point values."""
    index = (code & 7).to(dtype)
    magnitude = torch.where(index < 4.0, index * 0.5, torch.where(index < 6.0, index - 2.0, index * 2.0 - 8.0))
    return torch.where((code & 8) != 0, -magnitude, magnitude)
