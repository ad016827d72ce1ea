"""``quantize_`` configs of the MoE router passes and their handlers (the passes live in
:mod:`.pesf`, :mod:`.ban_pick`, :mod:`.router_pass`).

    apply_router_pass(model, PESFConfig(alpha=0.3))                     # EAC-MoE PESF
    apply_router_pass(model, BanConfig(tau=0.8, k_min=1))               # Ban only
    apply_router_pass(model, PickConfig(experts=[3], boost=1.0))        # Pick only
    apply_router_pass(model, calibrate_ban_pick(model, calib_ids))      # Ban&Pick, per layer

    # the torchao way (scalar settings; per layer through torchao's FqnToConfig):
    quantize_(model, BanConfig(tau=0.8), filter_fn=is_moe_router)

Per-layer values (``layer_*`` fields) are keyed by the router's fully qualified name
(``"model.layers.3.mlp.gate"``; the block's name ``"model.layers.3.mlp"`` is accepted too). A
``quantize_`` handler receives a module without its name, so a config with per-layer values goes
through :func:`apply_router_pass`, which expands it into torchao's ``FqnToConfig`` of per-router
configs; the handler itself refuses it with that advice.

:func:`apply_router_pass` also does what a router handler cannot reach from the router alone: it
rewires the flattening blocks for PESF (so the router sees ``(B, S, H)``) and marks the experts modules
to skip sentinel slots in every experts backend (:func:`.adapters.enable_sentinel_slots`).
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import quantize_
from torchao.quantization.quant_api import FqnToConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .adapters import enable_sentinel_slots, find_moe_blocks, is_moe_router
from .ban_pick import install_ban, install_pick
from .pesf import install_pesf
from .router_pass import installed_passes, rewire_block_gate_input

__all__ = [
    "PESFConfig",
    "PickConfig",
    "BanConfig",
    "BanPickConfig",
    "apply_router_pass",
]


class _PerLayer:
    """Resolution of ``layer_*`` dict fields into scalar fields, per router fqn."""

    # (layer dict field, scalar field) pairs; set by subclasses
    _LAYER_FIELDS: Sequence = ()

    def has_layer_values(self) -> bool:
        return any(getattr(self, layer) for layer, _ in self._LAYER_FIELDS)

    def layer_keys(self) -> set:
        return {k for layer, _ in self._LAYER_FIELDS for k in (getattr(self, layer) or {})}

    def for_router(self, router_fqn: str):
        """The scalar config of one router: per-layer values where given, the defaults elsewhere."""
        block_fqn = router_fqn[: -len(".gate")] if router_fqn.endswith(".gate") else router_fqn
        values = {}
        for layer, scalar in self._LAYER_FIELDS:
            table = getattr(self, layer) or {}
            for key in (router_fqn, block_fqn):
                if key in table:
                    values[scalar] = table[key]
                    break
            values[layer] = None
        return replace(self, **values)

    def _refuse_layer_values(self):
        if self.has_layer_values():
            raise ValueError(
                f"{type(self).__name__} has per-layer values, which need the router's name: use "
                "apply_router_pass(model, config), or quantize_(model, FqnToConfig({fqn: config.for_router(fqn)}), "
                "filter_fn=None)"
            )


@dataclass
class PESFConfig(_PerLayer, AOBaseConfig):
    """PESF (EAC-MoE, arXiv 2508.01625): per sequence and layer, drop experts selected fewer than
    ``alpha * l * K / N`` times (rule and guarantees: :mod:`.pesf`). ``alpha=0`` is the identity.

    Args:
        alpha: fraction of the balanced count (0.3 safe, 0.7 aggressive in the paper).
        layer_alphas: per-router alpha, ``{router_fqn: alpha}``.
    """

    alpha: float = 0.3
    layer_alphas: Optional[Dict[str, float]] = None
    _LAYER_FIELDS = (("layer_alphas", "alpha"),)

    def __post_init__(self):
        for a in [self.alpha, *(self.layer_alphas or {}).values()]:
            if not a >= 0:
                raise ValueError(f"alpha must be >= 0, got {a}")


@dataclass
class PickConfig(_PerLayer, AOBaseConfig):
    """Pick (Ban&Pick, arXiv 2509.06346): add ``boost`` to the router logits of key experts before
    top-k (rule: :mod:`.ban_pick`). No experts or ``boost=0`` is the identity.

    Args:
        experts: key experts of every router (default for routers not in ``layer_experts``).
        boost: logit boost (absolute, in logit units).
        layer_experts, layer_boosts: per-router values.
    """

    experts: Sequence[int] = ()
    boost: float = 1.0
    layer_experts: Optional[Dict[str, List[int]]] = None
    layer_boosts: Optional[Dict[str, float]] = None
    _LAYER_FIELDS = (("layer_experts", "experts"), ("layer_boosts", "boost"))


@dataclass
class BanConfig(_PerLayer, AOBaseConfig):
    """Ban (Ban&Pick, arXiv 2509.06346): per token keep experts in descending weight order until their
    cumulative normalised weight reaches ``tau``, never fewer than ``k_min``; ``protected`` experts (and
    those of an installed Pick) are never banned (rule: :mod:`.ban_pick`). ``tau=1`` is the identity.

    Args:
        tau: cumulative weight to reach (0.7..0.9 in the paper).
        k_min: minimum experts per token.
        protected: experts never banned.
        layer_taus: per-router tau, ``{router_fqn: tau}``.
    """

    tau: float = 0.9
    k_min: int = 1
    protected: Sequence[int] = ()
    layer_taus: Optional[Dict[str, float]] = None
    _LAYER_FIELDS = (("layer_taus", "tau"),)

    def __post_init__(self):
        if int(self.k_min) < 1:
            raise ValueError(f"k_min must be >= 1, got {self.k_min}")
        for t in [self.tau, *(self.layer_taus or {}).values()]:
            if not t >= 0:
                raise ValueError(f"tau must be >= 0, got {t}")


@dataclass
class BanPickConfig(_PerLayer, AOBaseConfig):
    """Ban&Pick on every router: Pick (boost the key experts' logits), then Ban (with the picked
    experts protected). What :func:`.ban_pick.calibrate_ban_pick` returns. The defaults are neutral
    (``tau=1``, no picks, ``boost=0``): bit-identical routing.

    Args:
        tau, k_min: Ban's settings (``tau`` for routers not in ``layer_taus``).
        picks, boost: Pick's settings (for routers not in ``layer_picks`` / ``layer_boosts``).
        layer_taus, layer_picks, layer_boosts: per-router values, ``{router_fqn: value}``.
    """

    tau: float = 1.0
    k_min: int = 1
    picks: Sequence[int] = ()
    boost: float = 0.0
    layer_taus: Optional[Dict[str, float]] = None
    layer_picks: Optional[Dict[str, List[int]]] = None
    layer_boosts: Optional[Dict[str, float]] = None
    _LAYER_FIELDS = (("layer_taus", "tau"), ("layer_picks", "picks"), ("layer_boosts", "boost"))

    def __post_init__(self):
        if int(self.k_min) < 1:
            raise ValueError(f"k_min must be >= 1, got {self.k_min}")


# ---------------------------------------------------------------------------------------------------
# Handlers: one router each, in place (the router instance stays; its class becomes a subclass)


@register_quantize_module_handler(PESFConfig)
def _pesf_transform(module: nn.Module, config: PESFConfig) -> nn.Module:
    config._refuse_layer_values()
    return install_pesf(module, config.alpha)


@register_quantize_module_handler(PickConfig)
def _pick_transform(module: nn.Module, config: PickConfig) -> nn.Module:
    config._refuse_layer_values()
    return install_pick(module, config.experts, config.boost)


@register_quantize_module_handler(BanConfig)
def _ban_transform(module: nn.Module, config: BanConfig) -> nn.Module:
    config._refuse_layer_values()
    return install_ban(module, config.tau, config.k_min, config.protected)


@register_quantize_module_handler(BanPickConfig)
def _ban_pick_transform(module: nn.Module, config: BanPickConfig) -> nn.Module:
    config._refuse_layer_values()
    install_pick(module, config.picks, config.boost)
    return install_ban(module, config.tau, config.k_min)  # protects the picked experts itself


_ROUTER_CONFIGS = (PESFConfig, PickConfig, BanConfig, BanPickConfig)


def apply_router_pass(model: nn.Module, config: AOBaseConfig) -> nn.Module:
    """Install a router pass on every supported MoE router of ``model`` (in place) and return ``model``.

    Runs ``quantize_(model, config, filter_fn=is_moe_router)`` (or, with per-layer values, an
    ``FqnToConfig`` of per-router configs), after rewiring the flattening blocks for PESF and marking
    the experts modules to skip sentinel slots.

    Raises:
        ValueError: a dense model, an unsupported router (see :func:`.adapters.find_moe_blocks`), a
            per-layer key that names no router.
        RuntimeError: nothing was rewritten.
    """
    if not isinstance(config, _ROUTER_CONFIGS):
        raise TypeError(f"expected one of {[c.__name__ for c in _ROUTER_CONFIGS]}, got {type(config).__name__}")
    blocks = find_moe_blocks(model)
    router_fqns = [f"{fqn}.gate" if fqn else "gate" for fqn, _, _ in blocks]
    before = {fqn: installed_passes(block.gate) for (fqn, block, _) in blocks}

    if isinstance(config, PESFConfig):
        for _, block, adapter in blocks:
            rewire_block_gate_input(block, adapter)
    for _, block, _ in blocks:
        enable_sentinel_slots(block.experts)

    if config.has_layer_values():
        known = set(router_fqns) | {fqn for fqn, _, _ in blocks}
        unknown = sorted(config.layer_keys() - known)
        if unknown:
            raise ValueError(f"per-layer keys name no MoE router of the model: {unknown[:4]}")
        quantize_(model, FqnToConfig({fqn: config.for_router(fqn) for fqn in router_fqns}), filter_fn=None)
    else:
        quantize_(model, config, filter_fn=is_moe_router)

    changed = [fqn for (fqn, block, _) in blocks if installed_passes(block.gate) != before[fqn]]
    if not changed:
        raise RuntimeError(f"{type(config).__name__}: no router of {type(model).__name__} was rewritten")
    return model
