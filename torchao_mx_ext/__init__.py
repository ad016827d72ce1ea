"""torchao-mx-ext: rotated MXFP4 (W4A4 and weight-only) quantization for LLMs, on top of torchao.

    from torchao.quantization import quantize_
    import torchao_mx_ext as tme
    quantize_(model, tme.MXFP4BlockRotConfig())

Names are imported on first use (``tme.MXFP4Config`` imports torchao and our configs, ``tme.moe`` the
MoE layer, ...), so ``import torchao_mx_ext`` costs almost nothing and never imports transformers; what
must be known to transformers before it loads a checkpoint is registered when transformers is imported
(:mod:`.registration`).
"""

import importlib

from . import registration as _registration
from .lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "MXFP4Config": "configs",
    "MXFP4BlockRotConfig": "configs",
    "DEFAULT_SCALE_RULE": "configs",
    "RotatedMXFP4Tensor": "tensors",
    "MXFP4ActivationTensor": "tensors",
    "SCALE_RULES": "mx",
    "ROTATIONS": "rotation",
    "cache_dequantized_weights": "inference",
    "quantize_output_head": "inference",
    "share_input_quantization": "shared_quant",
    "unshare_input_quantization": "shared_quant",
    "PACKED_GQA_SDPA": "regional_compile",
    "compile_decoder_layers": "regional_compile",
    "compile_model": "regional_compile",
    "GroupSharedInputGEMVs": "gemv_grouping",
    "MXFP4GPTQConfig": "calibration",
    "GPTQConfig": "calibration",  # deprecated name of MXFP4GPTQConfig
    "gptq_mxfp4": "calibration",
    "BanConfig": "moe",
    "BanPickConfig": "moe",
    "PESFConfig": "moe",
    "PickConfig": "moe",
    "apply_router_pass": "moe",
    "qesc_quantize": "moe",
    "MXFP4HfConfig": "hf",
    "quantize_model": "recipes",
}
_SUBMODULES = {
    "calibration", "cli", "configs", "eval", "gemv_grouping", "hf", "inference", "kernels", "moe", "mx", "recipes",
    "regional_compile", "rotation", "shared_quant", "tensors", "zoo",
}

__all__ = sorted(_EXPORTS) + ["moe"]


_lazy_getattr, __dir__ = lazy_attributes(__name__, _EXPORTS, _SUBMODULES)


def __getattr__(name):
    if _EXPORTS.get(name) == "configs":
        # Fused MoE experts register their quantize_ path with the configs' handler.
        importlib.import_module(".moe.experts", __name__)
    return _lazy_getattr(name)


_registration.install()
