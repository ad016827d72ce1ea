"""Train a sparse MoE from SmolLM2-135M: MoEfy into a shared expert and 32 routed experts (top-3), then fine-tune.

Why this model (and not a MoE trained from scratch): the only text offline is ~0.8 MB of TinyStories and
WikiText-2 validation (~1.1 MB); a MoE trained from scratch on it is a toy that overfits in minutes and
scores at chance on the zero-shot sets. Starting from a real LLM keeps what the quantization and
router methods react to (massive activations, a real attention stack, WikiText-2 perplexity in the
20s), and the sparse routing is then *trained*, as in LLaMA-MoE (Zhu et al., arXiv 2406.16554: split
the FFN neurons into experts, then continue training with a routing gate and a balance loss):

1. MoEfication (:func:`torchao_mx_ext.experiments.moefy.moefy`): each MLP of layers 1..29 is split into
   an always-on shared expert of the ``--shared-neurons`` most important neurons (default 256) and
   ``--num-experts`` routed experts of co-activating neurons (default 32 of 40) with a fitted linear
   router, routed ``--top-k`` (default 3): 376 of 1536 neurons per token (layer 0 stays dense, like
   DeepSeek-MoE's first layer). ``--shared-neurons 0`` splits the whole MLP (LLaMA-MoE's layout).
2. Fine-tuning: the routers and the experts (gate/up/down) of every MoE layer are trained with the
   language-modelling loss plus the Switch-Transformer load-balancing loss (``router_aux_loss_coef``,
   transformers' ``load_balancing_loss_func``); attention, norms and embeddings stay frozen. Data:
   512-token windows drawn alternately from TinyStories and WikiText-2 *validation* (the last 10% of
   each held out for early stopping); never the WikiText-2 test split. Training stops when the
   held-out loss has not improved for ``--patience`` evaluations or the ``--budget-min`` time is spent;
   the best state is kept.

The shared expert (Qwen2-MoE / DeepSeek-MoE layout: the ``S`` neurons with the largest mean contribution
always on, the other ``I - S`` split into the routed experts, ``S + k (I - S) / E`` neurons per token)
keeps the always-important neurons out of the routing, where a plain split has to route them too. It is
the default because it measures better (WikiText-2 test, 4 x 2048, 242 steps, ``docs/results.md``): top-3
of 32 + 256 shared (376 active neurons) starts at 199.5 and trains to 68.2; top-4 of 16 without a shared
expert (384 active) starts at 5241 and trains to 118.0; the dense model pruned to 384 neurons and
fine-tuned the same way reaches 94.0 (held-out loss at step 100: 3.88 / 4.58 / 4.00).

The model is written once to ``<cache>/models/smollm2-135m-moe-e{E}k{k}[s{S}]-trained`` (its ``config.json``
records the settings under ``moe_training``); the curve and the checks (WikiText-2 test perplexity of
the dense model, the MoEfied model and the trained one; expert load balance; routing concentration) go
to ``results/train_moe_smollm2.json`` (``results/train_moe_smollm2_e{E}k{k}s{S}.json`` with a shared expert).

    .venv/bin/python scripts/train_moe_smollm2.py --max-steps 242 --budget-min 50   # ~40 min on 2 cores
    .venv/bin/python scripts/train_moe_smollm2.py --num-experts 16 --top-k 4 --shared-neurons 0   # no shared expert
    .venv/bin/python scripts/train_moe_smollm2.py --budget-min 2 --eval-every 5 --output /tmp/moe  # smoke

``--dense-reference`` trains the yardstick the MoE is judged against instead: the dense model of the same
*active* size. Each MLP of the same layers keeps the MoE's active neurons (384 of 1536 at top-4 of 16), the
ones with the largest ``mean_t |act_fn(gate x) * up x| * ||down[:, j]||`` on the same calibration windows
(structured magnitude pruning), and those MLPs are fine-tuned with the same data, optimiser, learning
rate and step budget (``--max-steps`` = the MoE run's steps), no router and no balance loss. Only its
perplexity is kept (``results/train_dense_reference_smollm2.json``); the pruned MLPs have per-layer
widths that one ``LlamaConfig`` cannot express, so it is not saved.
"""

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchao_mx_ext.calibration.data import calibration_ids  # noqa: E402
from torchao_mx_ext.eval.perplexity import perplexity, tokenize_for_perplexity, wikitext2_test_text  # noqa: E402
from torchao_mx_ext.experiments.moefy import moefy, save, set_router_temperature  # noqa: E402
from torchao_mx_ext.zoo import cache_dir, data_dir, load_model  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--shared-neurons", type=int, default=256,
                   help="always-on shared expert of this many neurons (the most important ones); the other "
                        "neurons are split into the routed experts (Qwen2-MoE / DeepSeek-MoE layout)")
    p.add_argument("--seq-len", type=int, default=512, help="training window")
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of the experts")
    p.add_argument("--router-lr", type=float, default=3e-5, help="AdamW learning rate of the routers")
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--eval-every", type=int, default=20, help="steps between held-out evaluations")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows per source")
    p.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    p.add_argument("--budget-min", type=float, default=55.0, help="training time budget (minutes)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: no limit)")
    p.add_argument("--dense-reference", action="store_true",
                   help="train the dense model of the same active MLP size instead of the MoE (see above)")
    p.add_argument("--test-windows", type=int, default=4, help="WikiText-2 test windows of 2048 for the checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None)
    p.add_argument("--results", default=None,
                   help="JSON record (default: results/train_moe_smollm2.json, or "
                        "results/train_dense_reference_smollm2.json with --dense-reference)")
    args = p.parse_args()
    if args.results is None:
        shape = f"_e{args.num_experts}k{args.top_k}s{args.shared_neurons}" if args.shared_neurons else ""
        name = f"train_dense_reference_smollm2{shape}.json" if args.dense_reference else f"train_moe_smollm2{shape}.json"
        args.results = str(ROOT / "results" / name)
    return args


def active_neurons(intermediate: int, num_experts: int, top_k: int, shared: int) -> int:
    """MLP neurons a token uses: the shared expert's plus ``top_k`` routed experts of
    ``m = (intermediate - shared) / num_experts`` neurons each. ``m`` must be a whole multiple of 8:
    otherwise MoEfication pads the experts with zero neurons, and its balanced split gathers the padding
    in a few experts (measured on stories260k: 48, 48, 48 and 20 real neurons), so the active size would
    depend on the routing."""
    routed, rest = divmod(intermediate - shared, num_experts)
    if shared < 0 or rest or routed % 8:
        raise ValueError(f"(intermediate {intermediate} - shared {shared}) / {num_experts} experts must be a whole "
                         f"multiple of 8 neurons per expert; e.g. --shared-neurons "
                         f"{intermediate % (8 * num_experts)} or that plus a multiple of {8 * num_experts}")
    return shared + top_k * routed


def token_splits(tokenizer, held_out_fraction=0.1):
    """``{source: (train_ids, held_out_ids)}``: each text's last ``held_out_fraction`` is held out."""
    from torchao_mx_ext.calibration.data import read_text, resolve_source

    splits = {}
    for source in ("tinystories", "wikitext2"):
        ids = tokenizer(read_text(resolve_source(source)), return_tensors="pt").input_ids[0]
        cut = int(len(ids) * (1 - held_out_fraction))
        splits[source] = (ids[:cut], ids[cut:])
    return splits


def windows(ids, seq_len):
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def normalise_top_k_weights(model):
    """Re-parametrise the MoEfied blocks for training, exactly at the start: MoEfication stores each
    expert as ``E y_e`` weighted by near-uniform softmax probabilities ``p_e ~ 1/E`` (not renormalised),
    so a router that learns to concentrate its softmax would scale an expert's output up to ``E`` times.
    With ``norm_topk_prob=True`` the top-k weights are renormalised to sum to 1 (``~1/k`` each at the
    start) and the experts are stored as ``k y_e`` (down_proj times ``k / E``): the same output now, and
    a convex combination of the chosen experts (times ``k``) whatever the router learns.

    The router is rescaled to temperature 1 (logits = the fitted log-norm scores, spread O(1)): at
    MoEfication's tiny temperature (~1e-5) one Adam step, whose size does not follow the weights' scale,
    would swamp the fitted scores and make the routing random (measured: loss 5.3 -> 11.9 in 5 steps).
    The top-k choice is the same; the weights now follow each expert's estimated share of the output."""
    set_router_temperature(model, 1.0)
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            module.norm_topk_prob = True
        if type(module).__name__.endswith("Experts"):
            module.down_proj.mul_(k / E)
    model.config.norm_topk_prob = True


@torch.no_grad()
def prune_mlps_to_active_size(model, calib_ids, keep_fraction, dense_layers=(0,)):
    """Keep ``keep_fraction`` of the neurons of every MLP outside ``dense_layers``, in place: the ones
    with the largest ``mean_t |act_fn(gate x) * up x| * ||down[:, j]||`` over ``calib_ids`` (the neuron's
    mean contribution to the MLP output's norm). Returns the number of neurons kept per pruned layer."""
    layers = model.model.layers
    scores = {}

    def hook(i):
        def record(mlp, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            act = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().sum(0)
            scores[i] = scores.get(i, 0) + act
        return record

    pruned = [i for i in range(len(layers)) if i not in set(dense_layers)]
    handles = [layers[i].mlp.register_forward_pre_hook(hook(i)) for i in pruned]
    model.eval()
    for window in calib_ids:
        model(window[None], use_cache=False)
    for h in handles:
        h.remove()
    keep = None
    for i in pruned:
        mlp = layers[i].mlp
        score = scores[i] * mlp.down_proj.weight.float().norm(dim=0)
        keep = max(1, round(keep_fraction * score.numel()))
        idx = score.topk(keep).indices.sort().values
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, keep, bias=old.bias is not None, dtype=old.weight.dtype)
            new.weight.copy_(old.weight[idx])
            if old.bias is not None:
                new.bias.copy_(old.bias[idx])
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(keep, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype)
        new.weight.copy_(old.weight[:, idx])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        mlp.down_proj = new
    return keep


def pruned_mlp_parameters(model, dense_layers=(0,)):
    """The MLP parameters of the pruned layers; everything else is frozen."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        parts = name.split(".")
        if ".mlp." in name and int(parts[parts.index("layers") + 1]) not in set(dense_layers):
            params.append(p)
    for p in params:
        p.requires_grad_(True)
    return params


def moe_parameters(model):
    """(expert parameters, router parameters) of the MoE layers; everything else is frozen. The shared
    expert trains with the experts, its sigmoid gate with the routers."""
    experts, routers = [], []
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        if ".mlp.experts." in name or ".mlp.shared_expert." in name:
            experts.append(p)
        elif ".mlp.gate." in name or ".mlp.shared_expert_gate." in name:
            routers.append(p)
    for p in experts + routers:
        p.requires_grad_(True)
    return experts, routers


@torch.no_grad()
def held_out_loss(model, batches):
    model.eval()
    losses = [model(b, labels=b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def routing_stats(model, ids, seq_len, windows_n):
    """Expert load and routing concentration over WikiText-2 test windows, per MoE layer.

    ``load_cv``: coefficient of variation of the experts' token shares (0 = perfectly balanced);
    ``max_load``: the busiest expert's share times E (1 = its fair share); ``top1_share``: the largest
    routing weight over the sum of the top-k weights, mean over tokens (1/k = flat, 1 = one expert);
    ``topk_mass``: the softmax mass the top-k experts hold (k/E = flat)."""
    captured = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append(out[0].float()))
             for n, m in model.named_modules() if type(m).__name__.endswith("TopKRouter")]
    model.eval()
    for i in range(windows_n):
        captured_layer = len(captured)
        model(ids[:, i * seq_len:(i + 1) * seq_len], use_cache=False)
        assert len(captured) - captured_layer == len(hooks)
    for h in hooks:
        h.remove()
    L = len(hooks)
    per_layer = [torch.cat(captured[j::L]) for j in range(L)]  # router logits [tokens, E] per layer
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    stats = []
    for logits in per_layer:
        probs = logits.softmax(-1)
        top, idx = probs.topk(k, dim=-1)
        load = torch.bincount(idx.flatten(), minlength=E).float()
        load /= load.sum()
        stats.append({
            "load_cv": (load.std() / load.mean()).item(),
            "max_load": (load.max() * E).item(),
            "top1_share": (top[:, 0] / top.sum(-1)).mean().item(),
            "topk_mass": top.sum(-1).mean().item(),
        })
    mean = {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}
    return {"mean_over_layers": mean, "per_layer": stats}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    E, k, S = args.num_experts, args.top_k, args.shared_neurons
    shape = f"e{E}k{k}" + (f"s{S}" if S else "")
    out_dir = Path(args.output) if args.output else cache_dir() / "models" / f"smollm2-135m-moe-{shape}-trained"
    t_start = time.time()
    record = {"settings": vars(args).copy(), "machine": f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}"}

    dense, tokenizer = load_model("smollm2-135m")
    intermediate = dense.config.intermediate_size
    record["active_neurons"] = active_neurons(intermediate, E, k, S)  # refuses padded shapes before any work
    calib = calibration_ids(tokenizer, "wikitext2", 16, 512, seed=args.seed)
    test_ids = tokenize_for_perplexity(tokenizer, wikitext2_test_text(data_dir()))
    ppl_dense = perplexity(dense, test_ids, 2048, args.test_windows, progress=False)["ppl"]
    record["ppl_dense"] = ppl_dense
    if args.dense_reference:
        print(f"[{time.time() - t_start:5.0f} s] pruning the MLPs to the MoE's active size "
              f"({record['active_neurons']} of {intermediate} neurons)", flush=True)
        model = dense
        record["neurons_kept"] = prune_mlps_to_active_size(model, calib, record["active_neurons"] / intermediate,
                                                           dense_layers=[0])
        ppl_start = perplexity(model, test_ids, 2048, args.test_windows, progress=False)["ppl"]
        print(f"[{time.time() - t_start:5.0f} s] WikiText-2 test ppl: dense {ppl_dense:.2f}, pruned to "
              f"{record['neurons_kept']} neurons {ppl_start:.2f}", flush=True)
        record["ppl_pruned"] = ppl_start
        trained, router_groups = pruned_mlp_parameters(model, dense_layers=[0]), []
    else:
        print(f"[{time.time() - t_start:5.0f} s] MoEfying SmolLM2-135M into {E} experts, top-{k}"
              + (f", shared expert of {S} neurons" if S else ""), flush=True)
        model = moefy(dense, calib, num_experts=E, top_k=k, shared_neurons=S, dense_layers=[0], seed=args.seed)
        del dense
        normalise_top_k_weights(model)
        model.config.router_aux_loss_coef = args.aux_coef
        model.config.output_router_logits = True
        ppl_moefied = perplexity(model, test_ids, 2048, args.test_windows, progress=False)["ppl"]
        print(f"[{time.time() - t_start:5.0f} s] WikiText-2 test ppl: dense {ppl_dense:.2f}, MoEfied top-{k} {ppl_moefied:.2f}", flush=True)
        record["ppl_moefied"] = ppl_moefied
        record["routing_moefied"] = routing_stats(model, test_ids, 2048, 1)["mean_over_layers"]
        trained, routers = moe_parameters(model)
        router_groups = [{"params": routers, "lr": args.router_lr}]

    splits = token_splits(tokenizer)
    train = {s: windows(tr, args.seq_len) for s, (tr, _) in splits.items()}
    held = [windows(ho, args.seq_len)[: args.eval_windows] for _, ho in splits.values()]
    held_batches = [w[i:i + args.batch] for w in held for i in range(0, len(w), args.batch)]
    record["data"] = {s: {"train_windows": len(train[s]), "held_out_windows": len(h)} for s, h in zip(train, held)}
    opt = torch.optim.AdamW([{"params": trained, "lr": args.lr}, *router_groups],
                            weight_decay=0.0, betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    best, best_state, bad, curve, step = held_out_loss(model, held_batches), None, 0, [], 0
    curve.append({"step": 0, "tokens": 0, "held_out_loss": best, "s": time.time() - t_start})
    print(f"[{time.time() - t_start:5.0f} s] step 0: held-out loss {best:.4f} (ppl {math.exp(best):.2f})", flush=True)
    t_train = time.time()
    sources = list(train)
    while True:
        step += 1
        src = train[sources[step % len(sources)]]
        batch = src[torch.randint(0, len(src), (args.batch,), generator=gen)]
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * min(1.0, step / args.warmup)
        out = model(batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = out.aux_loss.item() if getattr(out, "aux_loss", None) is not None else None
        if step % 5 == 0:
            print(f"[{time.time() - t_start:5.0f} s] step {step}: loss {out.loss.item():.4f}"
                  + (f" (aux {aux:.3f})" if aux is not None else ""), flush=True)
        out_of_time = time.time() - t_train > args.budget_min * 60 or step == args.max_steps
        if step % args.eval_every == 0 or out_of_time:
            loss = held_out_loss(model, held_batches)
            curve.append({"step": step, "tokens": step * args.batch * args.seq_len, "held_out_loss": loss,
                          "train_loss": out.loss.item(), "aux_loss": aux, "s": time.time() - t_start})
            improved = loss < best - 1e-4
            if improved:
                best, bad = loss, 0
                best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            else:
                bad += 1
            print(f"[{time.time() - t_start:5.0f} s] step {step}: held-out loss {loss:.4f} (ppl {math.exp(loss):.2f})"
                  f"{' best' if improved else f', no gain {bad}/{args.patience}'}", flush=True)
            if bad >= args.patience or out_of_time:
                break
    record["stopped"] = ("patience" if bad >= args.patience else "max steps" if step == args.max_steps
                         else "time budget")
    record["train_s"] = time.time() - t_train
    record["curve"] = curve
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    record["ppl_trained"] = perplexity(model, test_ids, 2048, args.test_windows, progress=False)["ppl"]
    if args.dense_reference:
        print(f"[{time.time() - t_start:5.0f} s] trained: WikiText-2 test ppl {record['ppl_trained']:.2f} "
              f"(dense {ppl_dense:.2f}, pruned {record['ppl_pruned']:.2f})", flush=True)
    else:
        model.config.output_router_logits = False
        model.config.moe_training = {
            "recipe": "MoEfication (co-activation split, fitted routers"
                      + (f", shared expert of the {S} most important neurons" if S else "")
                      + ") + fine-tuning of experts and routers (scripts/train_moe_smollm2.py)",
            "active_neurons": record["active_neurons"],
            "steps": step, "tokens": step * args.batch * args.seq_len, "best_held_out_loss": best,
            **{key: record["settings"][key] for key in ("num_experts", "top_k", "shared_neurons", "seq_len", "batch", "lr",
                                                        "router_lr", "aux_coef", "warmup", "seed")},
            "data": "TinyStories subset + WikiText-2 validation (first 90% each), alternating windows",
        }
        record["routing_trained"] = routing_stats(model, test_ids, 2048, args.test_windows)
        print(f"[{time.time() - t_start:5.0f} s] trained: WikiText-2 test ppl {record['ppl_trained']:.2f} "
              f"(dense {ppl_dense:.2f}, MoEfied {record['ppl_moefied']:.2f}); "
              f"routing {record['routing_trained']['mean_over_layers']}", flush=True)
        save(model, out_dir, tokenizer)
        record["checkpoint"] = str(out_dir)
    record["total_s"] = time.time() - t_start
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}" + ("" if args.dense_reference else f"; saved {out_dir}"), flush=True)


if __name__ == "__main__":
    main()
