"""What a rotation does to MXFP4 blocks of a real activation (the BRQ mechanism, arXiv 2511.04214).

Per 32-element MX block: the shared E8M0 exponent (``floor`` rule, the OCP one) and the block's
squared quantization error, before and after a rotation. "Regular" blocks have ``amax <= 4 rms`` (no
outlier). A global rotation spreads the few outlier channels' energy into every block, so regular
blocks get larger exponents (a coarser grid); a block rotation only mixes values inside a block.
"""

from typing import Dict, Optional, Tuple

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


@torch.no_grad()
def capture_norm_input(model: torch.nn.Module, norm_name: str, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x / rms(x), gamma)`` at an RMSNorm: its input normalised *without* its weight ``[tokens, width]``
    (float32; what the following linears see once the weight is folded into them), and the weight."""
    norm = model.get_submodule(norm_name)
    x = capture_linear_input(model, norm_name, ids).double()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x_n = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return x_n.float(), norm.weight.detach().float()


def effective_errors(
    x: torch.Tensor, gamma: torch.Tensor, variants: Dict[str, Tuple[bool, Optional[torch.Tensor]]], rule: str = "mse"
) -> dict:
    """MXFP4 error of each way to quantize one linear's input, all measured in the same domain.

    The linear computes ``(x * gamma) W^T`` (``x`` a normalised residual, ``gamma`` its RMSNorm weight,
    ones where there is no norm). A variant ``(folded, R)`` quantizes ``x R`` when ``folded`` (the norm
    weight lives in the weight, as after QuaRot/BRQ fusion) and ``(x * gamma) R`` otherwise (per-linear
    rotation), ``R = None`` meaning no rotation. Its error, mapped back through ``R^T`` and scaled by
    ``gamma`` when folded, is the error of the linear's original input::

        e = (Q(v R) - v R) R^T * (gamma if folded else 1),     v = x if folded else x * gamma

    so ``||e W^T||`` is the variant's output error and the variants are comparable. Errors are split
    by the 32-wide blocks of the unrotated input ``x * gamma`` into regular (``amax <= 4 rms``) and
    outlier blocks; ratios are against the first variant.
    """
    x64, g64 = x.double(), gamma.double()
    v_plain = x64 * g64
    base_blocks = v_plain.reshape(x.shape[0], -1, 32)
    regular = base_blocks.abs().amax(-1) <= OUTLIER_RATIO * base_blocks.square().mean(-1).sqrt()
    errors = {}
    for name, (folded, r) in variants.items():
        v = x64 if folded else v_plain
        vr = v if r is None else v @ r.double()
        e = mxfp4_fake_quantize(vr.float(), 32, rule).double() - vr.float().double()
        if r is not None:
            e = e @ r.double().T
        if folded:
            e = e * g64
        per_block = e.reshape(base_blocks.shape).square().sum(-1)
        errors[name] = (per_block[regular].sum().item(), per_block[~regular].sum().item())
    ref_reg, ref_out = next(iter(errors.values()))
    out = {"regular_block_fraction": regular.double().mean().item(), "variants": {}}
    for name, (reg, outl) in errors.items():
        out["variants"][name] = {
            "regular_err_ratio": reg / ref_reg if ref_reg else float("nan"),
            "outlier_err_ratio": outl / ref_out if ref_out else float("nan"),
            "total_err_ratio": (reg + outl) / (ref_reg + ref_out),
        }
    return out
