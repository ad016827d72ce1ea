"""Calibration: GPTQ for MXFP4 (MR-GPTQ recipe, arXiv 2509.23202), DartQuant learned rotations
(arXiv 2511.04063), calibration data and the sequential layer-by-layer runner.

    from torchao.quantization import quantize_
    from torchao_mx_ext import MXFP4BlockRotConfig
    from torchao_mx_ext.calibration import MXFP4GPTQConfig

    quantize_(model, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(), step="prepare"))
    for batch in calibration_batches:   # forward passes accumulate each linear's Hessian
        model(batch)
    quantize_(model, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(), step="convert"))

The same two steps GPTQ fused MoE experts (``filter_fn=is_fused_experts``), one expert at a time on the
tokens routed to it (:mod:`.gptq_experts`). Every layer is calibrated on the full-precision model's inputs (one pass over the data). The
sequential variant (each decoder layer calibrated on the outputs of the already quantized layers
before it, one layer's activations in memory) is a driver on top of these two steps
(:func:`.sequential.sequential_gptq`).

``GPTQConfig`` is the deprecated name of :class:`MXFP4GPTQConfig` (a ``DeprecationWarning`` on
construction; it clashes with torchao's own ``torchao.prototype.gptq.GPTQConfig``).
"""

import torchao.core.config as _ao_config

from . import gptq_handler  # noqa: F401  registers the quantize_ handler of the GPTQ configs
from .dartquant import DartQuantStats, collect_activations, learn_rotations
from .gptq import GPTQConfig, HessianObserver, MXFP4GPTQConfig, gptq_mxfp4, static_group_exponents

# Let torchao's config_from_dict resolve MXFP4GPTQConfig (it only searches an allow-list of modules).
_ao_config.ALLOWED_AO_MODULES.add(__name__)

__all__ = [
    "DartQuantStats",
    "GPTQConfig",
    "HessianObserver",
    "MXFP4GPTQConfig",
    "collect_activations",
    "gptq_mxfp4",
    "learn_rotations",
    "static_group_exponents",
]
