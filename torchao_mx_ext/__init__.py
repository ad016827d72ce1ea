"""torchao-mx-ext: rotated MXFP4 (W4A4 and weight-only) quantization for LLMs, on top of torchao.

    from torchao.quantization import quantize_
    import torchao_mx_ext as tme
    quantize_(model, tme.MXFP4BlockRotConfig())
"""

import torchao.core.config as _ao_config

from .configs import DEFAULT_SCALE_RULE, MXFP4BlockRotConfig, MXFP4Config
from .inference import cache_dequantized_weights
from .regional_compile import PACKED_GQA_SDPA, compile_decoder_layers
from .shared_quant import share_input_quantization, unshare_input_quantization
from .mx import SCALE_RULES
from .rotation import ROTATIONS
from .tensors import MXFP4ActivationTensor, RotatedMXFP4Tensor
from .calibration import GPTQConfig, gptq_mxfp4
from . import moe
from .moe import BanConfig, BanPickConfig, PESFConfig, PickConfig, apply_router_pass, qesc_quantize

# torchao's config_from_dict only resolves classes in an allow-list of modules; add ours so our
# configs round-trip through config_to_dict / config_from_dict like torchao's own.
_ao_config.ALLOWED_AO_MODULES.add(__name__)

# Registers the transformers quantization method "torchao_mx_ext" (after the line above: reading our
# configs back from config.json needs it).
from .hf import MXFP4HfConfig  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BanConfig",
    "BanPickConfig",
    "DEFAULT_SCALE_RULE",
    "GPTQConfig",
    "MXFP4ActivationTensor",
    "MXFP4BlockRotConfig",
    "MXFP4HfConfig",
    "MXFP4Config",
    "PACKED_GQA_SDPA",
    "PESFConfig",
    "PickConfig",
    "ROTATIONS",
    "RotatedMXFP4Tensor",
    "SCALE_RULES",
    "apply_router_pass",
    "cache_dequantized_weights",
    "compile_decoder_layers",
    "gptq_mxfp4",
    "moe",
    "qesc_quantize",
    "share_input_quantization",
    "unshare_input_quantization",
]
