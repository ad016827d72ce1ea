"""Weight-only MXFP4: why the block Hadamard lowers the weights' error but raises the layers' output error.

    python benchmarks/weight_rotation_error.py [--model smollm2-135m] [--samples 2] [--seq-len 1024] [--json PATH]

For every linear of the decoder (lm_head aside), with the weight ``W [out, in]``, its MXFP4 round trip
``Q`` (``--rule``, default the package's) and the 32-wide block Hadamard ``H`` of ``block-rot``, the
weight error in the original input basis is

    rtn:        D = Q(W) - W
    block-rot:  D = (Q(W H) - W H) H^T        (the layer computes (x H)(Q(W H))^T = x (Q(W H) H^T)^T)

Reported per linear type (summed over layers), as block-rot / rtn ratios in float64:
- weight error ``||D||_F^2`` (the rotation is orthogonal, so this is also the error of ``W H``);
- output error ``E ||x D^T||^2 = tr(D S D^T)`` with ``S = X^T X`` the input's second moment on
  WikiText-2 validation windows: what the layer's output actually loses.
"""

import argparse
import json
from pathlib import Path

import torch

from torchao_mx_ext.calibration.data import calibration_ids
from torchao_mx_ext.configs import DEFAULT_SCALE_RULE
from torchao_mx_ext.mx.quantize import mxfp4_fake_quantize
from torchao_mx_ext.rotation.hadamard import sylvester_hadamard
from torchao_mx_ext.zoo import load_model

BLOCK = 32


def input_second_moments(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """``{linear name: X^T X}`` (float64) of every ``nn.Linear`` but lm_head, over one forward of ``ids``."""
    moments, handles = {}, []

    def record(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            moments[name] = moments.get(name, 0) + x.T @ x
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return moments


def weight_errors(w: torch.Tensor, rule: str) -> tuple:
    """(rtn D, block-rot D) in the original input basis, float64 (see the module docstring)."""
    h = sylvester_hadamard(BLOCK).double() / BLOCK ** 0.5
    w = w.double()
    rows, cols = w.shape
    d_rtn = mxfp4_fake_quantize(w.float(), BLOCK, rule).double() - w
    w_rot = (w.reshape(rows, cols // BLOCK, BLOCK) @ h).reshape(rows, cols)
    d_rot = mxfp4_fake_quantize(w_rot.float(), BLOCK, rule).double() - w_rot
    return d_rtn, (d_rot.reshape(rows, cols // BLOCK, BLOCK) @ h.T).reshape(rows, cols)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rule", default=DEFAULT_SCALE_RULE)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="benchmarks/results/weight_rotation_error.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    ids = calibration_ids(tok, "wikitext2", args.samples, args.seq_len, seed=0)
    moments = input_second_moments(model, ids)
    sums = {}
    for name, module in model.named_modules():
        if name not in moments:
            continue
        d_rtn, d_rot = weight_errors(module.weight.detach(), args.rule)
        s = moments[name]
        kind = name.rsplit(".", 1)[-1]
        acc = sums.setdefault(kind, {"weight_rtn": 0.0, "weight_block_rot": 0.0, "output_rtn": 0.0, "output_block_rot": 0.0})
        acc["weight_rtn"] += d_rtn.square().sum().item()
        acc["weight_block_rot"] += d_rot.square().sum().item()
        acc["output_rtn"] += torch.trace(d_rtn @ s @ d_rtn.T).item()
        acc["output_block_rot"] += torch.trace(d_rot @ s @ d_rot.T).item()
    print(f"{args.model}, weight-only MXFP4 ({args.rule}), block-rot / rtn, {ids.numel()} WikiText-2 validation tokens")
    print(f"{'linear':<10} {'weight error':>12} {'output error':>12}")
    rows = {}
    for kind, acc in sums.items():
        rows[kind] = {"weight_error_ratio": acc["weight_block_rot"] / acc["weight_rtn"],
                      "output_error_ratio": acc["output_block_rot"] / acc["output_rtn"], **acc}
        print(f"{kind:<10} {rows[kind]['weight_error_ratio']:>12.3f} {rows[kind]['output_error_ratio']:>12.3f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "rule": args.rule, "tokens": ids.numel(), "per_linear_type": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
