"""``MXFP4ActivationTensor``: an activation after its online rotation and dynamic MXFP4 quantization.

This is the activation operand of a W4A4 linear, as codes + E8M0 scales, the form a hardware MXFP4
GEMM (``torch._scaled_mm`` with ``float4_e2m1fn_x2`` + ``float8_e8m0fnu`` operands, Blackwell and newer)
consumes. Without such hardware the linear emulates it with ``mxfp4_fake_quantize``, which equals
``MXFP4ActivationTensor.from_hp(x).dequantize()`` bit for bit and fuses into one Inductor kernel
instead of materialising codes.
"""

import torch
from torchao.utils import TorchAOBaseTensor

from .caching import stable_metadata_hash
from ..mx import check_scale_rule, mxfp4_dequantize, mxfp4_quantize

__all__ = ["MXFP4ActivationTensor"]

aten = torch.ops.aten


class MXFP4ActivationTensor(TorchAOBaseTensor):
    """Codes ``qdata`` (uint8, two per byte, ``[..., K/2]``) and E8M0 ``scale`` (uint8, ``[..., K/32]``)
    of an already rotated activation ``x R``; ``dequantize()`` gives ``Q(x R)`` in ``dtype``."""

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["block_size", "scale_rule", "dtype"]

    def __new__(cls, qdata, scale, block_size, scale_rule, dtype):
        shape = (*qdata.shape[:-1], qdata.shape[-1] * 2)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata, scale, block_size, scale_rule, dtype):
        self.qdata = qdata
        self.scale = scale
        self.block_size = block_size
        self.scale_rule = scale_rule

    def _stable_hash_for_caching(self) -> str:
        return stable_metadata_hash(self)

    @classmethod
    def from_hp(cls, x: torch.Tensor, block_size: int = 32, scale_rule: str = "floor") -> "MXFP4ActivationTensor":
        check_scale_rule(scale_rule)
        qdata, scale = mxfp4_quantize(x, block_size, scale_rule)
        return cls(qdata, scale, block_size, scale_rule, x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return mxfp4_dequantize(self.qdata, self.scale, self.block_size, self.scale_rule, dtype or self.dtype)


@MXFP4ActivationTensor.implements_torch_function(torch.Tensor.dequantize)
def _(func, types, args, kwargs):
    return args[0].dequantize(*args[1:], **kwargs)
