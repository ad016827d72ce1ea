"""Why a block rotation helps MXFP4 and a global one can hurt: the mechanism on real activations.

    python benchmarks/rotation_mechanism.py [--model smollm2-135m] [--layer 10] [--linear q_proj] [--json PATH]

Takes the input of one linear on WikiText-2 validation text, and for each rotation (none, global
randomised Hadamard over the full width, 32-wide block Hadamard) reports, per 32-element MX block:
the shared E8M0 exponent (the ``floor`` rule's, the OCP one) and the block's squared quantization
error relative to the unrotated block's. "Regular" blocks are those whose amax is at most 4x their RMS
(no outlier); outlier blocks are the rest. A global rotation spreads the energy of the few outlier
channels into every block, raising the regular blocks' exponents (coarser grid); a block rotation
only mixes values inside a block, so a regular block stays regular.
"""

import argparse
import json
from pathlib import Path

import torch

from torchao_mx_ext.calibration.data import calibration_ids
from torchao_mx_ext.mx import mxfp4_fake_quantize, shared_exponent
from torchao_mx_ext.rotation import apply_block_rotation
from torchao_mx_ext.rotation.fusion import block_diagonal
from torchao_mx_ext.zoo import load_model


def capture_input(model, layer: int, linear: str, ids: torch.Tensor) -> torch.Tensor:
    module = dict(model.model.layers[layer].named_modules())[linear]
    got = []
    handle = module.register_forward_pre_hook(lambda m, args: got.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    handle.remove()
    return torch.cat(got).float()


def block_stats(x: torch.Tensor, rule: str = "floor") -> dict:
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    exps = shared_exponent(amax, rule)
    err = (mxfp4_fake_quantize(x, 32, rule) - x).reshape_as(blocks).square().sum(-1)
    return {"exp": exps, "err": err, "amax": amax, "rms": blocks.square().mean(-1).sqrt()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--linear", default="self_attn.q_proj")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", default="benchmarks/results/rotation_mechanism.json")
    args = p.parse_args()
    model, tok = load_model(args.model)
    ids = calibration_ids(tok, "wikitext2", args.samples, args.seq_len, seed=0)
    x = capture_input(model, args.layer, args.linear, ids)
    width = x.shape[-1]
    base = block_stats(x)
    regular = base["amax"] <= 4 * base["rms"]
    rotations = {
        "global (randomised Hadamard, full width)": block_diagonal("random_hadamard", width, None, 0).float(),
        "block (Hadamard, 32 wide)": block_diagonal("hadamard", 32, None, 0).float(),
    }
    report = {"model": args.model, "layer": args.layer, "linear": args.linear, "tokens": x.shape[0], "width": width,
              "regular_block_fraction": regular.float().mean().item(), "rotations": {}}
    print(f"{args.model} layer {args.layer} {args.linear} input: {x.shape[0]} tokens x {width}; "
          f"{100 * regular.float().mean():.1f}% of MX blocks are regular (amax <= 4 rms)")
    print(f"{'rotation':<42} {'exp up':>7} {'exp down':>8} {'err ratio reg.':>14} {'err ratio outl.':>15} {'total err ratio':>15}")
    for name, r in rotations.items():
        xr = apply_block_rotation(x, r)
        st = block_stats(xr)
        up = (st["exp"] > base["exp"])[regular].float().mean().item()
        down = (st["exp"] < base["exp"])[regular].float().mean().item()
        reg_ratio = (st["err"][regular].sum() / base["err"][regular].sum()).item()
        out_ratio = (st["err"][~regular].sum() / base["err"][~regular].sum()).item() if (~regular).any() else float("nan")
        total = (st["err"].sum() / base["err"].sum()).item()
        report["rotations"][name] = {"regular_exp_up": up, "regular_exp_down": down, "regular_err_ratio": reg_ratio,
                                     "outlier_err_ratio": out_ratio, "total_err_ratio": total}
        print(f"{name:<42} {100 * up:>6.1f}% {100 * down:>7.1f}% {reg_ratio:>14.2f} {out_ratio:>15.2f} {total:>15.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
