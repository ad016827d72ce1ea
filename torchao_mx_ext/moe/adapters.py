"""Per-architecture adapters for the MoE routers of transformers 5.x.

Every supported MoE layer is a block ``mlp`` holding a router ``mlp.gate`` that returns
``(router_logits, top_k_weights, top_k_index)`` and a fused experts module ``mlp.experts`` that takes
``(hidden_states_2d, top_k_index, top_k_weights)``. An index equal to ``num_experts`` is a *sentinel*
slot: the eager experts loop skips it, and the ``batched_mm`` / ``grouped_mm`` backends skip it once
the experts module is marked ``_is_expert_parallel`` (see :func:`enable_sentinel_slots`).

    architecture  router                 block                   scores   notes
    Qwen3-MoE     Qwen3MoeTopKRouter     Qwen3MoeSparseMoeBlock  softmax  norm_topk_prob
    Qwen2-MoE     Qwen2MoeTopKRouter     Qwen2MoeSparseMoeBlock  softmax  + shared expert (sigmoid-gated)
    Mixtral       MixtralTopKRouter      MixtralSparseMoeBlock   softmax  always renormalises, fp32 weights
    OLMoE         OlmoeTopKRouter        OlmoeSparseMoeBlock     softmax  norm_topk_prob
    DeepSeek-V2   DeepseekV2TopkRouter   DeepseekV2Moe           softmax  greedy / group-limited, scaling factor
    DeepSeek-V3   DeepseekV3TopkRouter   DeepseekV3MoE           sigmoid  correction bias, groups, scaling factor

The Qwen/Mixtral/OLMoE blocks flatten the hidden states to ``(B*S, H)`` before calling the router; the
DeepSeek blocks pass ``(B, S, H)``. Per-sequence passes (PESF) need the batch structure, so
:mod:`.router_pass` rewires the flattening blocks (``flattens_before_gate``).
"""

import functools
import re
from dataclasses import dataclass
from typing import List, Tuple

from torch import nn

__all__ = [
    "MoEAdapter",
    "supported_adapters",
    "supported_router_names",
    "adapter_for_router",
    "find_moe_blocks",
    "is_moe_router",
    "enable_sentinel_slots",
    "disable_sentinel_slots",
    "router_fqns",
]


@dataclass(frozen=True)
class MoEAdapter:
    """How to read one architecture's MoE layer.

    Attributes:
        name: architecture (transformers ``model_type``).
        router_class: the router module class (``block.gate``).
        block_class: the sparse MoE block class that owns the router.
        score_function: ``"softmax"`` or ``"sigmoid"``: how the router turns logits into scores.
        flattens_before_gate: the block calls ``self.gate`` on ``(B*S, H)`` instead of ``(B, S, H)``.
        shared_expert_names: names of the block's always-on shared expert modules (may be empty).
    """

    name: str
    router_class: type
    block_class: type
    score_function: str
    flattens_before_gate: bool
    shared_expert_names: Tuple[str, ...] = ()

    @staticmethod
    def num_experts(router: nn.Module) -> int:
        """N: the number of routed experts (the sentinel index)."""
        return int(router.num_experts)

    @staticmethod
    def top_k(router: nn.Module) -> int:
        """K: experts selected per token."""
        return int(router.top_k)

    @staticmethod
    def router_of(block: nn.Module) -> nn.Module:
        return block.gate

    @staticmethod
    def experts_of(block: nn.Module) -> nn.Module:
        return block.experts


@functools.lru_cache(maxsize=None)
def supported_adapters() -> Tuple[MoEAdapter, ...]:
    """The adapters of every supported architecture (imports transformers lazily)."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as dsv2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as dsv3
    from transformers.models.mixtral import modeling_mixtral as mixtral
    from transformers.models.olmoe import modeling_olmoe as olmoe
    from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    return (
        MoEAdapter("qwen3_moe", qwen3.Qwen3MoeTopKRouter, qwen3.Qwen3MoeSparseMoeBlock, "softmax", True),
        MoEAdapter("qwen2_moe", qwen2.Qwen2MoeTopKRouter, qwen2.Qwen2MoeSparseMoeBlock, "softmax", True,
                   ("shared_expert", "shared_expert_gate")),
        MoEAdapter("mixtral", mixtral.MixtralTopKRouter, mixtral.MixtralSparseMoeBlock, "softmax", True),
        MoEAdapter("olmoe", olmoe.OlmoeTopKRouter, olmoe.OlmoeSparseMoeBlock, "softmax", True),
        MoEAdapter("deepseek_v2", dsv2.DeepseekV2TopkRouter, dsv2.DeepseekV2Moe, "softmax", False,
                   ("shared_experts",)),
        MoEAdapter("deepseek_v3", dsv3.DeepseekV3TopkRouter, dsv3.DeepseekV3MoE, "sigmoid", False,
                   ("shared_experts",)),
    )


def supported_router_names() -> List[str]:
    return [a.router_class.__name__ for a in supported_adapters()]


def _supported_router_classes() -> Tuple[type, ...]:
    return tuple(a.router_class for a in supported_adapters())


def adapter_for_router(router: nn.Module) -> MoEAdapter:
    """The adapter of ``router`` (also when a router pass is installed: passes subclass the router)."""
    for adapter in supported_adapters():
        if isinstance(router, adapter.router_class):
            return adapter
    raise TypeError(
        f"unsupported MoE router {type(router).__name__}; supported routers: {', '.join(supported_router_names())}"
    )


def is_moe_router(module: nn.Module, fqn: str = "") -> bool:
    """``quantize_`` filter: True for a router of a supported architecture (with or without passes)."""
    return isinstance(module, _supported_router_classes())


# Class names that betray an MoE layer or router we do not know: reported instead of ignored.
_MOE_LIKE_NAME = re.compile(r"(Router|MoE|Moe|MoeBlock|MoeLayer|SparseMoe|SparseMoE)$")


def _looks_like_moe(module: nn.Module) -> bool:
    return bool(_MOE_LIKE_NAME.search(type(module).__name__)) or isinstance(getattr(module, "experts", None), nn.Module)


def find_moe_blocks(model: nn.Module) -> List[Tuple[str, nn.Module, MoEAdapter]]:
    """``[(fqn, block, adapter)]`` for every MoE block of ``model``, in module order.

    Raises:
        ValueError: the model has no MoE layer (a dense model), or it has MoE layers whose router is
            not supported (never a silent no-op); the message names the supported router classes.
    """
    found, unsupported = [], []
    adapters = supported_adapters()
    for fqn, module in model.named_modules():
        adapter = next((a for a in adapters if isinstance(module, a.block_class)), None)
        if adapter is not None:
            router = getattr(module, "gate", None)
            if isinstance(router, adapter.router_class):
                found.append((fqn, module, adapter))
            else:
                unsupported.append(f"{fqn}.gate ({type(router).__name__})")
            continue
        if _looks_like_moe(module) and not isinstance(module, _supported_router_classes()):
            unsupported.append(f"{fqn} ({type(module).__name__})")
    supported = ", ".join(supported_router_names())
    if unsupported:
        shown = ", ".join(unsupported[:4]) + (f" and {len(unsupported) - 4} more" if len(unsupported) > 4 else "")
        raise ValueError(
            f"{type(model).__name__} has MoE layers with an unsupported router: {shown}; "
            f"supported routers: {supported}"
        )
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no MoE layer (a dense model?): router passes need one of the "
            f"supported routers: {supported}"
        )
    return found


_SAVED_EP_FLAG = "_router_pass_saved_is_expert_parallel"


def enable_sentinel_slots(experts: nn.Module) -> bool:
    """Make the ``batched_mm`` / ``grouped_mm`` experts backends skip sentinel slots (index N).

    transformers' eager experts loop skips index N on its own, but ``batched_mm`` indexes the weights
    with it (IndexError) and ``grouped_mm`` leaves those rows uninitialised unless the module is marked
    ``_is_expert_parallel`` (the flag expert parallelism uses for the same sentinel convention: the
    backends then clamp and mask those slots). Reversible with :func:`disable_sentinel_slots`.
    Returns True if this call marked the module (False: not an experts module, or already marked).
    """
    if not hasattr(experts, "_is_expert_parallel") or hasattr(experts, _SAVED_EP_FLAG):
        return False
    setattr(experts, _SAVED_EP_FLAG, experts._is_expert_parallel)
    experts._is_expert_parallel = True
    return True


def disable_sentinel_slots(experts: nn.Module) -> None:
    if hasattr(experts, _SAVED_EP_FLAG):
        experts._is_expert_parallel = getattr(experts, _SAVED_EP_FLAG)
        delattr(experts, _SAVED_EP_FLAG)


def router_fqns(model: nn.Module) -> List[str]:
    """Fully qualified names of the supported routers of ``model`` (raises like :func:`find_moe_blocks`)."""
    return [f"{fqn}.gate" if fqn else "gate" for fqn, _, _ in find_moe_blocks(model)]
