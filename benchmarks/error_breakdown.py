"""Where W4A4 MXFP4 loses accuracy: weights only vs activations only vs both, per linear type.

    python benchmarks/error_breakdown.py [--model smollm2-135m] [--rotation block-rot|rtn] [--eval-windows 4]
        [--json benchmarks/results/error_breakdown.json]

For each group of linears (``attn_in`` = q/k/v_proj, ``attn_out`` = o_proj, ``mlp_in`` = gate/up_proj,
``mlp_out`` = down_proj, and ``all`` of them; ``lm_head`` stays in full precision as in every recipe)
and each mode, WikiText-2 test perplexity (``--eval-windows`` x ``--seq-len``) of the model with only
that group quantized:

- ``weights``: MXFP4 weights, activations in full precision (``act_quant=False``);
- ``activations``: full-precision weights, MXFP4 activations: each input ``x`` of the group's linears
  becomes ``Q(pad(x) R) R^T`` (``R`` the same 32-wide block Hadamard, or none for ``rtn``; ``Q`` MXFP4
  fake quantization with the same scale rule), which is what the weights see of the activation error;
- ``both``: W4A4, as ``torchao-mx compare`` runs it.

The numbers say which side and which layers cost the most, the first step of any accuracy work.
"""

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "attn_in": ("q_proj", "k_proj", "v_proj"),
    "attn_out": ("o_proj",),
    "mlp_in": ("gate_proj", "up_proj"),
    "mlp_out": ("down_proj",),
}
GROUPS["all"] = tuple(name for names in GROUPS.values() for name in names)
MODES = ("weights", "activations", "both")


def fake_quantize_input(x: torch.Tensor, block: Optional[torch.Tensor], scale_rule: str) -> torch.Tensor:
    """``Q(pad(x) R) R^T`` cut back to ``x``'s width: the activation error alone, in ``x``'s domain
    (``R`` orthogonal, block-diagonal with ``block``; ``None``: no rotation)."""
    from torchao_mx_ext.mx.quantize import mxfp4_fake_quantize
    from torchao_mx_ext.rotation.rotations import apply_block_rotation, pad_and_rotate
    from torchao_mx_ext.tensors.rotated_mxfp4_tensor import padded_width

    width = x.shape[-1]
    padded = padded_width(width, 32, None if block is None else block.shape[0])
    q = mxfp4_fake_quantize(pad_and_rotate(x, padded, block), 32, scale_rule)
    if block is not None:
        q = apply_block_rotation(q, block.T.contiguous().to(q.dtype))
    return q[..., :width]


def quantize_activations_only(model: torch.nn.Module, names, block, scale_rule: str) -> List:
    """Forward pre-hooks on the linears whose short name is in ``names``; returns the handles."""
    handles = []
    for fqn, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and fqn.rpartition(".")[2] in names:
            handles.append(module.register_forward_pre_hook(
                lambda mod, args: (fake_quantize_input(args[0], block, scale_rule),) + tuple(args[1:])))
    return handles


def build(model_name: str, mode: str, group: str, rotation: str, scale_rule: str):
    import torchao_mx_ext as tme
    from torchao_mx_ext.configs import quantize_linears
    from torchao_mx_ext.rotation.rotations import rotation_block
    from torchao_mx_ext.zoo import load_model

    model, _ = load_model(model_name)
    names = GROUPS[group]
    if mode == "activations":
        block = rotation_block("hadamard", 32) if rotation == "block-rot" else None
        quantize_activations_only(model, names, block, scale_rule)
        return model
    cls = tme.MXFP4BlockRotConfig if rotation == "block-rot" else tme.MXFP4Config
    config = cls(scale_rule=scale_rule, act_quant=mode == "both")
    quantize_linears(model, lambda short: config if short in names else None)
    return model


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rotation", choices=("block-rot", "rtn"), default="block-rot")
    p.add_argument("--scale-rule", default=None, help="MXFP4 scale rule (default: the package default)")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's evaluation window (zoo)")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma list of: {', '.join(GROUPS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of: {', '.join(MODES)}")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/error_breakdown.json")
    args = p.parse_args(argv)
    groups, modes = args.groups.split(","), args.modes.split(",")
    bad = [g for g in groups if g not in GROUPS] + [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"error_breakdown: unknown groups/modes {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from torchao_mx_ext.configs import DEFAULT_SCALE_RULE
    from torchao_mx_ext.eval.perplexity import perplexity, tokenize_for_perplexity, wikitext2_test_text
    from torchao_mx_ext.paths import data_dir
    from torchao_mx_ext.zoo import DEFAULT_SEQ_LEN, load_model

    rule = args.scale_rule or DEFAULT_SCALE_RULE
    seq_len = args.seq_len or DEFAULT_SEQ_LEN.get(args.model, 2048)
    fp, tokenizer = load_model(args.model)
    ids = tokenize_for_perplexity(tokenizer, wikitext2_test_text(data_dir()))
    t0 = time.perf_counter()
    fp_ppl = perplexity(fp, ids, seq_len, args.eval_windows, progress=False)["ppl"]
    del fp
    rows = []
    for group in groups:
        row = {"group": group, "linears": list(GROUPS[group])}
        for mode in modes:
            model = build(args.model, mode, group, args.rotation, rule)
            row[mode] = perplexity(model, ids, seq_len, args.eval_windows, progress=False)["ppl"]
            print(f"[{time.perf_counter() - t0:6.0f} s] {group:<8} {mode:<11} ppl {row[mode]:.3f}", flush=True)
            del model
        rows.append(row)
    report = {
        "model": args.model, "rotation": args.rotation, "scale_rule": rule, "eval_windows": args.eval_windows,
        "seq_len": seq_len, "fp_ppl": fp_ppl, "rows": rows, "total_s": time.perf_counter() - t0,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(f"{args.model}, {args.rotation}, {rule} scales, WikiText-2 test {args.eval_windows} x {seq_len}: fp {fp_ppl:.3f}; "
          "perplexity (x fp) with only that group quantized")
    print(f"{'group':<10}" + "".join(f"{m:>22}" for m in modes))
    for row in rows:
        print(f"{row['group']:<10}" + "".join(f"{row[m]:>14.3f} ({row[m] / fp_ppl:4.2f}x)" for m in modes))
    if args.json:
        from torchao_mx_ext.cli import write_json_atomic

        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
