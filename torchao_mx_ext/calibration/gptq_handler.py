"""The ``quantize_`` handler of :class:`.gptq.MXFP4GPTQConfig` (and of its deprecated alias
``GPTQConfig``): a module with fused MoE experts goes to :mod:`.gptq_experts` (one GPTQ per expert), any
other module to the linear steps of :mod:`.gptq`.

It lives above both so that neither imports the other's steps. The ``torchao_mx_ext.calibration``
package imports it, which registers the handler before any of its modules (and so either config)
can be used.
"""

import torch
from torchao.quantization.transform_module import register_quantize_module_handler

from ..architectures import expert_projection_names
from .gptq import GPTQConfig, MXFP4GPTQConfig, convert_linear, prepare_linear
from .gptq_experts import convert_experts, prepare_experts

__all__ = ["gptq_transform"]


def gptq_transform(module: torch.nn.Module, config: MXFP4GPTQConfig) -> torch.nn.Module:
    """Run ``config.step`` (``"prepare"`` or ``"convert"``) of GPTQ on ``module``."""
    names = expert_projection_names(module)
    if names is not None:
        if config.step == "prepare":
            return prepare_experts(module, config, names)
        return convert_experts(module, config, names)
    if config.step == "prepare":
        return prepare_linear(module, config)
    return convert_linear(module, config)


# torchao looks handlers up by the exact config type: the deprecated alias is registered too.
register_quantize_module_handler(MXFP4GPTQConfig)(gptq_transform)
register_quantize_module_handler(GPTQConfig)(gptq_transform)
