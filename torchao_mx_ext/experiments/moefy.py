"""MoEfication: turn a dense Llama-family model into a real Hugging Face Qwen2-MoE checkpoint.

Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts" (arXiv 2110.01786):
split every MLP's intermediate neurons into ``E`` equal-size groups (experts) and add a router that
predicts which groups matter for a token; computing only the ``k`` best groups approximates the MLP.

Dense SwiGLU MLP of one layer, neurons ``j = 1..I`` (rows ``g_j``, ``u_j`` of gate/up, column ``d_j`` of down):

    y(x) = sum_j a_j(x) d_j,        a_j(x) = silu(g_j . x) (u_j . x)

With a partition ``P_1..P_E`` of the neurons, ``y(x) = sum_e y_e(x)``, ``y_e(x) = sum_{j in P_e} a_j(x) d_j``.

Neuron split (``method``):

- ``"coactivation"`` (default; MoEfication's co-activation graph split, adapted to SwiGLU): neuron ``j``'s
  profile over calibration tokens is ``f_j[t] = |a_j(x_t)| ||d_j|| / n_t`` (``n_t`` makes each token's
  profile row unit-norm, so every token counts equally). Balanced k-means (equal cluster sizes ``m = I/E``)
  minimises ``sum_j ||f_j - mu_e(j)||^2 = const - (1/m) sum_e sum_{j,l in P_e} f_j . f_l``, i.e. it maximises
  the intra-expert co-activation ``sum_t sum_e (sum_{j in P_e} f_j[t])^2``: the balanced graph partition of
  MoEfication's co-activation graph, so a token's large neurons gather in few experts.
- ``"weights"`` (MoEfication's parameter-clustering split): balanced k-means on the unit-normalised rows
  ``[g_j, u_j]``; needs no activations.

Balanced k-means: Lloyd iterations with a greedy equal-size assignment, then an exact linear assignment
(each expert is ``m`` slots) to the final centres. If ``E`` does not divide ``I``, or ``m`` is not a
multiple of ``expert_size_multiple`` (8: transformers' ``grouped_mm`` experts backend needs 16-byte
rows), the MLP is padded with zero neurons (zero gate/up rows and down column: exactly zero output);
their slots are ``-1`` in :attr:`MoefyResult.expert_neurons`.

Router: Qwen2-MoE's router is a bias-free linear map ``logits = W_r x``. Per layer, ``W`` is the ridge
least-squares fit of ``s_e(x) = log ||y_e(x)||`` (``router_target="log_norm"``) or ``||y_e(x)||``
(``"norm"``) on the dense model's calibration MLP inputs; rows are centred (``sum_e W_e = 0``), which changes
no softmax and no ranking. With the log target, ``softmax(W x)`` estimates each expert's share of the
output norm ``||y_e|| / sum_f ||y_f||``. The stored router is ``W_r = tau W`` with a small temperature
``tau`` (below), so ``router_logits / tau`` are the fitted scores; ``tau`` is in
``config.moefication["router_temperature"]``.

Exact construction (Qwen2-MoE, ``norm_topk_prob=False``, ``qkv_bias`` as in the source, no q/k norm):
a Qwen2-MoE block computes ``sum_{e in topk(p)} p_e(x) f_e(x) + sigmoid(w_s . x) S(x)`` (``f_e`` the stored
expert, ``S`` the shared expert) with ``p = softmax(W_r x)``, not renormalised. We store each expert's
down_proj multiplied by ``E`` (exact for ``E`` a power of two), ``f_e = E y_e``, so expert ``e``
contributes ``E p_e(x) y_e(x)``, and

    E p_e(x) = exp(tau (s_e - s_bar)) / mean_f exp(tau (s_f - s_bar)) = 1 + O(tau * spread_e s_e(x)).

At ``top_k = E`` the MoE output is ``y(x) + sum_e (E p_e(x) - 1) y_e(x)``; each factor obeys
``|E p_e - 1| <= exp(tau (max_f s_f - min_f s_f)) - 1``. At smaller ``top_k`` the MoE computes
``sum_{e in top-k of s(x)} y_e(x)`` up to the same factor, which is MoEfication's approximation.
The softmax being fp32 (resolution ~6e-8 relative), the selection still resolves score differences of
about ``6e-8 / tau``, so ``tau`` should be as large as the tolerance allows: ``router_temperature="auto"``
picks ``tau`` so that the top_k = E logits error (below) on a calibration window (never a test split) is
about ``target_rel_error / 4`` (a margin for other inputs) and at most ``target_rel_error``; the error is
linear in ``tau`` above the fp32 floor (~1e-6 on stories260k).

Shared expert: Qwen2-MoE adds ``sigmoid(w_s . x) S(x)``. With ``shared_neurons=0`` its intermediate
size is 0, so it contributes exactly zero (a tool walking ``nn.Linear`` meets 0-width linears there and
must skip zero-element weights). With ``shared_neurons=n > 0`` the ``n`` neurons with the largest mean
contribution ``E_t |a_j(x_t)| ||d_j||`` become an always-on shared expert, exactly: ``w_s = 0`` gives
``sigmoid(0) = 0.5`` exactly and its down_proj is stored times 2; the other ``I - n`` neurons are split.

Dense layers: ``dense_layers`` keeps chosen layers' MLPs dense and exact (Qwen2-MoE ``mlp_only_layers``,
like DeepSeek-MoE's dense first layer). On SmolLM2-135M, MoEfying layer 0 alone at top_k = E/2 raised
perplexity 25.5 -> 32.7 on a validation window, while any other single layer cost at most ~1 point, so
the evaluation model keeps layer 0 dense (scripts/build_moe_smollm2.py).

Accuracy: SwiGLU activations are dense (no ReLU sparsity), so dropping experts without retraining is
lossy; routed-MLP relative errors and perplexities are reported by scripts/build_moe_smollm2.py.

"Reproduces the dense model" means: at ``top_k = E`` (the checkpoint's ``num_experts_per_tok`` set to
``E``), in float32, attention, norms, embeddings and LM head are bit-identical copies and the logits
differ from the dense model's by ``max |z_moe - z_dense| / max |z_dense| <= target_rel_error`` (1e-4 by
default; see :func:`max_relative_logit_error`), the difference coming from the routing weights
``E p_e = 1 + O(tau)`` and fp32 summation order (expert-by-expert instead of one matmul).
"""

import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Llama attention (no q/k norm; qwen2 adds q/k/v biases, which Qwen2-MoE has too) and a SwiGLU MLP.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
METHODS = ("coactivation", "weights")
ROUTER_TARGETS = ("log_norm", "norm")


@dataclass
class MoefyResult:
    """What :func:`moefy` did, per layer: ``expert_neurons[l]`` is ``[E, m]`` dense neuron indices (``-1`` =
    zero padding neuron), ``shared_neurons[l]`` the always-on neurons (possibly empty); both ``None`` for a
    layer kept dense (``dense_layers``)."""

    expert_neurons: List[torch.Tensor]
    shared_neurons: List[torch.Tensor]
    router_temperature: float
    top_k_e_rel_error: float
    metadata: Dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Checks and calibration statistics
# --------------------------------------------------------------------------------------------------


def check_dense_model(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a Llama-family causal LM Qwen2-MoE can reproduce exactly."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"moefy supports Llama-family dense models ({', '.join(SUPPORTED_MODEL_TYPES)}: Llama attention without "
            f"q/k norm, SwiGLU MLP); got model_type={model_type!r} ({type(model).__name__})"
        )
    if getattr(config, "mlp_bias", False):
        raise ValueError("moefy: MLP biases are not supported (Qwen2-MoE experts have no bias)")
    if model_type in ("llama", "mistral") and getattr(config, "attention_bias", False):
        raise ValueError("moefy: attention_bias=True gives o_proj a bias, which Qwen2-MoE attention lacks")
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        raise ValueError("moefy: sliding-window attention is not supported (sliding_window must be None)")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"moefy: only full attention is supported, got layer_types {sorted(set(layer_types))}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    names = ("gate_proj", "up_proj", "down_proj")
    if layers is None or not all(hasattr(layer.mlp, n) for layer in layers for n in names):
        raise ValueError("moefy: expected model.model.layers[i].mlp with gate_proj/up_proj/down_proj")


@torch.no_grad()
def collect_mlp_inputs(model: torch.nn.Module, calib_ids: torch.Tensor, batch_size: int = 4) -> List[torch.Tensor]:
    """Each layer's MLP input (the post-attention RMSNorm output) on ``calib_ids [N, S]``: ``[N*S, H]`` fp32."""
    layers = model.model.layers
    store: List[List[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def hook(module, args, i=i):
            store[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

        hooks.append(layer.mlp.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            model(calib_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(chunks) for chunks in store]


def mlp_weights(layer: torch.nn.Module):
    """(gate [I, H], up [I, H], down [H, I]) of a dense layer's MLP, fp32."""
    mlp = layer.mlp
    return tuple(getattr(mlp, n).weight.detach().float() for n in ("gate_proj", "up_proj", "down_proj"))


def neuron_activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``a [T, I]``, ``a_j(x) = silu(g_j . x) (u_j . x)``."""
    return F.silu(x @ gate.T) * (x @ up.T)


# --------------------------------------------------------------------------------------------------
# Balanced clustering of neurons
# --------------------------------------------------------------------------------------------------


def balanced_assignment(cost: torch.Tensor, cluster_size: int, exact: bool = True) -> torch.Tensor:
    """Labels ``[N]`` with every cluster holding ``cluster_size`` points (``N = K * cluster_size``) that minimise
    ``sum_j cost[j, label_j]``: exactly (scipy's linear assignment to ``cluster_size`` slots per cluster,
    O(N^3)) or greedily (cheapest (point, cluster) pairs first, O(NK log NK);
    used inside Lloyd iterations)."""
    n, k = cost.shape
    if n != k * cluster_size:
        raise ValueError(f"{n} points cannot fill {k} clusters of {cluster_size}")
    if exact:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(np.repeat(cost.double().numpy(), cluster_size, axis=1))
        labels = torch.empty(n, dtype=torch.long)
        labels[torch.from_numpy(rows)] = torch.from_numpy(cols // cluster_size)
        return labels
    order = torch.argsort(cost.reshape(-1), stable=True).tolist()
    labels = [-1] * n
    fill = [0] * k
    left = n
    for flat in order:
        point, cluster = divmod(flat, k)
        if labels[point] < 0 and fill[cluster] < cluster_size:
            labels[point] = cluster
            fill[cluster] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(points: torch.Tensor, num_clusters: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Equal-size k-means of ``points [N, D]``; labels ``[N]``, every cluster ``N / K`` points.

    Minimises ``sum_j ||p_j - mu_{c(j)}||^2`` subject to ``|c^-1(e)| = N / K``: seeded k-means++ centres,
    Lloyd iterations with a greedy balanced assignment, then one exact balanced assignment to the final
    centres (the best of the two by the objective). Deterministic for a given ``seed``.
    """
    n = points.shape[0]
    if n % num_clusters:
        raise ValueError(f"{n} points do not split into {num_clusters} equal clusters")
    size = n // num_clusters
    points = points.float()
    sq_norms = (points * points).sum(1)
    gen = torch.Generator().manual_seed(seed)
    # k-means++ seeding: spread the initial centres.
    centres = [int(torch.randint(n, (1,), generator=gen))]
    dist = (sq_norms - 2 * points @ points[centres[0]] + sq_norms[centres[0]]).clamp_min(0)
    for _ in range(1, num_clusters):
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full((n,), 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        centres.append(nxt)
        dist = torch.minimum(dist, (sq_norms - 2 * points @ points[nxt] + sq_norms[nxt]).clamp_min(0))
    mu = points[centres].clone()

    def centroids(labels):
        return F.one_hot(labels, num_clusters).T.float() @ points / size

    def objective(labels):
        return (sq_norms.sum() - size * (centroids(labels) ** 2).sum()).item()

    labels = None
    for _ in range(iters):
        # ||p - mu||^2 without the per-point constant ||p||^2 (irrelevant to a balanced assignment).
        new = balanced_assignment((mu * mu).sum(1)[None, :] - 2 * points @ mu.T, size, exact=False)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        mu = centroids(labels)
    exact = balanced_assignment((mu * mu).sum(1)[None, :] - 2 * points @ mu.T, size, exact=True)
    return exact if objective(exact) <= objective(labels) else labels


def expert_size_for(num_neurons: int, num_experts: int, size_multiple: int = 1) -> int:
    """Neurons per expert: ``ceil(num_neurons / E)`` rounded up to a multiple of ``size_multiple``."""
    return math.ceil(math.ceil(num_neurons / num_experts) / size_multiple) * size_multiple


def split_neurons(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    activations: Optional[torch.Tensor],
    num_experts: int,
    method: str = "coactivation",
    candidates: Optional[torch.Tensor] = None,
    max_tokens: int = 8192,
    seed: int = 0,
    size_multiple: int = 1,
) -> torch.Tensor:
    """``[E, m]`` neuron indices per expert (a partition of ``candidates``, default all neurons; ``-1`` = padding);
    ``m`` is ``ceil(#candidates / E)`` rounded up to a multiple of ``size_multiple``. ``activations``:
    ``a [T, I]`` (:func:`neuron_activations`) on calibration MLP inputs, needed by ``"coactivation"``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    idx = torch.arange(gate.shape[0]) if candidates is None else candidates
    size = expert_size_for(idx.numel(), num_experts, size_multiple)
    pad = size * num_experts - idx.numel()
    if method == "weights":
        feats = torch.cat([gate[idx], up[idx]], dim=1)
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        if activations is None:
            raise ValueError("method='coactivation' needs calibration activations")
        if activations.shape[0] > max_tokens:  # evenly spaced tokens: enough for the co-activation statistics
            activations = activations[torch.linspace(0, activations.shape[0] - 1, max_tokens).long()]
        contrib = activations[:, idx].abs() * down[:, idx].norm(dim=0)
        contrib = contrib / contrib.norm(dim=1, keepdim=True).clamp_min(1e-12)
        feats = contrib.T.contiguous()  # [neurons, tokens]
    # Zero points stand for padding neurons (exactly-zero experts' slots).
    feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])])
    labels = balanced_kmeans(feats, num_experts, seed=seed)
    padded_idx = torch.cat([idx, torch.full((pad,), -1, dtype=torch.long)])
    order = torch.argsort(labels, stable=True)
    experts = padded_idx[order].view(num_experts, size)
    # Sorted neuron order inside an expert (padding last): deterministic and readable.
    key = torch.where(experts < 0, torch.iinfo(torch.long).max, experts)
    return torch.gather(experts, 1, key.argsort(dim=1))


# --------------------------------------------------------------------------------------------------
# Expert tensors and router
# --------------------------------------------------------------------------------------------------


def _gather_neurons(gate, up, down, neurons: torch.Tensor):
    """(gate rows, up rows, down columns) of ``neurons`` (``-1`` -> zeros), shapes ``[m, H], [m, H], [H, m]``."""
    valid = neurons >= 0
    safe = neurons.clamp_min(0)
    g = gate[safe] * valid[:, None]
    u = up[safe] * valid[:, None]
    d = down[:, safe] * valid[None, :]
    return g, u, d


def expert_output_norms(activations: torch.Tensor, down: torch.Tensor, expert_neurons: torch.Tensor) -> torch.Tensor:
    """``[T, E]``: ``||y_e(x_t)|| = ||sum_{j in P_e} a_j(x_t) d_j||``, each expert's (unscaled) output norm;
    ``activations`` is ``a [T, I]``, ``down`` ``[H, I]``; padding slots (``-1``) contribute nothing."""
    cols = []
    for neurons in expert_neurons:
        real = neurons[neurons >= 0]
        cols.append((activations[:, real] @ down[:, real].T).norm(dim=1))
    return torch.stack(cols, dim=1)


def fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Ridge least squares ``W [E, H] = argmin sum_t ||W x_t - target_t||^2 + lam ||W||^2`` with
    ``lam = ridge * tr(X^T X) / H``; rows centred (``sum_e W_e = 0``: same softmax, same ranking)."""
    xd = x.double()
    gram = xd.T @ xd
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xd.T @ target.double()).T
    return (w - w.mean(0, keepdim=True)).float()


def router_scores_target(norms: torch.Tensor, router_target: str) -> torch.Tensor:
    if router_target == "log_norm":
        # eps keeps all-zero (padding-only) experts finite; relative to the typical expert norm.
        return torch.log(norms + 1e-6 * norms.mean().clamp_min(1e-30))
    if router_target == "norm":
        return norms
    raise ValueError(f"router_target must be one of {ROUTER_TARGETS}, got {router_target!r}")


# --------------------------------------------------------------------------------------------------
# Building the Qwen2-MoE model
# --------------------------------------------------------------------------------------------------


def moe_config(
    dense_config, num_experts: int, top_k: int, expert_size: int, shared_size: int, dense_layers: List[int],
    metadata: Dict,
):
    """A ``Qwen2MoeConfig`` with the dense model's attention/norm/embedding settings."""
    from transformers import Qwen2MoeConfig

    c = dense_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None)
    return Qwen2MoeConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        use_cache=True,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(rope) if rope is not None else None,
        use_sliding_window=False,
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        decoder_sparse_step=1,
        moe_intermediate_size=expert_size,
        shared_expert_intermediate_size=shared_size,
        num_experts_per_tok=top_k,
        num_experts=num_experts,
        norm_topk_prob=False,  # weights = softmax probs of all E experts (~1/E each), not renormalised
        mlp_only_layers=list(dense_layers),
        qkv_bias=c.model_type == "qwen2",
        pad_token_id=getattr(c, "pad_token_id", None),
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=getattr(c, "eos_token_id", None),
        moefication=metadata,
    )


def set_top_k(model: torch.nn.Module, top_k: int) -> None:
    """Route every token to ``top_k`` experts in a loaded Qwen2-MoE model (routers and config)."""
    num_experts = model.config.num_experts
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    for module in model.modules():
        if hasattr(module, "top_k") and hasattr(module, "norm_topk_prob") and hasattr(module, "weight"):
            module.top_k = top_k
    model.config.num_experts_per_tok = top_k


def set_router_temperature(model: torch.nn.Module, temperature: float) -> None:
    """Rescale every router so ``router_logits = temperature * fitted scores`` (uses the recorded temperature)."""
    old = model.config.moefication["router_temperature"]
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):  # dense (mlp_only) layers have no router
                layer.mlp.gate.weight.mul_(temperature / old)
    model.config.moefication["router_temperature"] = temperature


@torch.no_grad()
def max_relative_logit_error(reference, model: torch.nn.Module, ids: torch.Tensor) -> float:
    """``max |z_model - z_ref| / max |z_ref|`` over all positions and vocabulary entries of ``ids``;
    ``reference`` is a model or its logits on ``ids``."""
    if isinstance(reference, torch.nn.Module):
        reference = reference(ids.to(next(reference.parameters()).device), use_cache=False).logits
    ref = reference.float()
    out = model(ids.to(next(model.parameters()).device), use_cache=False).logits.float().to(ref.device)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _choose_temperature(dense, moe, probe_ids, target_rel_error: float, probe_temperature: float = 1e-3):
    """(tau, error): tau whose top_k = E logits error on ``probe_ids`` is about ``target_rel_error / 4``
    and at most ``target_rel_error``.

    The error is ~linear in tau above the fp32 summation-order floor: probe once, scale, then halve
    until it holds."""
    num_experts = moe.config.num_experts
    top_k = moe.config.num_experts_per_tok
    set_top_k(moe, num_experts)
    with torch.no_grad():
        dense = dense(probe_ids.to(next(dense.parameters()).device), use_cache=False).logits
    try:
        set_router_temperature(moe, probe_temperature)
        err = max_relative_logit_error(dense, moe, probe_ids)
        tau = probe_temperature * min(1.0, 0.25 * target_rel_error / max(err, 1e-30))
        for _ in range(12):
            set_router_temperature(moe, tau)
            err = max_relative_logit_error(dense, moe, probe_ids)
            if err <= target_rel_error:
                break
            tau /= 2
        else:
            logger.warning("moefy: top_k=E error %.3g > %.3g even at tau=%.3g (fp32 floor)", err, target_rel_error, tau)
    finally:
        set_top_k(moe, top_k)
    return tau, err


@torch.no_grad()
def moefy(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    num_experts: int = 16,
    top_k: int = 8,
    method: str = "coactivation",
    router_target: str = "log_norm",
    shared_neurons: int = 0,
    dense_layers: Sequence[int] = (),
    router_temperature: Union[float, str] = "auto",
    target_rel_error: float = 1e-4,
    ridge: float = 1e-4,
    seed: int = 0,
    batch_size: int = 4,
    max_cluster_tokens: int = 8192,
    expert_size_multiple: int = 8,
    return_result: bool = False,
):
    """MoEfy a dense Llama-family ``model`` into a ``Qwen2MoeForCausalLM`` (see the module docstring).

    ``calib_ids [N, S]``: calibration windows (WikiText-2 validation or TinyStories, never a test split);
    they give the co-activation statistics, the router fit and (first window, <= 256 tokens) the probe
    that picks ``tau`` when ``router_temperature="auto"``. ``num_experts`` ``E`` (a power of two keeps
    the ``E`` scaling of down_proj exact), ``top_k`` the default experts per token. Returns the MoE model
    in eval mode (same dtype and device as ``model``), or ``(model, MoefyResult)`` with ``return_result``.
    ``expert_size_multiple``: experts are padded with zero neurons to a multiple of this size, because
    transformers' default ``grouped_mm`` experts backend needs 16-byte row strides (8 bf16 / 4 fp32 values).
    """
    from transformers import Qwen2MoeForCausalLM

    check_dense_model(model)
    cfg = model.config
    intermediate = cfg.intermediate_size
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if num_experts & (num_experts - 1):
        logger.warning("moefy: num_experts=%d is not a power of two: the x E scaling of down_proj rounds", num_experts)
    if not 0 <= shared_neurons < intermediate:
        raise ValueError(f"shared_neurons must be in [0, {intermediate}), got {shared_neurons}")
    dense_layers = tuple(int(i) for i in dense_layers)
    if any(not 0 <= i < cfg.num_hidden_layers for i in dense_layers):
        raise ValueError(f"dense_layers must be layer indices in [0, {cfg.num_hidden_layers}), got {dense_layers}")
    if calib_ids.dim() != 2:
        raise ValueError(f"calib_ids must be [N, S], got shape {tuple(calib_ids.shape)}")
    if router_target not in ROUTER_TARGETS:
        raise ValueError(f"router_target must be one of {ROUTER_TARGETS}, got {router_target!r}")

    was_training = model.training
    model.eval()
    start = time.time()
    xs = collect_mlp_inputs(model, calib_ids, batch_size)
    logger.info("moefy: calibration MLP inputs of %d tokens in %.1f s", calib_ids.numel(), time.time() - start)
    num_routed = intermediate - shared_neurons
    expert_size = expert_size_for(num_routed, num_experts, expert_size_multiple)

    expert_neurons, shared_sets, routers, gate_ups, downs, shared_w = [], [], [], [], [], []
    for li, layer in enumerate(model.model.layers):
        if li in dense_layers:  # kept as the dense MLP (Qwen2-MoE mlp_only_layers): copied below
            for store in (expert_neurons, shared_sets, routers, gate_ups, downs, shared_w):
                store.append(None)
            continue
        gate, up, down = mlp_weights(layer)
        x = xs[li]
        acts = neuron_activations(x, gate, up)  # [T, I], shared by the split and the router targets
        candidates = None
        shared = torch.empty(0, dtype=torch.long)
        if shared_neurons:
            mean_contrib = (acts.abs() * down.norm(dim=0)).mean(0)
            order = torch.argsort(mean_contrib, descending=True)
            shared = order[:shared_neurons].sort().values
            candidates = order[shared_neurons:].sort().values
        experts = split_neurons(
            gate, up, down, acts, num_experts, method, candidates, max_cluster_tokens, seed + li, expert_size_multiple
        )
        norms = expert_output_norms(acts, down, experts)
        del acts
        w = fit_router(x, router_scores_target(norms, router_target), ridge)
        g_e, u_e, d_e = zip(*(_gather_neurons(gate, up, down, n) for n in experts))
        gate_ups.append(torch.stack([torch.cat([g, u]) for g, u in zip(g_e, u_e)]))  # [E, 2m, H]: gate rows first
        downs.append(torch.stack(d_e) * num_experts)  # [E, H, m]; x E undoes the ~1/E routing weight
        shared_w.append((gate[shared], up[shared], down[:, shared] * 2.0))  # x 2 undoes sigmoid(0) = 0.5
        expert_neurons.append(experts)
        shared_sets.append(shared)
        routers.append(w)
        elapsed = time.time() - start
        logger.info("moefy: layer %d: %d experts of %d neurons (%.1f s)", li, num_experts, expert_size, elapsed)
    del xs

    metadata = {
        "source_model_type": cfg.model_type,
        "source_name_or_path": getattr(cfg, "_name_or_path", "") or "",
        "method": method,
        "router_target": router_target,
        "router_temperature": 1.0,
        "expert_down_proj_scale": num_experts,
        "shared_neurons": shared_neurons,
        "dense_layers": sorted(dense_layers),
        "padding_neurons_per_layer": expert_size * num_experts - num_routed,
        "calibration_tokens": int(calib_ids.numel()),
        "seed": seed,
        "paper": "MoEfication, Zhang et al. 2022, arXiv 2110.01786",
    }
    moe_cfg = moe_config(cfg, num_experts, top_k, expert_size, shared_neurons, sorted(dense_layers), metadata)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with warnings.catch_warnings():  # the 0-width shared expert (shared_neurons=0) is intended
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        moe = Qwen2MoeForCausalLM(moe_cfg)
    state = {}
    for name, tensor in model.state_dict().items():
        # Attention, norms, embeddings, lm_head and the MLPs of dense layers: exact copies (same names).
        if ".mlp." not in name or any(name.startswith(f"model.layers.{li}.mlp.") for li in dense_layers):
            state[name] = tensor.detach()
    for li in range(cfg.num_hidden_layers):
        if li in dense_layers:
            continue
        p = f"model.layers.{li}.mlp."
        state[p + "gate.weight"] = routers[li]
        state[p + "experts.gate_up_proj"] = gate_ups[li]
        state[p + "experts.down_proj"] = downs[li]
        sg, su, sd = shared_w[li]
        state[p + "shared_expert.gate_proj.weight"] = sg
        state[p + "shared_expert.up_proj.weight"] = su
        state[p + "shared_expert.down_proj.weight"] = sd
        state[p + "shared_expert_gate.weight"] = torch.zeros(1, cfg.hidden_size)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    # A tied lm_head may be absent from the dense state dict; it is the embedding after tying.
    missing = [n for n in missing if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"moefy: state dict mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    moe = moe.to(device=device, dtype=dtype).eval()

    probe_ids = calib_ids[:1, : min(256, calib_ids.shape[1])]
    if router_temperature == "auto":
        tau, err = _choose_temperature(model, moe, probe_ids, target_rel_error)
    else:
        set_router_temperature(moe, float(router_temperature))
        set_top_k(moe, num_experts)
        err = max_relative_logit_error(model, moe, probe_ids)
        set_top_k(moe, top_k)
        tau = float(router_temperature)
    if was_training:
        model.train()
    moe.config.moefication["top_k_e_rel_error_calibration_probe"] = err
    logger.info("moefy: router temperature %.3g, top_k=E max relative logits error %.3g", tau, err)
    if not return_result:
        return moe
    result = MoefyResult(expert_neurons, shared_sets, tau, err, dict(moe.config.moefication))
    return moe, result


def save(model: torch.nn.Module, path: Union[str, Path], tokenizer=None, result: Optional[MoefyResult] = None) -> Path:
    """``save_pretrained`` (+ tokenizer, + ``moefication_partition.json`` with each layer's expert neurons)
    into ``path``, written to a temporary folder first and renamed, so a crash never leaves half a model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if result is not None:
            partition = {
                "expert_neurons": [None if e is None else e.tolist() for e in result.expert_neurons],
                "shared_neurons": [None if s is None else s.tolist() for s in result.shared_neurons],
                "note": "dense MLP neuron indices per layer and expert; -1 = zero padding neuron; null = dense layer",
            }
            (tmp / "moefication_partition.json").write_text(json.dumps(partition))
        tmp.chmod(0o755)  # mkdtemp makes it private; a model cache folder is readable like any other
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def routing_errors(
    dense: torch.nn.Module,
    moe: torch.nn.Module,
    ids: torch.Tensor,
    top_ks: Sequence[int],
    seed: int = 0,
    mlp_inputs: Optional[List[torch.Tensor]] = None,
) -> Dict[int, Dict[str, List[Optional[float]]]]:
    """``{k: {selection: [per-layer error]}}``: on the dense model's MLP inputs for ``ids``, per layer,
    ``sum_t ||y(x_t) - sum_{e in S(x_t)} y_e(x_t)||^2 / sum_t ||y(x_t)||^2`` for three selections ``S`` of
    ``k`` experts: ``"router"`` (top-k of the MoE router's logits), ``"oracle"`` (top-k of ``||y_e||``) and
    ``"random"`` (uniform, seeded). ``y`` is the routed part only (a shared expert is in every selection,
    so it cancels); dense layers get ``None``. Expert outputs are read from the MoE's expert tensors
    (down_proj divided back by E). ``mlp_inputs``: :func:`collect_mlp_inputs` of ``dense`` on ``ids``,
    when already computed."""
    xs = collect_mlp_inputs(dense, ids) if mlp_inputs is None else mlp_inputs
    num_experts = moe.config.num_experts
    gen = torch.Generator().manual_seed(seed)
    out = {k: {"router": [], "oracle": [], "random": []} for k in top_ks}
    for li, layer in enumerate(moe.model.layers):
        if not hasattr(layer.mlp, "experts"):  # dense (mlp_only) layer: nothing is routed
            for per_k in out.values():
                for errs in per_k.values():
                    errs.append(None)
            continue
        x = xs[li]
        gu = layer.mlp.experts.gate_up_proj.detach().float().cpu()
        dn = layer.mlp.experts.down_proj.detach().float().cpu() / num_experts
        m = gu.shape[1] // 2
        ys = torch.stack([neuron_activations(x, gu[e, :m], gu[e, m:]) @ dn[e].T for e in range(num_experts)], 1)
        full = ys.sum(1)
        denom = (full * full).sum()
        logits = x @ layer.mlp.gate.weight.detach().float().cpu().T
        norms = ys.norm(dim=2)
        noise = torch.rand(x.shape[0], num_experts, generator=gen)
        for k in top_ks:
            selections = {"router": logits.topk(k, dim=1).indices, "oracle": norms.topk(k, dim=1).indices,
                          "random": noise.topk(k, dim=1).indices}
            for name, sel in selections.items():
                kept = torch.gather(ys, 1, sel[:, :, None].expand(-1, -1, ys.shape[2])).sum(1)
                out[k][name].append(((full - kept) ** 2).sum().div(denom).item())
    return out
