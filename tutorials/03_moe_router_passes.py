"""Tutorial 3: a Mixture-of-Experts model: prune experts per input (PESF, Ban&Pick), quantize its
experts to MXFP4, re-fit its routers (QESC), compile, save and reload.

    python tutorials/03_moe_router_passes.py          # MoEfied SmolLM2-135M (16 experts, top-14)
    python tutorials/03_moe_router_passes.py --fast   # stories260k MoEfied on the spot (CI)

No small trained MoE exists offline, so the model is a real dense model split into experts
("MoEfication", torchao_mx_ext.experiments.moefy): a genuine transformers Qwen2-MoE whose experts are groups
of the dense MLP's neurons and whose routers were fitted to predict them. Router passes are FX graph
rewrites installed as subclasses of the router classes: they stay visible to torch.compile and
torch.export, keep output shapes fixed (a pruned slot points at expert index E with weight 0), and
come off again with remove_router_passes.
"""

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import torchao_mx_ext as tme
from torchao_mx_ext.calibration.data import calibration_ids
from torchao_mx_ext.eval import perplexity, tokenize_for_perplexity, wikitext2_test_text
from torchao_mx_ext.hf import save_pretrained
from torchao_mx_ext.moe import (
    apply_router_pass, calibrate_ban_pick, measure_active_experts, qesc_quantize, remove_router_passes, topk_agreement,
)
from torchao_mx_ext.zoo import data_dir, load_model


def moe_model(fast: bool):
    if not fast:
        return load_model("smollm2-135m-moe")  # built once into the cache (scripts/build_moe_smollm2.py)
    from torchao_mx_ext.experiments.moefy import moefy

    dense, tok = load_model("stories260k")
    calib = calibration_ids(tok, "tinystories", 8, 256, seed=0)
    return moefy(dense, calib, num_experts=4, top_k=2), tok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="stories260k MoEfied on the spot, short windows (CI)")
    p.add_argument("--out", default="tutorials/output/moe_mxfp4_qesc", help="where the quantized checkpoint goes")
    args = p.parse_args()
    seq_len, windows = (256, 2) if args.fast else (2048, 2)
    torch.manual_seed(0)

    # 1. The model: a transformers MoE (its routers are what the passes rewrite).
    model, tok = moe_model(args.fast)
    ids = tokenize_for_perplexity(tok, wikitext2_test_text(data_dir()))
    window = ids[:, :seq_len]
    calib = calibration_ids(tok, "wikitext2", 8, min(seq_len, 512), seed=0)  # validation split

    def report(name, m):
        ppl = perplexity(m, ids, seq_len, windows, progress=False)["ppl"]
        active = measure_active_experts(m, window).mean
        print(f"{name:<22} ppl {ppl:8.3f}   experts per token {active:5.2f}")

    cfg = model.config
    print(f"{type(model).__name__}: {cfg.num_experts} experts per layer, top-{cfg.num_experts_per_tok}")
    report("baseline", model)

    # 2. PESF (EAC-MoE): per sequence, drop experts chosen fewer than alpha * l * K / N times.
    with torch.no_grad():
        before = model(window).logits
    apply_router_pass(model, tme.PESFConfig(alpha=0.3))
    report("PESF alpha 0.3", model)
    remove_router_passes(model)  # reversible: the original routers are back
    with torch.no_grad():
        print(f"passes removed, logits identical to the original: {torch.equal(model(window).logits, before)}")

    # 3. Ban&Pick: key experts and per-layer Ban thresholds measured on calibration text.
    config = calibrate_ban_pick(model, calib)
    apply_router_pass(model, config)
    report("Ban&Pick (calibrated)", model)
    remove_router_passes(model)

    # 4. MXFP4 experts and linears (W4A4, block Hadamard), with and without QESC router re-fitting.
    fp = model
    plain, with_qesc = copy.deepcopy(fp), copy.deepcopy(fp)
    qesc_quantize(plain, calib, tme.MXFP4BlockRotConfig(), calibrate_routers=False, progress=False)
    qesc_quantize(with_qesc, calib, tme.MXFP4BlockRotConfig(), progress=False)
    for name, m in (("MXFP4", plain), ("MXFP4 + QESC", with_qesc)):
        report(name, m)
        print(f"{'':<22} top-k agreement with the fp routers {topk_agreement(fp, m, window)['mean']:.3f}")

    # 5. Compile one MoE block with a router pass on top of the MXFP4 experts: one graph, no breaks.
    block = next(layer.mlp for layer in with_qesc.model.layers if hasattr(layer.mlp, "experts"))
    apply_router_pass(with_qesc, tme.PESFConfig(alpha=0.3))
    x = torch.randn(1, 64, cfg.hidden_size)
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True)(x)
    print(f"compiled a MoE block (PESF router + MXFP4 experts): max |compiled - eager| = {(compiled - eager).abs().max():.2e}")
    remove_router_passes(with_qesc)

    # 6. Save through our quantization method and load back with plain transformers.
    out = Path(args.out)
    save_pretrained(with_qesc, out, tokenizer=tok)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        same = torch.equal(reloaded(window).logits, with_qesc(window).logits)
    print(f"reloaded the MXFP4 MoE (experts {type(reloaded.model.layers[-1].mlp.experts).__name__}): logits identical: {same}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
