"""Why a block rotation helps MXFP4 and a global one can hurt: the mechanism on real activations.

    python benchmarks/rotation_mechanism.py [--model smollm2-135m] [--layer 10] [--linear self_attn.q_proj] [--json PATH]

Takes the input of one linear on WikiText-2 validation text and reports, for a global randomised
Hadamard (full width) and a 32-wide block Hadamard, the share of regular MX blocks (amax <= 4 rms)
whose E8M0 exponent goes up or down, and the squared-error ratio against the unrotated activation
(see ``torchao_mx_ext.eval.rotation_analysis``).
"""

import argparse
import json
from pathlib import Path

from torchao_mx_ext.calibration.data import calibration_ids
from torchao_mx_ext.eval.rotation_analysis import capture_linear_input, compare_rotations, standard_rotations
from torchao_mx_ext.zoo import load_model


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
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
