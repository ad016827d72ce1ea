"""Rotation matrices by name and their block-diagonal application along the last dimension.

A rotation ``R`` of width ``K`` is block-diagonal with ``K / b`` copies of one ``b x b`` orthogonal
block (``b = rotation_size``; ``b = K`` is a full-width, "global" rotation). Only the block is stored,
and one block object is shared by every layer that uses it (see :func:`rotation_block`).

- ``hadamard``: normalised Hadamard ``H_b / sqrt(b)`` (Sylvester order, no sign flips).
- ``random_hadamard``: ``D H_b / sqrt(b)`` with ``D`` seeded random signs (QuaRot's randomised Hadamard):
  ``x R`` multiplies each input feature by its sign, then applies ``H``.
- ``identity``: no rotation.
"""

import logging
from typing import Dict, Optional, Tuple

import torch

from .hadamard import hadamard_matrix, random_orthogonal, random_signs

logger = logging.getLogger(__name__)

ROTATIONS = ("hadamard", "random_hadamard", "identity")

_BLOCK_CACHE: Dict[Tuple[str, int, int, str], torch.Tensor] = {}


def check_rotation(name: str) -> str:
    if name not in ROTATIONS:
        raise ValueError(f"unknown rotation {name!r}; choose one of {', '.join(ROTATIONS)}")
    return name


def orthogonal_block(name: str, size: int, seed: int = 0) -> Optional[torch.Tensor]:
    """The float64 ``size x size`` orthogonal block for rotation ``name`` (``None`` for identity)."""
    check_rotation(name)
    if name == "identity":
        return None
    h = hadamard_matrix(size)
    if h is None:
        logger.warning(
            "no Hadamard matrix of order %d is constructed here; using a seeded random orthogonal "
            "matrix (seed %d) instead", size, seed,
        )
        base = random_orthogonal(size, seed)
    else:
        base = h / size**0.5
    if name == "random_hadamard":
        base = random_signs(size, seed).unsqueeze(1) * base
    return base


def rotation_block(name: str, size: int, seed: int = 0, device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
    """Cached float32 rotation block: every caller with the same key gets the same tensor object,
    so a model stores one copy of each distinct rotation however many layers use it."""
    if name == "identity":
        return None
    key = (name, size, seed, str(torch.device(device)))
    block = _BLOCK_CACHE.get(key)
    if block is None:
        block = orthogonal_block(name, size, seed).to(torch.float32).to(device)
        _BLOCK_CACHE[key] = block
    return block


def apply_block_rotation(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``x R`` along the last dimension for ``R = diag(block, ..., block)``; ``x`` width divisible by the block."""
    b = block.shape[0]
    return (x.reshape(*x.shape[:-1], x.shape[-1] // b, b) @ block).reshape(x.shape)


def pad_and_rotate(x: torch.Tensor, width: int, block: Optional[torch.Tensor]) -> torch.Tensor:
    """``pad(x) R``: ``x`` zero-padded along the last dimension to ``width``, then rotated block by block
    (``block`` ``None``: not rotated). Weights and activations of a quantized linear both go through it,
    so both sides of ``x R (W R)^T`` live in the same padded, rotated domain; the padded columns meet
    zeros, which keeps the product exact. Computes in ``x``'s dtype (the block is cast to it)."""
    if width != x.shape[-1]:
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    return x if block is None else apply_block_rotation(x, block.to(x.dtype))
