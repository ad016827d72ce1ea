"""GPTQ for fused MoE experts: one MR-GPTQ per expert and projection, on the tokens routed to it.

Fused MoE experts (transformers 5.x ``mlp.experts``: 3-D ``gate_up_proj [E, 2I, H]`` (``up_proj``
without a gate) and ``down_proj [E, H, I]``, see :mod:`torchao_mx_ext.moe.experts`) are GPTQ'd expert
by expert, each expert ``e`` a pair of linears calibrated on the tokens the router sends it::

    quantize_(model, MXFP4GPTQConfig(base=..., step="prepare"), filter_fn=is_fused_experts)
    ...calibration forward passes...
    quantize_(model, MXFP4GPTQConfig(base=..., step="convert"), filter_fn=is_fused_experts)

With ``T_e`` the calibration (token, slot) pairs routed to ``e`` (top-k slots, sentinel slots with an
id ``>= E`` excluded), ``n_e = |T_e|``, ``x_t`` the token's hidden state and ``h_t = act(g_t) * u_t``
(``g_t, u_t`` the full-precision first projection of ``x_t`` by expert ``e``)::

    H1_e = 2/n_e sum_{t in T_e} (x_t R_H)^T (x_t R_H),      H2_e = 2/n_e sum_{t in T_e} (h_t R_I)^T (h_t R_I)

(rotated and zero-padded as each 3-D weight's ``rotate_input`` does), and ``gptq_mxfp4(W1_e R_H, H1_e)``,
``gptq_mxfp4(W2_e R_I, H2_e)`` give expert ``e``'s slices of the 3-D :class:`RotatedMXFP4Tensor` (the
layout of ``quantize_expert_weights``: same rotation block, attributes, padding). The rows are not
weighted by the routing probability ``p_t`` (as GPTQModel/AutoGPTQ do for MoE): each expert minimises
the error of its own output on the tokens it serves, although the block's output error is
``sum_t p_t (y_e - y^_e)(x_t)``, i.e. an exactly output-weighted Hessian would sum ``p_t^2 x x^T``. An
expert no calibration token reached (``n_e = 0``) has no Hessian: it is RTN-quantized, and convert
logs how many experts of the module that hit. Prepare swaps the module's class for a subclass whose
forward is the plain experts math (``moe.experts.experts_forward``) feeding the observers; convert
restores it and installs the MXFP4 experts class (as ``quantize_experts_module``). Memory: ``E``
Hessians of ``K_p x K_p`` per projection until convert.
"""

import logging
from typing import List, Tuple

import torch
from torchao.utils import TorchAOBaseTensor

from ..configs import check_quantizable, report_padding, weight_layout
from ..moe.experts import experts_forward, install_mxfp4_experts_class
from ..tensors import RotatedMXFP4Tensor
from .gptq import (
    HESSIAN_DTYPES,
    OBSERVER_ATTR,
    HessianObserver,
    MXFP4GPTQConfig,
    gptq_rotated,
    warn_dead_channels,
)

logger = logging.getLogger(__name__)

__all__ = ["ExpertsHessianObserver", "convert_experts", "prepare_experts"]


class ExpertsHessianObserver:
    """Per-expert Hessian observers of a fused experts module's two projections (see the module
    docstring): ``observers[p][e]`` is a :class:`HessianObserver` of projection ``p`` (0: ``gate_up_proj``
    or ``up_proj``, 1: ``down_proj``) of expert ``e``, fed the rows routed to ``e`` by the observing
    forward (:func:`torchao_mx_ext.moe.experts.experts_forward` with ``observe=self``).

    A plain object, not an ``nn.Module`` (kept out of ``named_modules`` and the state dict), stored on
    the module as ``mxfp4_gptq_observer`` together with the module's class before prepare. ``name``: how
    convert's messages name the module (set by the sequential driver; default: a description).
    :meth:`record_reference` pauses it (the asymmetric sequential driver's reference stream: routed
    rows of two streams do not pair, so experts observe the quantized stream only).
    """

    def __init__(self, names: Tuple[str, str], original_class: type, observers: List[List[HessianObserver]]):
        self.name = None
        self.names = names
        self.original_class = original_class
        self.observers = observers
        self.paused = False

    def record_reference(self, enabled: bool = True) -> None:
        """The interface of :meth:`HessianObserver.record_reference`: while enabled, forwards are not
        observed (experts keep plain GPTQ under asymmetric calibration)."""
        self.paused = enabled

    @torch.no_grad()
    def __call__(self, projection: int, rows: torch.Tensor, offsets: torch.Tensor) -> None:
        if self.paused:
            return
        start = 0
        for observer, end in zip(self.observers[projection], offsets.tolist()):
            if end > start:  # rows past the last offset are sentinel slots: never observed
                observer.update(rows[start:end])
            start = end

    def counts(self) -> List[int]:
        """Calibration rows ``n_e`` routed to each expert (the same for both projections)."""
        return [observer.count for observer in self.observers[0]]


_OBSERVING_CLASSES: dict = {}


def _observing_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The plain (full-precision) experts math of ``mxfp4_experts_forward``, feeding the observers."""
    return experts_forward(self, hidden_states, top_k_index, top_k_weights, observe=getattr(self, OBSERVER_ATTR))


def _observing_experts_class(cls: type) -> type:
    """``GPTQObserving<cls>``: ``cls`` with a forward that observes (one subclass per class)."""
    sub = _OBSERVING_CLASSES.get(cls)
    if sub is None:
        sub = type(f"GPTQObserving{cls.__name__}", (cls,), {"forward": _observing_experts_forward})
        _OBSERVING_CLASSES[cls] = sub
    return sub


def _describe_experts(module: torch.nn.Module, names: Tuple[str, str]) -> str:
    observer = getattr(module, OBSERVER_ATTR, None)
    cls = observer.original_class if isinstance(observer, ExpertsHessianObserver) else type(module)
    shapes = ", ".join(f"{name} {tuple(getattr(module, name).shape)}" for name in names)
    return f"{cls.__name__}({shapes})"


def prepare_experts(module: torch.nn.Module, config: MXFP4GPTQConfig, names: Tuple[str, str]) -> torch.nn.Module:
    """``step="prepare"`` for a fused experts module with projections ``names``: attach an
    :class:`ExpertsHessianObserver` and swap in the observing class (module docstring)."""
    desc = _describe_experts(module, names)
    if config.asymmetric:
        raise ValueError(
            f"{desc}: asymmetric GPTQ pairs the rows of a reference and a quantized stream, and routed expert "
            "inputs do not pair (the two streams route tokens differently); use asymmetric=False for fused experts"
        )
    for name in names:
        weight = getattr(module, name)
        if isinstance(weight, TorchAOBaseTensor):
            raise TypeError(f"{desc}: {name} is already quantized ({type(weight).__name__}); prepare the original model")
    if getattr(module, OBSERVER_ATTR, None) is not None:
        raise ValueError(f"{desc} is already prepared for GPTQ; run the calibration and step='convert'")
    check_quantizable(module)  # transposed [E, in, out] weights, NaN/Inf, ...: refused as the RTN path does
    if "forward" in vars(module):
        # e.g. an accelerate hook: it calls the forward bound before prepare, the observing class never runs
        raise NotImplementedError(
            f"{desc} has an instance-level forward (an accelerate offload hook?) that would bypass the observers; "
            "materialize it first (torchao_mx_ext.calibration.sequential.materialize_offloaded)"
        )
    num_experts = module.num_experts
    observers = []
    for name in names:
        weight = getattr(module, name)
        if not weight.is_floating_point() or weight.shape[0] != num_experts:
            raise ValueError(f"{desc}: GPTQ needs a floating-point [{num_experts}, N, K] {name}, got {weight.dtype} {tuple(weight.shape)}")
        width = weight.shape[-1]
        padded, block = weight_layout(config.base, width, weight.device)
        report_padding(width, padded, "expert input")
        dtype = HESSIAN_DTYPES[config.hessian_dtype]
        observers.append([HessianObserver(width, padded, block, dtype, weight.device) for _ in range(num_experts)])
    observer = ExpertsHessianObserver(names, type(module), observers)
    module.__class__ = _observing_experts_class(type(module))
    setattr(module, OBSERVER_ATTR, observer)
    return module


def convert_experts(module: torch.nn.Module, config: MXFP4GPTQConfig, names: Tuple[str, str]) -> torch.nn.Module:
    """``step="convert"`` for a module prepared by :func:`prepare_experts`: one GPTQ per expert and
    projection (RTN for experts no calibration token reached), the MXFP4 experts class installed."""
    desc = _describe_experts(module, names)
    observer = getattr(module, OBSERVER_ATTR, None)
    if not isinstance(observer, ExpertsHessianObserver):
        if any(isinstance(getattr(module, name), RotatedMXFP4Tensor) for name in names):
            raise ValueError(f"{desc} is already MXFP4-quantized; convert runs once")
        raise ValueError(
            f"{desc} was not prepared for GPTQ: run quantize_(model, MXFP4GPTQConfig(step='prepare', ...)) "
            "with the same filter_fn first"
        )
    counts = observer.counts()
    if sum(counts) == 0:
        raise ValueError(
            f"{desc} saw no calibration data: run forward passes between step='prepare' and "
            "step='convert' (or leave this module out with filter_fn)"
        )
    base = config.base
    layouts = []
    for name, observers in zip(names, observer.observers):
        weight = getattr(module, name)
        layouts.append(weight_layout(base, weight.shape[-1], weight.device))
        if not observers[0].matches_layout(*layouts[-1]):
            raise ValueError(f"{desc}: convert's base config has another rotation/padding than prepare's ({name})")

    # All experts first, the module only changes once every one of them is done.
    quantized = {}
    dead = {}  # projection -> (zeroed dead channels summed over experts, experts with any, width)
    for name, observers, (padded, block) in zip(names, observer.observers, layouts):
        weight = getattr(module, name).detach()
        qdata, scale = [], []
        zeroed_total, experts_hit = 0, 0
        for w_e, obs in zip(weight, observers):
            if obs.count == 0:  # no routed calibration rows: nothing to weight the error with -> RTN
                q = RotatedMXFP4Tensor.from_hp(w_e, base.block_size, base.scale_rule, base.activation_scale_rule, block, base.kernel_preference)
                q_e, s_e = q.qdata, q.scale
            else:
                q_e, s_e, zeroed = gptq_rotated(w_e, obs, padded, block, config)
                zeroed_total += zeroed
                experts_hit += bool(zeroed)
            qdata.append(q_e)
            scale.append(s_e)
        if zeroed_total:
            dead[name] = (zeroed_total, experts_hit, padded)
        quantized[name] = RotatedMXFP4Tensor(
            torch.stack(qdata), torch.stack(scale), base.block_size, base.scale_rule, base.activation_scale_rule,
            weight.shape[-1], weight.dtype, block, None, base.kernel_preference,
        )

    delattr(module, OBSERVER_ATTR)
    module.__class__ = observer.original_class
    for name, new_weight in quantized.items():
        setattr(module, name, torch.nn.Parameter(new_weight, requires_grad=False))
    install_mxfp4_experts_class(module)
    for name, (zeroed, experts_hit, width) in dead.items():  # one warning per projection, summed over experts
        warn_dead_channels(
            f"{observer.name or desc}.{name}", zeroed, width * len(counts),
            f" (summed over the experts' {width}-wide inputs; {experts_hit} of {len(counts)} experts affected)",
        )
    empty = sum(count == 0 for count in counts)
    if empty:
        logger.warning(
            "GPTQ-MXFP4: %s: %d of %d experts received no calibration tokens; their %s and %s are RTN-quantized "
            "(more or longer calibration samples route tokens to them)", desc, empty, len(counts), *names,
        )
    logger.info(
        "GPTQ-MXFP4: %s quantized, %d routed calibration rows over %d experts", desc, sum(counts), len(counts) - empty
    )
    return module
