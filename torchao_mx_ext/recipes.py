"""Whole-model quantization methods, by name: what ``torchao-mx compare`` runs.

Every method quantizes all ``nn.Linear`` layers except ``lm_head`` (W4A4 recipes keep it in high
precision) to MXFP4; they differ in the rotations around the quantizers:

- ``rtn``: no rotation.
- ``block-rot``: per-linear 32-wide block Hadamard (BRQ per linear; ``MXFP4BlockRotConfig``).
- ``global-rot``: per-linear full-width randomised Hadamard (seeded).
- ``quarot``: model-level QuaRot: norms folded, full-width randomised Hadamard R1 on the residual,
  per-head randomised Hadamard R2, online full-width Hadamard R4 before down_proj (seeded).
- ``brq``: the same with every rotation block-diagonal, 32 wide (deterministic).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torchao.quantization import quantize_

from .configs import MXFP4BlockRotConfig, MXFP4Config
from .rotation.fusion import block_diagonal, check_supported, fuse_rotations, head_dim_of
from .tensors import RotatedMXFP4Tensor


@dataclass(frozen=True)
class QuantSettings:
    scale_rule: str
    act_scale_rule: Optional[str] = None
    weight_only: bool = False
    seed: int = 0

    def config(self, cls=MXFP4Config, **kw) -> MXFP4Config:
        return cls(scale_rule=self.scale_rule, act_scale_rule=self.act_scale_rule, act_quant=not self.weight_only, **kw)


def is_quantizable_linear(module: torch.nn.Module, fqn: str) -> bool:
    return (
        isinstance(module, torch.nn.Linear)
        and fqn.split(".")[-1] != "lm_head"
        and not isinstance(module.weight, RotatedMXFP4Tensor)
    )


def quantize_linears(model: torch.nn.Module, config: MXFP4Config, only: Optional[str] = None) -> torch.nn.Module:
    """``quantize_`` every linear but lm_head (and only those named ``only``, if given)."""
    def keep(module, fqn):
        return is_quantizable_linear(module, fqn) and (only is None or fqn.split(".")[-1] == only)

    quantize_(model, config, filter_fn=keep)
    return model


def rtn(model, s: QuantSettings):
    return quantize_linears(model, s.config())


def block_rot(model, s: QuantSettings):
    return quantize_linears(model, s.config(MXFP4BlockRotConfig))


def global_rot(model, s: QuantSettings):
    return quantize_linears(model, s.config(MXFP4BlockRotConfig, rotation="random_hadamard", rotation_size=None, seed=s.seed))


def _model_rotation(model, s: QuantSettings, block: Optional[int], name: str):
    check_supported(model)
    r1 = block_diagonal(name, model.config.hidden_size, block, s.seed)
    r2 = block_diagonal(name, head_dim_of(model), block, s.seed + 1)
    fuse_rotations(model, r1, r2)
    # R4: an online Hadamard on down_proj's input (full width for QuaRot, 32-wide blocks for BRQ).
    quantize_linears(model, s.config(MXFP4BlockRotConfig, rotation="hadamard", rotation_size=block), only="down_proj")
    return quantize_linears(model, s.config())


def quarot(model, s: QuantSettings):
    return _model_rotation(model, s, None, "random_hadamard")


def brq(model, s: QuantSettings):
    return _model_rotation(model, s, 32, "hadamard")


@dataclass(frozen=True)
class Method:
    apply: Optional[Callable]  # None: the unquantized model
    seeded: bool = False  # has a random component: run per seed, report mean and spread


METHODS = {
    "fp": Method(None),
    "rtn": Method(rtn),
    "block-rot": Method(block_rot),
    "global-rot": Method(global_rot, seeded=True),
    "quarot": Method(quarot, seeded=True),
    "brq": Method(brq),
}
