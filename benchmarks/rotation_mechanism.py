"""Why a block rotation helps MXFP4 and a global one can hurt: the mechanism on real activations.

    python benchmarks/rotation_mechanism.py [--model smollm2-135m] [--layer 10] [--linear self_attn.q_proj] [--json PATH]

Takes the input of one linear on WikiText-2 validation text and reports, for a global randomised
Hadamard (full width) and a 32-wide block Hadamard, the share of regular MX blocks (amax <= 4 rms)
whose E8M0 exponent goes up or down, and the squared-error ratio against the unrotated activation
(see ``torchao_mx_ext.eval.rotation_analysis``).

Then, per ``compare`` method, the input error of q_proj, up_proj and down_proj in several layers, all
mapped back to the linear's original input (``effective_errors``, ``--rule``, default the package's):
``rtn`` (no rotation), ``block-rot`` / ``global-rot`` (per-linear rotation of the normed input),
``brq`` / ``quarot`` (RMSNorm weight folded into the weights, then a block / global R1; down_proj has
no norm, there R4 is an online rotation of its input like the per-linear one). Ratios are against RTN.
"""

import argparse
import json
from pathlib import Path

import torch

from torchao_mx_ext.calibration.data import calibration_ids
from torchao_mx_ext.configs import DEFAULT_SCALE_RULE
from torchao_mx_ext.eval.rotation_analysis import (
    capture_linear_input,
    capture_norm_input,
    compare_rotations,
    effective_errors,
    standard_rotations,
)
from torchao_mx_ext.zoo import load_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--linear", default="self_attn.q_proj")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", default="benchmarks/results/rotation_mechanism.json")
    p.add_argument("--method-layers", default="5,15,25", help="layers of the per-method table")
    p.add_argument("--rule", default=DEFAULT_SCALE_RULE, help="scale rule of the per-method table")
    args = p.parse_args()
    model, tok = load_model(args.model)
    ids = calibration_ids(tok, "wikitext2", args.samples, args.seq_len, seed=0)
    x = capture_linear_input(model, f"model.layers.{args.layer}.{args.linear}", ids)
    res = compare_rotations(x, standard_rotations(x.shape[-1]))
    print(f"{args.model} layer {args.layer} {args.linear} input: {x.shape[0]} tokens x {x.shape[-1]}; "
          f"{100 * res['regular_block_fraction']:.1f}% of MX blocks are regular (amax <= 4 rms)")
    print(f"{'rotation':<8} {'reg. exp up':>11} {'reg. exp down':>13} {'err ratio reg.':>14} {'err ratio outl.':>15} {'total err ratio':>15}")
    report = {"model": args.model, "layer": args.layer, "linear": args.linear, "tokens": x.shape[0],
              "regular_block_fraction": res["regular_block_fraction"], "rotations": {}}
    for name, r in res["rotations"].items():
        report["rotations"][name] = {k: v for k, v in r.items() if k != "stats"}
        print(f"{name:<8} {100 * r['regular_exp_up']:>10.1f}% {100 * r['regular_exp_down']:>12.1f}% "
              f"{r['regular_err_ratio']:>14.2f} {r['outlier_err_ratio']:>15.2f} {r['total_err_ratio']:>15.2f}")
    report["per_method"] = per_method_errors(model, ids, [int(i) for i in args.method_layers.split(",")], args.rule)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


SITES = {  # linear -> the RMSNorm in front of it (None: no norm, nothing to fold)
    "self_attn.q_proj": "input_layernorm",
    "mlp.up_proj": "post_attention_layernorm",
    "mlp.down_proj": None,
}


def per_method_errors(model, ids, layers, rule) -> dict:
    """Effective input error of each method's quantizer at each site, as ratios to RTN's."""
    print(f"\nper method, input error of the linear relative to RTN ({rule} scales; regular / outlier blocks / all):")
    methods = ("rtn", "block-rot", "global-rot", "brq", "quarot")
    print(f"{'site':<26}" + "".join(f"{m:>20}" for m in methods[1:]))
    table = {}
    for layer in layers:
        for linear, norm in SITES.items():
            prefix = f"model.layers.{layer}"
            if norm is None:
                x = capture_linear_input(model, f"{prefix}.{linear}", ids)
                gamma = torch.ones(x.shape[-1])
            else:
                x, gamma = capture_norm_input(model, f"{prefix}.{norm}", ids)
            rots = standard_rotations(x.shape[-1])
            res = effective_errors(x, gamma, {
                "rtn": (False, None), "block-rot": (False, rots["block"]), "global-rot": (False, rots["global"]),
                "brq": (norm is not None, rots["block"]), "quarot": (norm is not None, rots["global"]),
            }, rule)
            site = f"{layer}.{linear}"
            table[site] = res
            cells = "".join(
                f"{v['regular_err_ratio']:>7.2f}/{v['outlier_err_ratio']:.2f}/{v['total_err_ratio']:.2f}".rjust(20)
                for name, v in res["variants"].items() if name != "rtn"
            )
            print(f"{site:<26}{cells}")
    return table


if __name__ == "__main__":
    main()
