"""Build the MoEfied SmolLM2-135M evaluation model.

Splits each of SmolLM2-135M's 30 MLPs (1536 SwiGLU neurons) into ``E`` experts by co-activation
clustering and fits linear routers on WikiText-2 *validation* windows (torchao_mx_ext.experiments.moefy), saves
a Qwen2-MoE checkpoint (+ tokenizer, + neuron partition) under
``<cache>/models/smollm2-135m-moe-e{E}k{k}``, reloads it from disk and reports, on WikiText-2 raw *test*
(GPTQ-style windows of 2048 tokens, the first ``--windows``):

- the dense model's perplexity and the MoE's at ``top_k = E`` (with the max relative logits error
  ``max |z_moe - z_dense| / max |z_dense|`` over those windows) and at smaller ``top_k``;
- per-layer routed-MLP relative error (fitted router vs oracle vs random selection) on held-out
  validation windows.

Numbers go to ``results/moefy_smollm2.json``. Seeded and deterministic for a given machine.

    .venv/bin/python scripts/build_moe_smollm2.py            # E=16, default top_k 14, layer 0 dense
    .venv/bin/python scripts/build_moe_smollm2.py --top-k-list 12 10 8 6 4 2 --windows 4
"""

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchao_mx_ext.calibration.data import calibration_ids  # noqa: E402
from torchao_mx_ext.eval.perplexity import perplexity, tokenize_for_perplexity, wikitext2_test_text  # noqa: E402
from torchao_mx_ext.experiments.moefy import collect_mlp_inputs, moefy, routing_errors, save, set_top_k  # noqa: E402
from torchao_mx_ext.zoo import cache_dir, data_dir, load_model  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=14, help="default experts per token stored in the checkpoint")
    p.add_argument("--top-k-list", type=int, nargs="+", default=[12, 8, 4], help="smaller top_k values to evaluate")
    p.add_argument("--method", default="coactivation", choices=["coactivation", "weights"])
    p.add_argument("--router-target", default="log_norm", choices=["log_norm", "norm"])
    p.add_argument("--shared-neurons", type=int, default=0)
    p.add_argument("--dense-layers", type=int, nargs="*", default=[0],
                   help="layers whose MLP stays dense (Qwen2-MoE mlp_only_layers); SmolLM2's layer 0 is the most "
                   "sensitive by far")
    p.add_argument("--calib-source", default="wikitext2", choices=["wikitext2", "tinystories"])
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None,
                   help="checkpoint folder (default <cache>/models/smollm2-135m-moe-e{E}k{k})")
    p.add_argument("--results", default=str(ROOT / "results" / "moefy_smollm2.json"))
    return p.parse_args()


@torch.no_grad()
def dense_vs_full_moe(dense, moe, test_ids, seq_len, windows):
    """Perplexity of both models and the max relative logits error, window by window (the same
    cross-entropy as ``torchao_mx_ext.eval.perplexity.perplexity``)."""
    nll_dense, nll_moe, max_diff, max_ref = [], [], 0.0, 0.0
    for i in range(windows):
        window = test_ids[:, i * seq_len : (i + 1) * seq_len]
        ref = dense(window).logits[0, :-1].float()
        out = moe(window).logits[0, :-1].float()
        nll_dense.append(F.cross_entropy(ref, window[0, 1:]).item())
        nll_moe.append(F.cross_entropy(out, window[0, 1:]).item())
        max_diff = max(max_diff, (out - ref).abs().max().item())
        max_ref = max(max_ref, ref.abs().max().item())
    return (
        math.exp(sum(nll_dense) / windows),
        math.exp(sum(nll_moe) / windows),
        max_diff / max_ref,
    )


def main():
    args = parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("torchao_mx_ext.experiments.moefy").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    E, k = args.num_experts, args.top_k
    out_dir = Path(args.output) if args.output else cache_dir() / "models" / f"smollm2-135m-moe-e{E}k{k}"
    timings = {}

    t = time.time()
    dense, tokenizer = load_model("smollm2-135m")
    calib = calibration_ids(tokenizer, args.calib_source, args.calib_samples, args.calib_seq_len, seed=args.seed)
    # Held-out validation windows (another seed) for the routing diagnostics: not used by the fit.
    held_out = calibration_ids(tokenizer, args.calib_source, 1, args.calib_seq_len, seed=args.seed + 1)
    timings["load_s"] = round(time.time() - t, 1)
    print(f"dense SmolLM2-135M loaded; calibration {tuple(calib.shape)} from {args.calib_source} (validation)",
          flush=True)

    t = time.time()
    moe, result = moefy(
        dense, calib, num_experts=E, top_k=k, method=args.method, router_target=args.router_target,
        shared_neurons=args.shared_neurons, dense_layers=args.dense_layers, seed=args.seed, return_result=True,
    )
    timings["moefy_s"] = round(time.time() - t, 1)
    cfg = moe.config
    print(
        f"moefied in {timings['moefy_s']} s: {cfg.num_hidden_layers} layers x {E} experts of "
        f"{cfg.moe_intermediate_size} neurons ({args.method} split, {args.router_target} router), "
        f"dense layers {cfg.mlp_only_layers}, shared expert {cfg.shared_expert_intermediate_size}, "
        f"router temperature {result.router_temperature:.3g}, "
        f"top_k=E probe error {result.top_k_e_rel_error:.3g}",
        flush=True,
    )

    t = time.time()
    save(moe, out_dir, tokenizer, result)
    del moe
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    timings["save_reload_s"] = round(time.time() - t, 1)
    print(f"saved to {out_dir} and reloaded as {type(moe).__name__}", flush=True)

    t = time.time()
    held_out_inputs = collect_mlp_inputs(dense, held_out)
    diag = {}
    small = sorted({x for x in args.top_k_list if x < E} | {k}, reverse=True)
    all_errs = routing_errors(dense, moe, held_out, small, mlp_inputs=held_out_inputs)
    for top_k in small:
        errs = {name: [e for e in v if e is not None] for name, v in all_errs[top_k].items()}  # skip dense layers
        diag[str(top_k)] = {name: sum(v) / len(v) for name, v in errs.items()}
        diag[str(top_k)]["worst_layer_router"] = max(errs["router"])
        print(f"routed-MLP relative error (mean over layers), top_k={top_k}: "
              + ", ".join(f"{n} {v:.4f}" for n, v in diag[str(top_k)].items()), flush=True)
    timings["routing_diagnostics_s"] = round(time.time() - t, 1)

    t = time.time()
    test_ids = tokenize_for_perplexity(tokenizer, wikitext2_test_text(data_dir()))
    set_top_k(moe, E)
    ppl_dense, ppl_full, rel_err = dense_vs_full_moe(dense, moe, test_ids, args.seq_len, args.windows)
    print(f"WikiText-2 test ({args.windows} x {args.seq_len}): dense ppl {ppl_dense:.4f}; "
          f"MoE top_k={E} ppl {ppl_full:.4f}, max relative logits error {rel_err:.3g}", flush=True)
    ppl = {str(E): ppl_full}
    for top_k in small:
        set_top_k(moe, top_k)
        ppl[str(top_k)] = perplexity(moe, test_ids, args.seq_len, args.windows, progress=False)["ppl"]
        print(f"MoE top_k={top_k} ppl {ppl[str(top_k)]:.4f} ({ppl[str(top_k)] / ppl_dense:.3f}x dense)", flush=True)
    set_top_k(moe, k)
    timings["perplexity_s"] = round(time.time() - t, 1)

    record = {
        "model": "smollm2-135m",
        "checkpoint": str(out_dir),
        "architecture": type(moe).__name__,
        "num_experts": E,
        "default_top_k": k,
        "expert_size": cfg.moe_intermediate_size,
        "shared_expert_size": cfg.shared_expert_intermediate_size,
        "dense_layers": list(cfg.mlp_only_layers),
        "method": args.method,
        "router_target": args.router_target,
        "router_temperature": result.router_temperature,
        "calibration": {"source": args.calib_source + " (validation)", "samples": args.calib_samples,
                        "seq_len": args.calib_seq_len, "seed": args.seed},
        "eval": {"data": "WikiText-2 raw test, GPTQ-style windows", "seq_len": args.seq_len, "windows": args.windows},
        "ppl_dense": ppl_dense,
        "ppl_by_top_k": ppl,
        "max_rel_logit_error_top_k_E": rel_err,
        "max_rel_logit_error_definition": "max |z_moe - z_dense| / max |z_dense| over the evaluated windows, top_k = E",
        "top_k_E_probe_error_calibration": result.top_k_e_rel_error,
        "routed_mlp_rel_error_held_out": diag,
        "routed_mlp_rel_error_definition":
            "sum_t ||y - sum_{e in S} y_e||^2 / sum_t ||y||^2 per layer (routed part), mean over MoE layers",
        "timings_s": timings,
        "machine": f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}",
    }
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
