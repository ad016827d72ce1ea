"""What a rotation does to MXFP4 blocks of a real activation (the BRQ mechanism, arXiv 2511.04214).

Per 32-element MX block: the shared E8M0 exponent (``floor`` rule, the OCP one) and the block's
squared quantization error, before and after a rotation. "Regular" blocks have ``amax <= 4 rms`` (no
outlier). A global rotation spreads the few outlier channels' energy into every block, so regular
blocks get larger exponents (a coarser grid); a block rotation only mixes values inside a block.
"""

from typing import Dict

import torch

from ..mx import mxfp4_fake_quantize, shared_exponent
from ..rotation import apply_block_rotation
from ..rotation.fusion import block_diagonal

OUTLIER_RATIO = 4.0


@torch.no_grad()
def capture_linear_input(model: torch.nn.Module, module_name: str, ids: torch.Tensor) -> torch.Tensor:
    """``[tokens, in_features]`` float32 inputs of ``model.get_submodule(module_name)`` over ``ids``."""
    module = model.get_submodule(module_name)
    got = []
    handle = module.register_forward_pre_hook(lambda m, args: got.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        for row in ids:
            model(row.unsqueeze(0))
    finally:
        handle.remove()
    return torch.cat(got).float()


def block_stats(x: torch.Tensor, rule: str = "floor") -> Dict[str, torch.Tensor]:
    """Per block ``[tokens, width/32]``: exponent, squared error, amax and RMS."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    return {
        "exp": shared_exponent(amax, rule),
        "err": (mxfp4_fake_quantize(x, 32, rule) - x).reshape_as(blocks).square().sum(-1),
        "amax": amax,
        "rms": blocks.square().mean(-1).sqrt(),
    }


def standard_rotations(width: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The two rotations the thesis compares: global randomised Hadamard and 32-wide block Hadamard."""
    return {
        "global": block_diagonal("random_hadamard", width, None, seed).float(),
        "block": block_diagonal("hadamard", width, 32, seed).float(),
    }


def compare_rotations(x: torch.Tensor, rotations: Dict[str, torch.Tensor], rule: str = "floor") -> dict:
    """Exponent shifts and error ratios of each rotation against the unrotated activation."""
    base = block_stats(x, rule)
    regular = base["amax"] <= OUTLIER_RATIO * base["rms"]
    out = {"regular_block_fraction": regular.float().mean().item(), "base": base, "regular": regular, "rotations": {}}
    for name, r in rotations.items():
        st = block_stats(apply_block_rotation(x, r), rule)
        out["rotations"][name] = {
            "stats": st,
            "regular_exp_up": (st["exp"] > base["exp"])[regular].float().mean().item(),
            "regular_exp_down": (st["exp"] < base["exp"])[regular].float().mean().item(),
            "regular_err_ratio": (st["err"][regular].sum() / base["err"][regular].sum()).item(),
            "outlier_err_ratio": (st["err"][~regular].sum() / base["err"][~regular].sum()).item() if bool((~regular).any()) else float("nan"),
            "total_err_ratio": (st["err"].sum() / base["err"].sum()).item(),
        }
    return out
