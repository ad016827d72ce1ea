"""How many experts each token really uses: forward hooks on the routers count the *active* slots
(index < N and weight != 0) of every router call. Works with router passes installed (the hooks sit on
the router instances, whose classes the passes only subclass), in eager mode.

    stats = measure_active_experts(model, input_ids)
    stats.mean                     # mean active experts per token, over all layers
    stats.per_layer["model.layers.0.mlp.gate"]

    with ActiveExpertCounter(model) as counter:   # around any loop, e.g. generate()
        model.generate(...)
    counter.stats()
"""

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import nn

from .adapters import find_moe_blocks

__all__ = ["ActiveExpertStats", "ActiveExpertCounter", "measure_active_experts"]


@dataclass
class ActiveExpertStats:
    """Mean active experts per token.

    Attributes:
        per_layer: ``{router_fqn: active slots / tokens}``.
        mean: over all layers (every layer sees the same tokens, so the mean of ``per_layer``).
        tokens: ``{router_fqn: tokens routed}``.
        top_k: ``{router_fqn: K}`` (the most a token can use).
    """

    per_layer: Dict[str, float] = field(default_factory=dict)
    mean: float = 0.0
    tokens: Dict[str, int] = field(default_factory=dict)
    top_k: Dict[str, int] = field(default_factory=dict)


class ActiveExpertCounter:
    """Context manager that counts active experts per token on every supported router of ``model``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles = []
        self._active: Dict[str, int] = {}
        self._tokens: Dict[str, int] = {}
        self._top_k: Dict[str, int] = {}

    def __enter__(self) -> "ActiveExpertCounter":
        for fqn, block, adapter in find_moe_blocks(self.model):
            router = block.gate
            name = f"{fqn}.gate" if fqn else "gate"
            self._active[name] = 0
            self._tokens[name] = 0
            self._top_k[name] = adapter.top_k(router)
            self._handles.append(router.register_forward_hook(self._hook(name, adapter.num_experts(router))))
        return self

    def _hook(self, name: str, num_experts: int):
        def hook(module, args, output):
            _, weights, indices = output
            active = (indices < num_experts) & (weights != 0)
            self._active[name] += int(active.sum())
            self._tokens[name] += indices.shape[0]

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stats(self) -> ActiveExpertStats:
        per_layer = {n: self._active[n] / self._tokens[n] for n in self._active if self._tokens[n]}
        total_active = sum(self._active[n] for n in per_layer)
        total_tokens = sum(self._tokens[n] for n in per_layer)
        return ActiveExpertStats(
            per_layer=per_layer,
            mean=total_active / total_tokens if total_tokens else 0.0,
            tokens=dict(self._tokens),
            top_k=dict(self._top_k),
        )


@torch.no_grad()
def measure_active_experts(model: nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> ActiveExpertStats:
    """One forward pass of ``model(input_ids=..., **forward_kwargs)`` with the counters attached."""
    forward_kwargs.setdefault("use_cache", False)
    with ActiveExpertCounter(model) as counter:
        model(input_ids=input_ids, **forward_kwargs)
    return counter.stats()
