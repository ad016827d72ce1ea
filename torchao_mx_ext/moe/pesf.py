"""PESF: Pruning based on Expert-Selection Frequency (EAC-MoE, Chen et al., ACL 2025, arXiv 2508.01625).

Rule implemented (per MoE layer, per input sequence of ``l`` tokens, ``K`` = top-k, ``N`` = experts):

    c_e = #{(t, j) : index[t, j] == e}                  selections of expert e in the sequence (top-K slots)
    drop expert e for the whole sequence if  c_e < alpha * l * K / N

``l * K / N`` is the count every expert would get under perfectly balanced routing, so ``alpha`` is the
fraction of that fair share below which an expert is considered unimportant for this input (the paper
uses alpha 0.3 as the safe and 0.7 as the aggressive setting).

What a dropped slot becomes, and guarantees:

* a dropped slot gets index ``N`` (the sentinel every experts backend skips) and weight 0; output
  shapes are fixed;
* the kept weights of that token are rescaled so its total routing weight is unchanged
  (``w_j * sum_all / sum_kept``: renormalisation among the kept experts, also for routers whose weights
  do not sum to 1, e.g. Qwen2-MoE without ``norm_topk_prob`` or DeepSeek's ``routed_scaling_factor``);
* a token's top-1 expert (its largest weight; ties all count as top-1) is never dropped, so every
  token keeps at least one expert;
* slots that are already sentinels (from an earlier pass) stay as they are and are not counted;
* ``alpha = 0`` returns the router's outputs bit for bit (no token has a pruned slot).

Sequences. The router must see ``(B, S, H)``: each of the ``B`` rows is a sequence with ``l = S``
(padding positions count like tokens: use unpadded prefill, or batch size 1). A router that receives
``(T, H)`` treats all ``T`` tokens as one sequence, which is exact for batch size 1; for flattening blocks
(Qwen/Mixtral/OLMoE) :func:`.router_configs.apply_router_pass` rewires the block so the router sees
``(B, S, H)`` (:func:`.router_pass.rewire_block_gate_input`).

Decode. A decode step has ``l = 1``: each selected expert has ``c_e = 1`` and ``alpha * K / N <= 1``
whenever ``alpha <= N / K`` (always for ``alpha <= 1``), so nothing is pruned during decoding; PESF acts
on the prefill only.
"""

import torch
from torch import nn
from torchao.quantization.transform_module import register_quantize_module_handler

from .adapters import adapter_for_router
from .pass_settings import PESFConfig, check_alpha
from .router_pass import append_routing_function, drop_routing_slots, install_graph_pass, routing_function

__all__ = ["PESF_PASS", "check_alpha", "pesf_keep_mask", "pesf_route", "install_pesf"]
# check_alpha: the accepted values of alpha, defined in .pass_settings (shared with the configs)

PESF_PASS = "pesf"


def pesf_keep_mask(
    router_input: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, alpha: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Boolean ``(T, K)`` mask of the slots PESF keeps (see the module docstring for the rule).

    Args:
        router_input: the router's input, ``(B, S, H)`` (B sequences of length S) or ``(T, H)`` (one sequence).
        weights, indices: the router's ``(T, K)`` top-k weights and expert indices, T = B*S.
        alpha: scalar tensor, the fraction of the balanced count ``l*K/N`` an expert needs.
        num_experts: N (also the sentinel index).
    """
    top_k = indices.shape[-1]
    seq_len = router_input.shape[-2] if router_input.dim() >= 3 else router_input.shape[0]
    per_sequence = indices.reshape(-1, seq_len * top_k)  # (B, S*K)
    # Counts over N+1 bins (the last collects sentinels and is ignored) via scatter_add, O(B*N) memory.
    counts = torch.zeros(per_sequence.shape[0], num_experts + 1, dtype=torch.int64, device=indices.device)
    counts = counts.scatter_add(1, per_sequence, torch.ones_like(per_sequence))
    count_of_slot = counts.gather(1, per_sequence).reshape(indices.shape)  # c_e of each slot's expert
    threshold = alpha.float() * (seq_len * top_k / num_experts)
    is_top1 = weights == weights.amax(dim=-1, keepdim=True)
    is_sentinel = indices >= num_experts
    return (count_of_slot.float() >= threshold) | is_top1 | is_sentinel


@routing_function
def pesf_route(router_input, weights, indices, alpha, num_experts: int):
    """PESF on one router call: ``(weights, indices)`` with the dropped slots pruned (index N, weight
    0) and each token's kept weights rescaled to its original total."""
    keep = pesf_keep_mask(router_input, weights, indices, alpha, num_experts)
    return drop_routing_slots(weights, indices, keep, num_experts)


def install_pesf(router: nn.Module, alpha: float) -> nn.Module:
    """Install PESF on ``router`` (in place) with the buffer ``pesf_alpha`` (float32 scalar)."""
    alpha = check_alpha(alpha)
    num_experts = adapter_for_router(router).num_experts(router)

    def rewrite(graph):
        append_routing_function(graph, pesf_route, ["pesf_alpha"], constants=(num_experts,), pass_input=True)

    return install_graph_pass(
        router, PESF_PASS, rewrite, {"pesf_alpha": torch.tensor(float(alpha), dtype=torch.float32)}
    )


@register_quantize_module_handler(PESFConfig)
def _pesf_transform(module: nn.Module, config: PESFConfig) -> nn.Module:
    """The ``quantize_`` handler of :class:`.router_configs.PESFConfig`: PESF on one router, in place."""
    config.check_no_layer_values()
    return install_pesf(module, config.alpha)
