"""Mixture-of-Experts support (transformers 5.x MoE models: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE,
DeepSeek-V2/V3).

- Router passes as FX graph rewrites installed as subclasses of the router classes: PESF and Ban&Pick
  (:mod:`.router_configs` configs, :func:`apply_router_pass`, :func:`remove_router_passes`).
- QESC: routers re-fitted after quantization, layer by layer (:func:`qesc_quantize`).
- MXFP4 for the fused 3-D expert weights: ``quantize_(model, MXFP4BlockRotConfig(),
  filter_fn=is_fused_experts)`` (:mod:`.experts`).
- MoEfication of a dense Llama-family model into a real HF MoE for evaluation (:mod:`.moefy`).
"""

from .adapters import find_moe_blocks, is_moe_router, supported_router_names
from .ban_pick import calibrate_ban_pick
from .experts import is_fused_experts, quantize_experts_module
from .qesc import qesc_quantize, topk_agreement
from .router_configs import BanConfig, BanPickConfig, PESFConfig, PickConfig, apply_router_pass
from .router_pass import remove_router_passes, set_router_pass_buffer
from .routing_stats import ActiveExpertCounter, measure_active_experts

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
