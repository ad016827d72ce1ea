"""Ban&Pick: smarter routing for MoE LLMs (arXiv 2509.06346), as router graph passes.

The paper's exact formulas are not public; these are the rules implemented here.

**Pick** (reinforce key experts). Per layer, a few *key experts* are found on calibration tokens of the
target domain (:func:`measure_ban_pick_statistics`)::

    f_e = #{tokens t that select e} / T                                   selection frequency
    d_e = mean over those t of ||w_te E_e(x_t)||^2 / ||y_t||^2             effect of removing e from t
    score_e = f_e * d_e                                                    (= removal effect averaged over all T tokens)

where ``w_te E_e(x_t)`` is e's weighted contribution (what the block output ``y_t`` loses when e's slot
is dropped without renormalisation). The ``num_picks`` experts with the largest score are the key
experts. The router is reinforced by adding a per-layer boost ``b`` to their logits before anything
else reads the logits (scores, bias, groups, top-k, weights)::

    logits'_e = logits_e + b * [e picked]

so a picked expert is selected more often and, when selected, weighs more (a large ``b`` makes it always
selected, the "always pick" variant). The router still returns the
*original* ``router_logits`` (``output_router_logits=True`` and the auxiliary loss see the unmodified
router). :func:`calibrate_ban_pick` sets ``b = boost * std(router logits of the layer)`` so one ``boost``
means the same across layers and models.

**Ban** (drop redundant experts per token). For a token with top-k weights ``w_1..w_K`` (any order),
normalised ``p_j = w_j / sum_k w_k`` and sorted descending ``p_(1) >= p_(2) >= ...``, slot ``(r)`` (rank r,
0-based) is kept iff::

    r < k_min   or   sum_{s < r} p_(s) < tau   or   tau >= 1   or   expert is picked

i.e. experts are kept in descending weight order until their cumulative normalised weight reaches
``tau`` (the one that crosses ``tau`` is kept), never fewer than ``k_min``, and a picked expert is never
banned. Banned slots get index N and weight 0; the kept weights are rescaled to the token's original
total (:func:`.router_pass.drop_routing_slots`). ``tau = 1`` keeps everything, bit for bit.

**Per-layer tau** from a measured layer sensitivity (:func:`measure_ban_pick_statistics`)::

    s_l = sum_t ||y_t^(k_min) - y_t||^2 / sum_t ||y_t||^2

with ``y^(k_min)`` the block output when every token keeps only its ``k_min`` largest experts (Ban's rule
at tau = 0). Layers are mapped linearly into ``[tau_min, tau_max]`` by sensitivity, the most sensitive
layer getting ``tau_max`` (it keeps the most experts); equal sensitivities all get ``tau_max``.

Neutral settings (``tau = 1``, no picks or ``boost = 0``) return the router's outputs bit for bit.

Why these rules (measured on two trained SmolLM2 MoEs, docs/results.md): key experts by selection
frequency alone picked the same experts as the removal-effect score; one tau for all layers
(``tau_rule="uniform"``) cost more perplexity per pruned (token, expert) pair than the sensitivity map on
the shared-expert top-3-of-32 model and less on the top-4-of-16 one, so the map stays the default and
the uniform rule stays selectable.
"""

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, Union

import torch
from torch import nn
from torchao.quantization.transform_module import register_quantize_module_handler

from ..calibration.data import check_calibration_ids, check_int
from .adapters import adapter_for_router, disable_sentinel_slots, enable_sentinel_slots, find_moe_blocks
from .pass_settings import BanConfig, BanPickConfig, PickConfig, check_boost, check_experts, check_k_min, check_tau
from .router_pass import (
    append_routing_function,
    drop_routing_slots,
    has_router_pass,
    install_graph_pass,
    installed_passes,
    router_graph_outputs,
    routing_function,
)

__all__ = [
    "PICK_PASS",
    "BAN_PASS",
    "pick_boost_logits",
    "ban_keep_mask",
    "ban_route",
    "install_pick",
    "install_ban",
    "BanPickStatistics",
    "measure_ban_pick_statistics",
    "ban_pick_config_from_statistics",
    "calibrate_ban_pick",
    "check_tau",
    "check_k_min",
    "check_boost",
    "check_experts",
]
# check_*: the accepted values of the settings, defined in .pass_settings (shared with the configs)

PICK_PASS = "pick"
BAN_PASS = "ban"


# ---------------------------------------------------------------------------------------------------
# Routing functions (inserted into router graphs)


@routing_function
def pick_boost_logits(logits: torch.Tensor, pick_mask: torch.Tensor, pick_boost: torch.Tensor) -> torch.Tensor:
    """``logits + boost`` on the picked experts' columns, unchanged (bit for bit) elsewhere."""
    return torch.where(pick_mask, logits + pick_boost.to(logits.dtype), logits)


def ban_keep_mask(
    weights: torch.Tensor,
    indices: torch.Tensor,
    tau: torch.Tensor,
    k_min: torch.Tensor,
    protected: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """Boolean ``(T, K)`` mask of the slots Ban keeps (rule in the module docstring).

    Args:
        weights, indices: the router's ``(T, K)`` top-k weights and indices (any slot order).
        tau: scalar, cumulative normalised weight to reach.
        k_min: scalar integer tensor, minimum experts kept per token.
        protected: ``(N,)`` bool, experts never banned (Pick's key experts).
        num_experts: N (sentinel index).
    """
    w = weights.float()
    p = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    order = torch.argsort(p, dim=-1, descending=True, stable=True)
    p_sorted = p.gather(-1, order)
    before = p_sorted.cumsum(dim=-1) - p_sorted  # cumulative weight of the higher-ranked slots
    rank = torch.arange(p.shape[-1], device=p.device)
    keep_sorted = (before < tau) | (rank < k_min) | (tau >= 1)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to slot order
    protected_or_sentinel = torch.cat([protected, protected.new_ones(1)])  # index N: leave sentinels alone
    return keep | protected_or_sentinel[indices]


@routing_function
def ban_route(weights, indices, tau, k_min, protected, num_experts: int):
    """Ban on one router call: banned slots -> (index N, weight 0), kept weights rescaled."""
    keep = ban_keep_mask(weights, indices, tau, k_min, protected, num_experts)
    return drop_routing_slots(weights, indices, keep, num_experts)


# ---------------------------------------------------------------------------------------------------
# Installing the passes


def _expert_mask(experts: Iterable[int], num_experts: int, name: str = "experts") -> torch.Tensor:
    mask = torch.zeros(num_experts, dtype=torch.bool)
    for e in check_experts(experts, name):
        if not 0 <= e < num_experts:
            raise ValueError(f"{name}: expert index {e} out of range [0, {num_experts})")
        mask[e] = True
    return mask


def install_pick(router: nn.Module, experts: Sequence[int], boost: float) -> nn.Module:
    """Install Pick on ``router``: buffers ``pick_mask`` (``(N,)`` bool) and ``pick_boost`` (float32 scalar).

    The graph pass inserts :func:`pick_boost_logits` after the node that the router returns as
    ``router_logits`` and makes every other user of that node read the boosted logits.
    """
    boost = check_boost(boost)
    num_experts = adapter_for_router(router).num_experts(router)
    pick_mask = _expert_mask(experts, num_experts)

    def rewrite(graph):
        output, logits, _, _ = router_graph_outputs(graph)
        with graph.inserting_after(logits):
            mask = graph.get_attr("pick_mask")
        with graph.inserting_after(mask):
            boost_node = graph.get_attr("pick_boost")
        with graph.inserting_after(boost_node):
            boosted = graph.call_function(pick_boost_logits, (logits, mask, boost_node))
        logits.replace_all_uses_with(boosted, delete_user_cb=lambda user: user is not output and user is not boosted)

    buffers = {
        "pick_mask": pick_mask,
        "pick_boost": torch.tensor(boost, dtype=torch.float32),
    }
    return install_graph_pass(router, PICK_PASS, rewrite, buffers)


def install_ban(router: nn.Module, tau: float, k_min: int = 1, protected: Sequence[int] = ()) -> nn.Module:
    """Install Ban on ``router``: buffers ``ban_tau`` (float32), ``ban_k_min`` (int64), ``ban_protected``
    (``(N,)`` bool). Experts picked by an installed Pick pass are added to ``protected``."""
    tau = check_tau(tau)
    k_min = check_k_min(k_min)
    num_experts = adapter_for_router(router).num_experts(router)
    protected_mask = _expert_mask(protected, num_experts, "protected")
    if has_router_pass(router, PICK_PASS):
        protected_mask |= router.pick_mask.cpu()

    def rewrite(graph):
        append_routing_function(graph, ban_route, ["ban_tau", "ban_k_min", "ban_protected"], constants=(num_experts,))

    buffers = {
        "ban_tau": torch.tensor(tau, dtype=torch.float32),
        "ban_k_min": torch.tensor(k_min, dtype=torch.int64),
        "ban_protected": protected_mask,
    }
    return install_graph_pass(router, BAN_PASS, rewrite, buffers)


# quantize_ handlers: one router each, in place (the router instance stays; its class becomes a subclass)


@register_quantize_module_handler(PickConfig)
def _pick_transform(module: nn.Module, config: PickConfig) -> nn.Module:
    config.check_no_layer_values()
    return install_pick(module, config.experts, config.boost)


@register_quantize_module_handler(BanConfig)
def _ban_transform(module: nn.Module, config: BanConfig) -> nn.Module:
    config.check_no_layer_values()
    return install_ban(module, config.tau, config.k_min, config.protected)


@register_quantize_module_handler(BanPickConfig)
def _ban_pick_transform(module: nn.Module, config: BanPickConfig) -> nn.Module:
    config.check_no_layer_values()
    install_pick(module, config.picks, config.boost)
    return install_ban(module, config.tau, config.k_min)  # protects the picked experts itself


# ---------------------------------------------------------------------------------------------------
# Calibration


@dataclass
class BanPickStatistics:
    """Per-router measurements on calibration tokens (keys: router fqns).

    Attributes:
        tokens: T, calibration tokens seen per layer.
        frequency: ``(N,)`` fraction of tokens that select each expert (``f_e``).
        removal_effect: ``(N,)`` mean relative squared block-output change when e is removed from the
            tokens that select it (``d_e``; 0 for unselected experts).
        key_score: ``(N,)`` ``f_e * d_e``.
        sensitivity: ``s_l``, relative squared block-output error when keeping only ``k_min`` experts.
        logit_std: standard deviation of the layer's router logits.
        k_min: the ``k_min`` the sensitivity was measured with.
    """

    tokens: int
    frequency: Dict[str, torch.Tensor] = field(default_factory=dict)
    removal_effect: Dict[str, torch.Tensor] = field(default_factory=dict)
    key_score: Dict[str, torch.Tensor] = field(default_factory=dict)
    sensitivity: Dict[str, float] = field(default_factory=dict)
    logit_std: Dict[str, float] = field(default_factory=dict)
    k_min: int = 1


class _LayerAccumulator:
    def __init__(self, num_experts: int):
        self.selections = torch.zeros(num_experts, dtype=torch.float64)
        self.effect_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.error = 0.0
        self.energy = 0.0
        self.logit_sum = 0.0
        self.logit_sq_sum = 0.0
        self.logit_count = 0
        self.tokens = 0


def _as_batches(
    model: nn.Module, calib_ids: Union[torch.Tensor, Sequence[torch.Tensor]], batch_size: int
) -> List[torch.Tensor]:
    """The forward batches of ``calib_ids``, every one checked (:func:`..calibration.data.check_calibration_ids`)
    before the first runs."""
    purpose = "Ban&Pick calibration"
    if isinstance(calib_ids, torch.Tensor):
        ids = check_calibration_ids(model, calib_ids, purpose, allow_1d=True)
        ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
        return list(ids.split(batch_size))
    if isinstance(calib_ids, (str, bytes)) or not isinstance(calib_ids, Sequence):
        raise TypeError(
            f"{purpose}: calib_ids must be a tensor or a list of tensors of token ids, got {type(calib_ids).__name__}"
        )
    if not calib_ids:
        raise ValueError(f"{purpose}: calib_ids is an empty list: it needs calibration tokens")
    batches = []
    for j, t in enumerate(calib_ids):
        t = check_calibration_ids(model, t, f"{purpose} (calib_ids[{j}])", allow_1d=True)
        batches.append(t if t.dim() == 2 else t.unsqueeze(0))
    return batches


@torch.no_grad()
def measure_ban_pick_statistics(
    model: nn.Module,
    calib_ids: Union[torch.Tensor, Sequence[torch.Tensor]],
    k_min: int = 1,
    batch_size: int = 8,
) -> BanPickStatistics:
    """Run ``model`` on calibration token ids and measure, per MoE layer, the quantities of the module
    docstring (selection frequency, removal effect, key score, sensitivity, logit spread).

    Statistics are streamed from forward hooks on the blocks (no activations are stored). The model
    must carry no router pass (the measurements are of the original routing).

    Args:
        calib_ids: ``(B, S)`` token ids (split into ``batch_size`` rows per forward) or a list of
            ``(b, s)``/``(s,)`` tensors.
        k_min: the ``k_min`` of the sensitivity measurement (use Ban's).
    """
    k_min = check_k_min(k_min)
    batch_size = check_int(batch_size, "batch_size", low=1)
    blocks = find_moe_blocks(model)
    passed = [fqn for fqn, block, _ in blocks if installed_passes(block.gate)]
    if passed:
        raise ValueError(f"calibrate on the original routing: routers with passes installed: {passed[:3]}")
    batches = _as_batches(model, calib_ids, batch_size)
    accumulators: Dict[str, _LayerAccumulator] = {}
    handles, marked = [], []
    for fqn, block, adapter in blocks:
        router_fqn = f"{fqn}.gate" if fqn else "gate"
        acc = accumulators[router_fqn] = _LayerAccumulator(adapter.num_experts(block.gate))
        handles.append(block.register_forward_hook(_make_statistics_hook(block, adapter, acc, k_min)))
        if enable_sentinel_slots(block.experts):  # the k_min measurement routes sentinel slots
            marked.append(block.experts)
    try:
        for ids in batches:
            model(input_ids=ids.to(_model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for experts in marked:
            disable_sentinel_slots(experts)

    stats = BanPickStatistics(tokens=next(iter(accumulators.values())).tokens, k_min=k_min)
    for router_fqn, acc in accumulators.items():
        tokens = max(acc.tokens, 1)
        stats.frequency[router_fqn] = (acc.selections / tokens).float()
        stats.removal_effect[router_fqn] = (acc.effect_sum / acc.selections.clamp_min(1)).float()
        stats.key_score[router_fqn] = (acc.effect_sum / tokens).float()
        stats.sensitivity[router_fqn] = acc.error / max(acc.energy, 1e-30)
        mean = acc.logit_sum / max(acc.logit_count, 1)
        stats.logit_std[router_fqn] = max(acc.logit_sq_sum / max(acc.logit_count, 1) - mean * mean, 0.0) ** 0.5
    return stats


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _make_statistics_hook(block: nn.Module, adapter, acc: _LayerAccumulator, k_min: int):
    num_experts = adapter.num_experts(block.gate)

    def hook(module, args, output):
        x = args[0] if args else None
        if x is None:
            raise RuntimeError("MoE block called without a positional hidden_states argument")
        hidden = x.shape[-1]
        x2 = x.reshape(-1, hidden)
        y = output[0] if isinstance(output, tuple) else output
        energy = y.reshape(-1, hidden).float().pow(2).sum(-1)  # ||y_t||^2 of the full block output
        logits, weights, indices = block.gate.forward(x)  # forward: no router hooks (stats, HF capture)
        experts = block.experts

        acc.tokens += x2.shape[0]
        acc.logit_sum += logits.float().sum().item()
        acc.logit_sq_sum += logits.float().pow(2).sum().item()
        acc.logit_count += logits.numel()
        acc.energy += energy.sum().item()

        # Removal effect of each selected expert: its weighted contribution on the tokens that chose it.
        for e in torch.unique(indices[indices < num_experts]).tolist():
            tok, slot = (indices == e).nonzero(as_tuple=True)
            contribution = experts(x2[tok], indices[tok, slot].unsqueeze(-1), weights[tok, slot].unsqueeze(-1))
            relative = contribution.float().pow(2).sum(-1) / energy[tok].clamp_min(1e-30)
            acc.selections[e] += tok.numel()
            acc.effect_sum[e] += relative.sum().item()

        # Layer sensitivity: keep only the k_min largest experts per token (Ban at tau = 0).
        w_kmin, i_kmin = ban_route(
            weights, indices,
            torch.zeros((), device=weights.device),
            torch.tensor(k_min, device=weights.device),
            torch.zeros(num_experts, dtype=torch.bool, device=weights.device),
            num_experts,
        )
        error = experts(x2, i_kmin, w_kmin).float() - experts(x2, indices, weights).float()
        acc.error += error.pow(2).sum().item()

    return hook


PICK_SCORES = ("effect", "frequency")
TAU_RULES = ("sensitivity", "uniform")


def ban_pick_config_from_statistics(
    stats: BanPickStatistics,
    num_picks: int = 1,
    boost: float = 1.0,
    tau_min: float = 0.7,
    tau_max: float = 0.9,
    pick_score: str = "effect",
    tau_rule: str = "sensitivity",
) -> BanPickConfig:
    """A per-layer :class:`.router_configs.BanPickConfig` from measured statistics.

    Picks: the ``num_picks`` experts with the largest key score per layer (selected at least once):
    ``pick_score="effect"`` ranks by ``f_e * d_e`` (the removal effect averaged over all tokens, the
    default), ``"frequency"`` by the selection frequency ``f_e`` alone (the alternative it was measured
    against). Boost: ``boost * logit_std`` per layer. Tau (``tau_rule="sensitivity"``, the default): linear
    in the layer sensitivity between ``tau_min`` (least sensitive) and ``tau_max`` (most sensitive), all
    ``tau_max`` if the sensitivities are equal; ``"uniform"``: every layer ``(tau_min + tau_max) / 2``.
    """
    _check_calibration_settings(num_picks, boost, tau_min, tau_max)
    _check_rules(pick_score, tau_rule)
    sens = stats.sensitivity
    lo, hi = min(sens.values()), max(sens.values())
    if tau_rule == "uniform":
        layer_taus = {fqn: (tau_min + tau_max) / 2 for fqn in sens}
    else:
        layer_taus = {
            fqn: (tau_max if hi <= lo else tau_min + (tau_max - tau_min) * (s - lo) / (hi - lo)) for fqn, s in sens.items()
        }
    scores = stats.key_score if pick_score == "effect" else stats.frequency
    layer_picks = {}
    for fqn, score in scores.items():
        candidates = torch.argsort(score, descending=True, stable=True)[:num_picks]
        layer_picks[fqn] = [int(e) for e in candidates if stats.frequency[fqn][e] > 0]
    layer_boosts = {fqn: float(boost) * std for fqn, std in stats.logit_std.items()}
    return BanPickConfig(
        k_min=stats.k_min, layer_taus=layer_taus, layer_picks=layer_picks, layer_boosts=layer_boosts
    )


def _check_rules(pick_score: str, tau_rule: str) -> None:
    if pick_score not in PICK_SCORES or tau_rule not in TAU_RULES:
        raise ValueError(f"pick_score must be one of {PICK_SCORES} and tau_rule one of {TAU_RULES}; "
                         f"got {pick_score!r}, {tau_rule!r}")


def _check_calibration_settings(num_picks, boost, tau_min, tau_max) -> None:
    check_int(num_picks, "num_picks", low=0)
    check_boost(boost)
    tau_min, tau_max = check_tau(tau_min, "tau_min"), check_tau(tau_max, "tau_max")
    if tau_min > tau_max:
        raise ValueError(f"need 0 <= tau_min <= tau_max <= 1, got tau_min={tau_min}, tau_max={tau_max}")


def calibrate_ban_pick(
    model: nn.Module,
    calib_ids: Union[torch.Tensor, Sequence[torch.Tensor]],
    num_picks: int = 1,
    boost: float = 1.0,
    k_min: int = 1,
    tau_min: float = 0.7,
    tau_max: float = 0.9,
    batch_size: int = 8,
    pick_score: str = "effect",
    tau_rule: str = "sensitivity",
) -> BanPickConfig:
    """Measure key experts and layer sensitivities on ``calib_ids`` and return the per-layer
    :class:`.router_configs.BanPickConfig` (apply it with :func:`.router_configs.apply_router_pass`;
    ``pick_score`` and ``tau_rule``: :func:`ban_pick_config_from_statistics`). Every setting is checked
    before the calibration forward passes."""
    _check_calibration_settings(num_picks, boost, tau_min, tau_max)
    _check_rules(pick_score, tau_rule)
    stats = measure_ban_pick_statistics(model, calib_ids, k_min=k_min, batch_size=batch_size)
    return ban_pick_config_from_statistics(stats, num_picks=num_picks, boost=boost, tau_min=tau_min, tau_max=tau_max,
                                           pick_score=pick_score, tau_rule=tau_rule)
