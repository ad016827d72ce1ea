"""``MXFP4HfQuantizer``: the transformers ``HfQuantizer`` of our method.

Two ways in through ``from_pretrained``:

- quantize on load (``quantization_config=MXFP4HfConfig(MXFP4BlockRotConfig())`` on a full-precision
  checkpoint): each eligible ``nn.Linear`` weight (every linear except ``lm_head`` and
  ``modules_to_not_convert``) is quantized by our ``quantize_`` handler as it is read, so the result
  equals ``quantize_`` on the model loaded normally;
- reload (``config.json`` has ``quant_method: "torchao_mx_ext"``): the checkpoint is checked first
  (metadata, format version, digests: :func:`~.serialization.read_checkpoint`), then each weight is
  rebuilt from its stored codes, scales and shared rotation, as a parameter with ``requires_grad=False``.

``save_pretrained`` writes the layout of :mod:`.serialization` (safetensors only) via
:meth:`MXFP4HfQuantizer.get_state_dict_and_metadata`.
"""

import types
from typing import Optional

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from ..tensors import RotatedMXFP4Tensor
from .config import MXFP4HfConfig
from .serialization import ROTATION_PREFIX, CheckpointError, QuantizedCheckpoint, flatten_state_dict, read_checkpoint

__all__ = ["MXFP4HfQuantizer"]


def _never_quantized(fqn: str) -> bool:
    # Same rule as torchao-mx compare (recipes.is_quantizable_linear): W4A4 recipes keep the output
    # head in high precision.
    return fqn.rpartition(".")[2] == "lm_head"


def _mark_loaded(module: torch.nn.Module) -> None:
    # transformers re-initialises parameters without this flag after loading.
    module._is_hf_initialized = True
    for p in module.parameters(recurse=False):
        p._is_hf_initialized = True


def _set_linear_repr(module: torch.nn.Module) -> None:
    from .. import configs

    # The same repr quantize_ gives a linear (cosmetic: skipped if the helper is not there).
    extra_repr = getattr(configs, "linear_extra_repr", None)
    if extra_repr is not None and isinstance(module, torch.nn.Linear):
        module.extra_repr = types.MethodType(extra_repr, module)


class MXFP4HfQuantizer(HfQuantizer):
    """Quantize-on-load and save/reload of models with :class:`RotatedMXFP4Tensor` weights."""

    requires_calibration = False
    quantization_config: MXFP4HfConfig

    def __init__(self, quantization_config: MXFP4HfConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint: Optional[QuantizedCheckpoint] = None

    # -- checks and flags ---------------------------------------------------------------------------
    def validate_environment(self, device_map=None, **kwargs):
        """Refuse disk offload (the weights are tensor subclasses), and quantize-on-load without a
        data-free recipe."""
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("torchao_mx_ext quantized models cannot be offloaded to disk; remove 'disk' from device_map")
        if self.pre_quantized:
            return
        from ..configs import MXFP4Config

        config = self.quantization_config.quant_config
        if config is None:
            raise ValueError(
                "MXFP4HfConfig needs a quant_config (e.g. MXFP4BlockRotConfig()) to quantize a full-precision checkpoint"
            )
        if not isinstance(config, MXFP4Config):
            # e.g. GPTQConfig: it needs calibration data, which loading does not have.
            raise ValueError(
                f"{type(config).__name__} cannot quantize on load (only data-free MXFP4Config / MXFP4BlockRotConfig "
                "can); quantize the loaded model with quantize_ and save it with torchao_mx_ext.hf.save_pretrained"
            )

    @property
    def quantized_element_size(self) -> float:
        return 4.25 / 8  # 4-bit codes + one 8-bit scale per 32 weights

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def eligible(self, module: torch.nn.Module, fqn: str) -> bool:
        """Whether quantize-on-load quantizes this module (an ``nn.Linear`` not excluded)."""
        return (
            isinstance(module, torch.nn.Linear)
            and not _never_quantized(fqn)
            and should_convert_module(fqn, self.quantization_config.modules_to_not_convert)
        )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return tensor_name == "weight" and self.eligible(module, param_name.rpartition(".")[0])

    # -- loading ------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        if checkpoint_files is None:
            raise CheckpointError("a torchao_mx_ext checkpoint loads from safetensors files only (got a state dict)")
        # Check the whole checkpoint before transformers reads it: errors surface here, with our message.
        self.checkpoint = read_checkpoint(checkpoint_files)
        # The shared rotation blocks are read here, not by transformers: do not report them as unexpected.
        ignore = set(model._keys_to_ignore_on_load_unexpected or ())
        ignore.add(r"(^|\.)" + ROTATION_PREFIX.replace(".", r"\.") + r"\d+$")
        model._keys_to_ignore_on_load_unexpected = ignore
        return model

    @property
    def serialized_names(self):
        if not self.pre_quantized or self.checkpoint is None:
            return {}
        return self.checkpoint.param_names()

    def get_load_operations(self):
        return {"deserialize": MXFP4Deserialize}

    def get_new_dtype(self, converter, param, dtype):
        # Our converter also sees the model's unquantized `weight`s: cast those as transformers would,
        # keep our uint8 codes and scales as stored.
        is_float = param.get_dtype().startswith(("F", "BF")) if hasattr(param, "get_dtype") else param.is_floating_point()
        return dtype if is_float else None

    def get_quantize_ops(self):
        return MXFP4Quantize(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            missing = [name for name in self.checkpoint.weights if not isinstance(_find_param(model, name), RotatedMXFP4Tensor)]
            if missing:
                raise CheckpointError(f"these MXFP4 weights were not loaded from the checkpoint: {', '.join(missing)}")
            # Our converter has no reverse: keep it out of the conversions save_pretrained would revert.
            model._weight_conversions = [
                c for c in getattr(model, "_weight_conversions", [])
                if not any(isinstance(op, MXFP4Deserialize) for op in getattr(c, "operations", ()))
            ]
        else:
            # Linears whose weight was not in the checkpoint (tied to another tensor, or missing and
            # initialised): quantize them now, as quantize_ on the loaded model would.
            for fqn, module in model.named_modules():
                if self.eligible(module, fqn) and not isinstance(module.weight, RotatedMXFP4Tensor):
                    _quantize_module(module, self.quantization_config.quant_config)
        return model

    # -- saving -------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        """Plain tensors + safetensors metadata for ``save_pretrained`` (layout in :mod:`.serialization`)."""
        return flatten_state_dict(model.state_dict(), digest_all=not _has_weight_conversions(model))


def _has_weight_conversions(model) -> bool:
    """Whether save_pretrained will rename/convert tensors (then their written bytes differ from the state dict's)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    return bool(conversions)


def _find_param(model, name: str):
    """The parameter stored as ``name``, also when the model is the base model of the saved one (or vice versa)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
    for candidate in candidates:
        try:
            return model.get_parameter(candidate)
        except AttributeError:
            continue
    return None


def _stored_name(checkpoint: QuantizedCheckpoint, model, name: str) -> Optional[str]:
    prefix = getattr(model, "base_model_prefix", "") or ""
    for candidate in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")):
        if candidate in checkpoint.weights:
            return candidate
    return None


def _quantize_module(module: torch.nn.Module, config) -> None:
    from torchao.quantization import quantize_

    # quantize_ on the single module runs our registered handler, exactly as on a whole model.
    quantize_(module, config, filter_fn=lambda m, fqn: m is module)


class _QuantizerOp(ConversionOps):
    def __init__(self, hf_quantizer: MXFP4HfQuantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # transformers deep-copies the converter for every checkpoint key; share the quantizer (and
        # its checkpoint data) instead, so that loaded weights share one rotation tensor per block.
        return type(self)(self.hf_quantizer)


class MXFP4Quantize(_QuantizerOp):
    """Quantize one full-precision linear weight as transformers reads it."""

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        _, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        module, tensor_name = get_module_from_name(model, full_layer_name)
        module._parameters[tensor_name] = torch.nn.Parameter(value, requires_grad=False)
        _quantize_module(module, self.hf_quantizer.quantization_config.quant_config)
        _mark_loaded(module)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class MXFP4Deserialize(_QuantizerOp):
    """Rebuild a :class:`RotatedMXFP4Tensor` from its stored parts; pass the model's other ``weight``s through."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        checkpoint = self.hf_quantizer.checkpoint
        stored = _stored_name(checkpoint, model, full_layer_name)
        parts = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        leaf = full_layer_name.rpartition(".")[2]
        if stored is None:
            if set(parts) != {leaf}:
                raise CheckpointError(f"{full_layer_name}: found {sorted(parts)} but no MXFP4 metadata for this weight")
            return {full_layer_name: parts[leaf]}
        scale_key = next((k for k in parts if k != leaf), None)
        if leaf not in parts or scale_key is None or len(parts) != 2:
            raise CheckpointError(f"{full_layer_name}: expected codes and scales, found {sorted(parts)}")
        module, _ = get_module_from_name(model, full_layer_name)
        hp_dtype = getattr(module, leaf).dtype  # the load dtype transformers chose for this parameter
        weight = checkpoint.build(stored, parts[leaf], parts[scale_key], hp_dtype)
        _set_linear_repr(module)
        param = torch.nn.Parameter(weight, requires_grad=False)
        param._is_hf_initialized = True
        return {full_layer_name: param}
