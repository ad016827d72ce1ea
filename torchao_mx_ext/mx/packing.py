"""Two 4-bit codes per byte, first element in the low nibble.

This is the layout of ``torch.float4_e2m1fn_x2`` (and of torchao's ``pack_uint4``), so packed weights
can be viewed as that dtype and handed to a hardware MXFP4 GEMM without repacking.
"""

import torch


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` uint8 codes (values 0..15) -> ``[..., n]`` uint8, element ``2i`` in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_uint4 needs an even last dimension, got {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint4`: ``[..., n]`` uint8 -> ``[..., 2n]`` uint8 codes."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
