"""``MXFP4ActivationTensor``: an activation after its online rotation and dynamic MXFP4 quantization.

This is the activation operand of a W4A4 linear, as codes + E8M0 scales, the form a hardware MXFP4
GEMM (``torch._scaled_mm`` with ``float4_e2m1fn_x2`` + ``float8_e8m0fnu`` operands, Blackwell and newer)
consumes. Without such hardware the linear emulates it with ``mxfp4_fake_quantize``, which equals
``MXFP4ActivationTensor.from_hp(x).dequantize()`` bit for bit and fuses into one Inductor kernel
instead of materialising codes.
"""

from dataclasses import dataclass

import torch

from ..mx import check_scale_rule, mxfp4_dequantize, mxfp4_quantize

__all__ = ["MXFP4ActivationTensor"]


@dataclass(frozen=True)
class MXFP4ActivationTensor:
    """Codes ``qdata`` (uint8, two per byte, ``[..., K/2]``) and E8M0 ``scale`` (uint8, ``[..., K/32]``)
    of an already rotated activation ``x R``; ``dequantize()`` gives ``Q(x R)`` in ``dtype``.

    A plain container, not a tensor subclass: it lives between the activation's quantization and a GEMM
    that consumes codes and scales, and no torch op ever receives it."""

    qdata: torch.Tensor
    scale: torch.Tensor
    block_size: int
    scale_rule: str
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        """The activation's logical shape ``[..., K]``."""
        return torch.Size((*self.qdata.shape[:-1], self.qdata.shape[-1] * 2))

    @classmethod
    def from_hp(cls, x: torch.Tensor, block_size: int = 32, scale_rule: str = "floor") -> "MXFP4ActivationTensor":
        check_scale_rule(scale_rule)
        qdata, scale = mxfp4_quantize(x, block_size, scale_rule)
        return cls(qdata, scale, block_size, scale_rule, x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return mxfp4_dequantize(self.qdata, self.scale, self.block_size, self.scale_rule, dtype or self.dtype)
