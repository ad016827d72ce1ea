"""Mixture-of-Experts support (transformers 5.x MoE models: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE,
DeepSeek-V2/V3).

- Router passes as FX graph rewrites installed as subclasses of the router classes: PESF and Ban&Pick
  (:mod:`.router_configs` configs, :func:`apply_router_pass`, :func:`remove_router_passes`).
- QESC: routers re-fitted after quantization, layer by layer (:func:`qesc_quantize`).
- MXFP4 for the fused 3-D expert weights: ``quantize_(model, MXFP4BlockRotConfig(),
  filter_fn=is_fused_experts)`` (:mod:`.experts`).
- MoEfication of a dense model into a real HF MoE for evaluation lives with the experiment drivers
  (:mod:`torchao_mx_ext.experiments.moefy`).
"""

from ..lazy import lazy_attributes

# public name -> submodule that defines it; imported on first use, so that the experts backend (which
# the package's configs need) comes without the router passes, QESC and their dependencies.
_EXPORTS = {
    "find_moe_blocks": "adapters", "is_moe_router": "adapters", "supported_router_names": "adapters",
    "calibrate_ban_pick": "ban_pick",
    "is_fused_experts": "experts", "quantize_experts_module": "experts",
    "qesc_quantize": "qesc", "topk_agreement": "qesc",
    "BanConfig": "router_configs", "BanPickConfig": "router_configs", "PESFConfig": "router_configs",
    "PickConfig": "router_configs", "apply_router_pass": "router_configs",
    "remove_router_passes": "router_pass", "set_router_pass_buffer": "router_pass",
    "ActiveExpertCounter": "routing_stats", "measure_active_experts": "routing_stats",
}

__all__ = [
    "ActiveExpertCounter",
    "BanConfig",
    "BanPickConfig",
    "PESFConfig",
    "PickConfig",
    "apply_router_pass",
    "calibrate_ban_pick",
    "find_moe_blocks",
    "is_fused_experts",
    "is_moe_router",
    "measure_active_experts",
    "qesc_quantize",
    "quantize_experts_module",
    "remove_router_passes",
    "set_router_pass_buffer",
    "supported_router_names",
    "topk_agreement",
]


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
