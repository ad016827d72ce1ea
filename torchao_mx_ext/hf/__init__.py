"""Hugging Face transformers integration: our own quantization method, ``quant_method="torchao_mx_ext"``.

Importing this module registers :class:`MXFP4HfConfig` and :class:`MXFP4HfQuantizer` with transformers
(``transformers.quantizers.auto.register_quantization_config`` / ``register_quantizer``);
``import torchao_mx_ext`` alone registers stand-ins that import this module when transformers first
uses them (:mod:`torchao_mx_ext.registration`). Then::

    import torchao_mx_ext as tme
    from torchao_mx_ext.hf import MXFP4HfConfig, save_pretrained

    # quantize on load (same weights as quantize_ on the model loaded normally; lm_head stays fp)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=MXFP4HfConfig(tme.MXFP4BlockRotConfig()))
    save_pretrained(model, "out")           # safetensors, written to a temporary folder then renamed
    model = AutoModelForCausalLM.from_pretrained("out")   # reload: bit-identical logits

MoE models (Qwen2-MoE, Qwen3-MoE, Mixtral, ...) work the same way: their fused experts
(``mlp.experts.gate_up_proj`` / ``down_proj``) are quantized on load and saved as 3-D MXFP4 weights.

``model.save_pretrained("out")`` writes the same files, but not atomically. A model quantized with
``quantize_`` directly saves the same way (``save_pretrained(model, out, quant_config=config)``).

Without this module imported, transformers does not know the method; loading our checkpoint then
fails with a size-mismatch error (stored codes have one more dimension than the weights) rather
than silently leaving the layers randomly initialised.
"""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from ..registration import DeferredHfClass
from .config import FORMAT_VERSION, QUANT_METHOD, MXFP4HfConfig
from .quantizer import MXFP4HfQuantizer
from .saving import attach_quantizer, save_pretrained
from .serialization import CheckpointError

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "MXFP4HfConfig",
    "MXFP4HfQuantizer",
    "QUANT_METHOD",
    "attach_quantizer",
    "register",
    "save_pretrained",
]


def register() -> None:
    """Register our config and quantizer with transformers under :data:`QUANT_METHOD` (idempotent)."""
    for mapping, cls, register_fn in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, MXFP4HfConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, MXFP4HfQuantizer, register_quantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None:
            if isinstance(current, DeferredHfClass) or current.__module__.startswith(__name__):
                # The stand-in of torchao_mx_ext.registration, or our own class from before a reload.
                mapping[QUANT_METHOD] = cls
                continue
            raise RuntimeError(f"transformers already has a quantization method {QUANT_METHOD!r}: {current!r}")
        register_fn(QUANT_METHOD)(cls)


register()
