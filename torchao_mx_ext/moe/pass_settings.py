"""Settings of the MoE router passes: the values each setting accepts and the ``quantize_`` configs
that carry them (:class:`PESFConfig`, :class:`PickConfig`, :class:`BanConfig`, :class:`BanPickConfig`).

One home for the accepted values: the configs (at construction and again when applied), the
installers (:func:`.pesf.install_pesf`, :func:`.ban_pick.install_pick`, :func:`.ban_pick.install_ban`),
:func:`.router_pass.set_router_pass_buffer` and the saved form (:mod:`.router_configs`) all check
through the functions here. Below the passes: this module imports none of them, so each pass module
(and :mod:`.router_pass`) can use it. Each config's ``quantize_`` handler is registered by the module
of its pass (:mod:`.pesf`, :mod:`.ban_pick`); import the configs from :mod:`.router_configs` (or
``torchao_mx_ext.moe``), which loads them all.
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torchao.core.config import AOBaseConfig

from ..calibration.data import check_bool, check_int, check_real

__all__ = [
    "BUFFER_CHECKS",
    "MASK_BUFFERS",
    "SETTING_CHECKS",
    "BanConfig",
    "BanPickConfig",
    "PESFConfig",
    "PerLayerConfig",
    "PickConfig",
    "check_alpha",
    "check_boost",
    "check_expert_mask",
    "check_experts",
    "check_k_min",
    "check_tau",
]


# ---------------------------------------------------------------------------------------------------
# Accepted values


def check_alpha(alpha, name: str = "alpha") -> float:
    """PESF's ``alpha`` as a float: a finite number >= 0 (a fraction of the balanced count; values
    above 1 are allowed, they prune harder), else ``TypeError``/``ValueError`` naming ``name``."""
    return check_real(alpha, name, low=0)


def check_tau(tau, name: str = "tau") -> float:
    """Ban's ``tau`` as a float: a cumulative normalised routing weight, in ``[0, 1]`` (``1`` keeps every
    expert; ``0`` keeps exactly ``k_min``, the measurement's "Ban at tau = 0")."""
    return check_real(tau, name, low=0, high=1)


def check_k_min(k_min, name: str = "k_min") -> int:
    """Ban's ``k_min`` as an int: an integer >= 1 (experts kept per token)."""
    return check_int(k_min, name, low=1)


def check_boost(boost, name: str = "boost") -> float:
    """Pick's ``boost`` as a float: a finite number >= 0 (logit units added to the key experts; ``0`` is
    the identity, a negative value would demote the key experts instead of reinforcing them)."""
    return check_real(boost, name, low=0)


def check_experts(experts, name: str = "experts") -> List[int]:
    """Expert indices as a list of ints >= 0 (the upper bound, N, is checked at installation)."""
    if isinstance(experts, (str, bytes)) or isinstance(experts, torch.Tensor) and experts.dim() != 1:
        raise TypeError(f"{name} must be a sequence of expert indices (integers >= 0), got {experts!r}")
    try:
        items = list(experts)
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence of expert indices (integers >= 0), got {type(experts).__name__} {experts!r}"
        ) from None
    return [check_int(e, f"{name}[{j}]", low=0) for j, e in enumerate(items)]


def check_expert_mask(value, num_experts: int, name: str = "mask") -> torch.Tensor:
    """An expert mask (Pick's ``pick_mask``, Ban's ``ban_protected``) as a bool tensor: a bool tensor
    of shape ``(N,)`` or ``()``, a sequence of ``N`` bools (Python or numpy), or one bool for every
    expert; else ``TypeError`` (not bools) / ``ValueError`` (not ``N`` entries) naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool mask over the {num_experts} experts, got a {value.dtype} tensor")
        mask = value
    elif isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a bool mask over the {num_experts} experts, got {value!r}")
    else:
        try:
            items = list(value)
        except TypeError:  # one value for every expert
            return torch.tensor(check_bool(value, name))
        mask = torch.tensor([check_bool(v, f"{name}[{j}]") for j, v in enumerate(items)], dtype=torch.bool)
    if mask.dim() != 0 and tuple(mask.shape) != (num_experts,):
        raise ValueError(f"{name} must have {num_experts} entries (one per expert), got shape {tuple(mask.shape)}")
    return mask


# config field (and saved setting) -> check of one value; the installers check through the same functions
SETTING_CHECKS = {
    "alpha": check_alpha,
    "tau": check_tau,
    "k_min": check_k_min,
    "boost": check_boost,
    "experts": check_experts,
    "picks": check_experts,
    "protected": check_experts,
}

# scalar pass buffer (see the installers) -> check of a value written into it
BUFFER_CHECKS = {
    "pesf_alpha": check_alpha,
    "pick_boost": check_boost,
    "ban_tau": check_tau,
    "ban_k_min": check_k_min,
}
# (N,) bool pass buffers: values checked with check_expert_mask
MASK_BUFFERS = ("pick_mask", "ban_protected")


# ---------------------------------------------------------------------------------------------------
# quantize_ configs (per-layer values keyed by router fqn, see :mod:`.router_configs`)


class PerLayerConfig:
    """Resolution of ``layer_*`` dict fields into scalar fields, per router fqn, and the checks of every
    field (at construction, ``__post_init__``, and again by :func:`apply_router_pass` before it changes
    anything, in case a field was assigned after construction)."""

    # (layer dict field, scalar field) pairs; set by subclasses
    _LAYER_FIELDS: Sequence = ()
    # scalar fields checked with SETTING_CHECKS; set by subclasses
    _SCALAR_FIELDS: Sequence = ()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """``TypeError``/``ValueError`` naming the field (``PickConfig.boost``, ``BanConfig.layer_taus['...']``)
        and its accepted range for any bad value."""
        cls = type(self).__name__
        for field in self._SCALAR_FIELDS:
            SETTING_CHECKS[field](getattr(self, field), f"{cls}.{field}")
        for layer, scalar in self._LAYER_FIELDS:
            table = getattr(self, layer)
            if table is None:
                continue
            if not isinstance(table, Mapping):
                raise TypeError(
                    f"{cls}.{layer} must be None or a dict {{router_fqn: {scalar}}}, got {type(table).__name__}"
                )
            for key, value in table.items():
                if not isinstance(key, str):
                    raise TypeError(
                        f"{cls}.{layer} must be a dict {{router_fqn: {scalar}}} keyed by router names (str), "
                        f"got the key {key!r}"
                    )
                SETTING_CHECKS[scalar](value, f"{cls}.{layer}[{key!r}]")

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

    def check_no_layer_values(self) -> None:
        """Raise unless every per-layer field is empty: a ``quantize_`` handler sees one router without
        its name, so it can apply scalar settings only."""
        if self.has_layer_values():
            raise ValueError(
                f"{type(self).__name__} has per-layer values, which need the router's name: use "
                "apply_router_pass(model, config), or quantize_(model, FqnToConfig({fqn: config.for_router(fqn)}), "
                "filter_fn=None)"
            )


@dataclass
class PESFConfig(PerLayerConfig, AOBaseConfig):
    """PESF (EAC-MoE, arXiv 2508.01625): per sequence and layer, drop experts selected fewer than
    ``alpha * l * K / N`` times (rule and guarantees: :mod:`.pesf`). ``alpha=0`` is the identity.

    Args:
        alpha: fraction of the balanced count (0.3 safe, 0.7 aggressive in the paper); a finite number
            >= 0 (above 1 prunes harder still).
        layer_alphas: per-router alpha, ``{router_fqn: alpha}``.
    """

    alpha: float = 0.3
    layer_alphas: Optional[Dict[str, float]] = None
    _LAYER_FIELDS = (("layer_alphas", "alpha"),)
    _SCALAR_FIELDS = ("alpha",)

    def __post_init__(self):
        self.validate()


@dataclass
class PickConfig(PerLayerConfig, AOBaseConfig):
    """Pick (Ban&Pick, arXiv 2509.06346): add ``boost`` to the router logits of key experts before
    top-k (rule: :mod:`.ban_pick`). No experts or ``boost=0`` is the identity.

    Args:
        experts: key experts of every router (default for routers not in ``layer_experts``): indices
            >= 0 (and < N, checked at installation).
        boost: logit boost (absolute, in logit units): a finite number >= 0.
        layer_experts, layer_boosts: per-router values.
    """

    experts: Sequence[int] = ()
    boost: float = 1.0
    layer_experts: Optional[Dict[str, List[int]]] = None
    layer_boosts: Optional[Dict[str, float]] = None
    _LAYER_FIELDS = (("layer_experts", "experts"), ("layer_boosts", "boost"))
    _SCALAR_FIELDS = ("experts", "boost")

    def __post_init__(self):
        self.validate()


@dataclass
class BanConfig(PerLayerConfig, AOBaseConfig):
    """Ban (Ban&Pick, arXiv 2509.06346): per token keep experts in descending weight order until their
    cumulative normalised weight reaches ``tau``, never fewer than ``k_min``; ``protected`` experts (and
    those of an installed Pick) are never banned (rule: :mod:`.ban_pick`). ``tau=1`` is the identity.

    Args:
        tau: cumulative weight to reach (0.7..0.9 in the paper), in ``[0, 1]`` (0: keep ``k_min``).
        k_min: minimum experts per token, an integer >= 1.
        protected: experts never banned (indices >= 0).
        layer_taus: per-router tau, ``{router_fqn: tau}``.
    """

    tau: float = 0.9
    k_min: int = 1
    protected: Sequence[int] = ()
    layer_taus: Optional[Dict[str, float]] = None
    _LAYER_FIELDS = (("layer_taus", "tau"),)
    _SCALAR_FIELDS = ("tau", "k_min", "protected")

    def __post_init__(self):
        self.validate()


@dataclass
class BanPickConfig(PerLayerConfig, AOBaseConfig):
    """Ban&Pick on every router: Pick (boost the key experts' logits), then Ban (with the picked
    experts protected). What :func:`.ban_pick.calibrate_ban_pick` returns. The defaults are neutral
    (``tau=1``, no picks, ``boost=0``): bit-identical routing.

    Args:
        tau, k_min: Ban's settings (``tau`` for routers not in ``layer_taus``), ranges as in :class:`BanConfig`.
        picks, boost: Pick's settings (for routers not in ``layer_picks`` / ``layer_boosts``), ranges as
            in :class:`PickConfig`.
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
    _SCALAR_FIELDS = ("tau", "k_min", "picks", "boost")

    def __post_init__(self):
        self.validate()
