"""Orthogonal rotations: Hadamard constructions and block-diagonal application."""

from .hadamard import hadamard_matrix, paley_hadamard, random_orthogonal, sylvester_hadamard
from .rotations import ROTATIONS, apply_block_rotation, check_rotation, orthogonal_block, pad_and_rotate, rotation_block

__all__ = [
    "ROTATIONS",
    "apply_block_rotation",
    "check_rotation",
    "hadamard_matrix",
    "orthogonal_block",
    "pad_and_rotate",
    "paley_hadamard",
    "random_orthogonal",
    "rotation_block",
    "sylvester_hadamard",
]
