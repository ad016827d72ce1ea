"""``MXFP4HfQuantizer``: the transformers ``HfQuantizer`` of our method.

Two ways in through ``from_pretrained``:

- quantize on load (``quantization_config=MXFP4HfConfig(MXFP4BlockRotConfig())`` on a full-precision
  checkpoint): each eligible ``nn.Linear`` weight (every linear except ``lm_head`` and
  ``modules_to_not_convert``) and each projection of a fused MoE experts module (``mlp.experts``:
  ``gate_up_proj``/``up_proj`` and ``down_proj``, 3-D) is quantized by our ``quantize_`` code as it is
  read, so the result equals ``quantize_`` on the model loaded normally (the experts get the class
  :func:`~torchao_mx_ext.moe.experts.quantize_experts_module` gives once both projections are in).
  Per-expert checkpoints (``experts.<e>.gate_proj.weight`` ...) are fused by transformers' own
  conversion mapping first; we quantize the fused tensor;
- reload (``config.json`` has ``quant_method: "torchao_mx_ext"``): the checkpoint is checked first
  (metadata, format version, digests: :func:`~.serialization.read_checkpoint`), then each weight is
  rebuilt from its stored codes, scales and shared rotation, as a parameter with ``requires_grad=False``.
  Version-2 checkpoints hold the model's own state-dict names, so transformers' checkpoint conversions
  (per-expert merges, renames) are not applied to them (see :mod:`.serialization`).

``save_pretrained`` writes the layout of :mod:`.serialization` (safetensors only) via
:meth:`MXFP4HfQuantizer.get_state_dict_and_metadata`, under the model's own names (no conversion
reverted).

MoE router passes (PESF, Ban, Pick of :mod:`torchao_mx_ext.moe`) keep their values in non-persistent
buffers, so they are not in the tensors: a save records them in ``quantization_config.router_passes``
(values read from the buffers), and loading re-installs them once the weights are in
(:func:`~torchao_mx_ext.moe.router_configs.install_router_passes`).
"""

import re
from typing import Optional

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from ..architectures import high_precision_modules
from ..configs import set_linear_repr
from ..inference import is_quantized_head
from ..moe.experts import expert_projection_names, install_mxfp4_experts_class, quantize_expert_weights
from ..moe.router_configs import install_router_passes, router_pass_settings
from ..shared_quant import per_linear_state_dict
from ..tensors import RotatedMXFP4Tensor
from .config import FORMAT_VERSION, MXFP4HfConfig
from .serialization import (
    IMPORT_NOTE,
    ROTATION_PREFIX,
    CheckpointError,
    QuantizedCheckpoint,
    flatten_state_dict,
    read_checkpoint,
)

__all__ = ["MXFP4HfQuantizer"]


def _mark_loaded(module: torch.nn.Module) -> None:
    # transformers re-initialises parameters without this flag after loading.
    module._is_hf_initialized = True
    for p in module.parameters(recurse=False):
        p._is_hf_initialized = True


class MXFP4HfQuantizer(HfQuantizer):
    """Quantize-on-load and save/reload of models with :class:`RotatedMXFP4Tensor` weights."""

    requires_calibration = False
    quantization_config: MXFP4HfConfig

    def __init__(self, quantization_config: MXFP4HfConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint: Optional[QuantizedCheckpoint] = None
        self.high_precision: set = set()  # module names, set once the model is built

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
            # e.g. MXFP4GPTQConfig: it needs calibration data, which loading does not have.
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
        """Whether quantize-on-load quantizes this module: an ``nn.Linear`` or a fused MoE experts module
        (what ``configs.quantize_linears`` quantizes), outside the model's high-precision modules
        (``architectures.high_precision_modules``: the output head, keep-in-fp32 modules) and
        ``modules_to_not_convert``."""
        return (
            (isinstance(module, torch.nn.Linear) or expert_projection_names(module) is not None)
            and fqn not in self.high_precision
            and should_convert_module(fqn, self.quantization_config.modules_to_not_convert)
        )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return tensor_name in _quantized_names(module) and self.eligible(module, param_name.rpartition(".")[0])

    # -- loading ------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.high_precision = high_precision_modules(model)
        if not self.pre_quantized:
            # Fail before reading any weight on experts our backend cannot run.
            for fqn, module in model.named_modules():
                if expert_projection_names(module) is not None and self.eligible(module, fqn):
                    _check_experts_supported(module, fqn)
            return model
        if checkpoint_files is None:
            raise CheckpointError("a torchao_mx_ext checkpoint loads from safetensors files only (got a state dict)")
        # Check the whole checkpoint before transformers reads it: errors surface here, with our message.
        self.checkpoint = read_checkpoint(checkpoint_files, optional=_not_needed_by(model))
        stated = self.quantization_config.format_version
        if stated != self.checkpoint.format_version:
            raise CheckpointError(
                f"config.json says torchao_mx_ext format version {stated}, but the safetensors files say "
                f"{self.checkpoint.format_version} (files of different saves?)"
            )
        # The shared rotation blocks are read here, not by transformers: do not report them as unexpected.
        ignore = set(model._keys_to_ignore_on_load_unexpected or ())
        ignore.add(r"(^|\.)" + re.escape(ROTATION_PREFIX) + r"\d+$")
        ignore.add(r"(^|\.)" + re.escape(IMPORT_NOTE) + "$")
        model._keys_to_ignore_on_load_unexpected = ignore
        return model

    @property
    def serialized_names(self):
        if not self.pre_quantized or self.checkpoint is None:
            return {}
        return self.checkpoint.param_names()

    def get_load_operations(self):
        return {"deserialize": MXFP4Deserialize}

    def get_weight_conversions(self):
        """One converter per stored parameter leaf name (``weight``, ``gate_up_proj``, ``down_proj``):
        it gathers ``<name>`` and ``<name>_mxfp4_scale`` into one :class:`RotatedMXFP4Tensor`.

        The patterns are anchored at the end of the key: a bare ``down_proj`` (transformers' default
        boundary) would also catch ``mlp.down_proj.weight`` of a dense layer or a shared expert, and the
        first matching converter wins.
        """
        from transformers.core_model_loading import WeightConverter

        if not self.pre_quantized:
            return []
        return [
            WeightConverter([f"{name}$" for name in names], f"{leaf}", [MXFP4Deserialize(self)])
            for leaf, names in self.serialized_names.items()
        ]

    def update_weight_conversions(self, weight_conversions, model):
        """Our converters, after the model's checkpoint conversions only for format-version-1 files.

        A version-2 checkpoint is written under the model's own names (:mod:`.serialization`), so the
        model's conversions (per-expert merges of Mixtral/Qwen2-MoE/..., renames) have nothing to do and
        must not touch our fused codes and scales: they are dropped.
        """
        if self.pre_quantized and self.checkpoint is not None and self.checkpoint.format_version >= 2:
            return self.get_weight_conversions()
        return super().update_weight_conversions(weight_conversions, model)

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
            for fqn, module in model.named_modules():
                names = expert_projection_names(module)
                if names is not None and any(isinstance(getattr(module, n), RotatedMXFP4Tensor) for n in names):
                    _check_experts_supported(module, fqn)
                    install_mxfp4_experts_class(module)
                elif any(isinstance(p, RotatedMXFP4Tensor) and p.dim() != 2 for p in module.parameters(recurse=False)):
                    raise CheckpointError(
                        f"{fqn} ({type(module).__name__}) got an MXFP4 weight with more than 2 dimensions but is not "
                        "a fused MoE experts module (3-D gate_up_proj/up_proj and down_proj)"
                    )
            # Our converter has no reverse: keep it out of the conversions save_pretrained would revert.
            model._weight_conversions = [
                c for c in getattr(model, "_weight_conversions", [])
                if not any(isinstance(op, MXFP4Deserialize) for op in getattr(c, "operations", ()))
            ]
        else:
            # Weights that were not in the checkpoint (tied to another tensor, or missing and
            # initialised): quantize them now, as quantize_ on the loaded model would.
            config = self.quantization_config.quant_config
            for fqn, module in model.named_modules():
                if not self.eligible(module, fqn):
                    continue
                names = expert_projection_names(module)
                if names is None:
                    if not isinstance(module.weight, RotatedMXFP4Tensor):
                        _quantize_module(module, config)
                    continue
                for name in names:
                    if not isinstance(getattr(module, name), RotatedMXFP4Tensor):
                        _quantize_expert_projection(module, name, getattr(module, name), config)
                install_mxfp4_experts_class(module)
        if self.quantization_config.router_passes:
            install_router_passes(model, self.quantization_config.router_passes)
        return model

    # -- saving -------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        """Plain tensors + safetensors metadata for ``save_pretrained`` (layout in :mod:`.serialization`).

        Also makes the save write format version :data:`FORMAT_VERSION` as it is: ``save_pretrained``
        calls this before writing ``config.json`` and before reverting the model's checkpoint
        conversions, so the configs' ``format_version`` is set here (a reloaded version-1 model is saved
        as version 2), and ``model._weight_conversions`` is emptied: nothing is reverted, every tensor
        keeps the model's own name (transformers would otherwise split fused experts codes by expert).
        The router passes installed on the model are recorded in the configs' ``router_passes`` (``None``
        without passes) for the same reason.
        """
        # The loader keeps high-precision modules (the output head) unquantized; a head quantized by
        # inference.quantize_output_head would come back as missing weights, so refuse before writing.
        quantized_heads = sorted(fqn for fqn in high_precision_modules(model) if is_quantized_head(model.get_submodule(fqn)))
        if quantized_heads:
            raise ValueError(
                f"{', '.join(quantized_heads)} is quantized (quantize_output_head, an inference-time option); "
                "checkpoints keep the output head in high precision: save before quantizing the head"
            )
        model._weight_conversions = []
        router_passes = router_pass_settings(model) or None  # from the buffers: current values
        for config in (self.quantization_config, getattr(model.config, "quantization_config", None)):
            if isinstance(config, MXFP4HfConfig):
                config.format_version = FORMAT_VERSION
                config.router_passes = router_passes
        # Inputs shared by q/k/v or gate/up (an inference mode) are saved as the per-linear weights.
        return flatten_state_dict(per_linear_state_dict(model))


def _quantized_names(module: torch.nn.Module) -> tuple:
    """The parameter names quantize-on-load replaces in ``module``: a linear's ``weight``, or both
    projections of a fused experts module."""
    names = expert_projection_names(module)
    return ("weight",) if names is None else names


def _check_experts_supported(module: torch.nn.Module, fqn: str) -> None:
    if getattr(module, "is_transposed", False):
        raise NotImplementedError(
            f"{fqn} ({type(module).__name__}) stores its expert weights transposed ([E, in, out]); torchao_mx_ext's "
            "MXFP4 experts support [E, out, in] (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3): leave it in "
            "high precision with MXFP4HfConfig(modules_to_not_convert=[...])"
        )


def _quantize_expert_projection(module: torch.nn.Module, name: str, value: torch.Tensor, config) -> None:
    """Quantize one 3-D projection of a fused experts module, as ``quantize_experts_module`` does for both."""
    param = torch.nn.Parameter(quantize_expert_weights(value, config), requires_grad=False)
    param._is_hf_initialized = True
    setattr(module, name, param)


def _not_needed_by(model):
    """Whether a stored tensor name may be absent from the files when loading ``model``: a weight the
    model ties to another tensor (transformers writes only one of them), or a name the model does not
    have (a base model loading a causal-LM checkpoint); either side's base-model prefix accepted."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def variants(name):
        return {name, name.removeprefix(prefix + "."), f"{prefix}.{name}"} if prefix else {name}

    own = {v for name in model.state_dict() for v in variants(name)}
    tied = {v for name in model.get_expanded_tied_weights_keys(all_submodels=True) for v in variants(name)}
    return lambda name: name in tied or name not in own


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
    """Quantize one full-precision linear weight, or one (fused) experts projection, as transformers reads it."""

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        _, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        module, tensor_name = get_module_from_name(model, full_layer_name)
        config = self.hf_quantizer.quantization_config.quant_config
        if expert_projection_names(module) is not None:
            # The other projection may not be read yet: quantize this one alone; the module gets its
            # MXFP4 class once loading is done (_process_model_after_weight_loading).
            _quantize_expert_projection(module, tensor_name, value, config)
        else:
            module._parameters[tensor_name] = torch.nn.Parameter(value, requires_grad=False)
            _quantize_module(module, config)
            _mark_loaded(module)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class MXFP4Deserialize(_QuantizerOp):
    """Rebuild a :class:`RotatedMXFP4Tensor` from its stored parts; pass the model's other ``weight``s through."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        checkpoint = self.hf_quantizer.checkpoint
        stored = _stored_name(checkpoint, model, full_layer_name)
        # Keyed by our converter's source patterns ("weight$", "weight_mxfp4_scale$"): back to the names.
        parts = {k.removesuffix("$"): (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
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
        set_linear_repr(module)
        param = torch.nn.Parameter(weight, requires_grad=False)
        param._is_hf_initialized = True
        return {full_layer_name: param}
