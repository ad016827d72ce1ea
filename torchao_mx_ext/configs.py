"""``quantize_`` configs and their handlers: the entry points from a model to the tensor subclasses.

    quantize_(model, MXFP4Config())                         # RTN W4A4 MXFP4
    quantize_(model, MXFP4Config(act_quant=False))          # weight-only
    quantize_(model, MXFP4BlockRotConfig())                 # block Hadamard (32) + W4A4
    quantize_(model, MXFP4BlockRotConfig(rotation_size=None, rotation="random_hadamard"))  # global

Each handler swaps ``module.weight`` for a :class:`RotatedMXFP4Tensor`; the linear itself is unchanged.
"""

import functools
import logging
import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torchao.core.config import ALLOWED_AO_MODULES, AOBaseConfig
from torchao.quantization import quantize_
from torchao.quantization.transform_module import register_quantize_module_handler

from .architectures import expert_projection_names, high_precision_modules
from .kernels import check_kernel_preference
from .mx import check_scale_rule
from .rotation import check_rotation, rotation_block
from .tensors import RotatedMXFP4Tensor, check_weight, padded_width

logger = logging.getLogger(__name__)

# The rule with the lowest W4A4 perplexity in `torchao-mx compare --scale-rule all` (docs/results.md).
DEFAULT_SCALE_RULE = "mse"


@dataclass
class MXFP4Config(AOBaseConfig):
    """W4A4 (or weight-only) MXFP4 for every ``nn.Linear`` that ``quantize_`` visits.

    Args:
        block_size: elements per shared E8M0 scale (OCP MX: 32).
        scale_rule: weight scale rule: ``floor`` (OCP), ``even``, ``rceil``, ``fp_quant``, ``mse``.
        act_quant: quantize activations online too (W4A4); ``False`` = weight-only.
        act_scale_rule: activation scale rule (default: ``scale_rule``).
        rotation: ``identity``, ``hadamard`` or ``random_hadamard`` (seeded by ``seed``).
        rotation_size: width of the diagonal blocks of ``R``; ``None`` = the full (padded) input width.
        seed: seed of ``random_hadamard`` signs (and of the random orthogonal fallback).
        kernel_preference: which kernel the linears use: ``auto`` (the CPU dequant-GEMV for small
            batches, else the float emulation), ``emulated`` (the reference emulation only) or
            ``hw_mxfp4`` (Blackwell MXFP4 tensor cores where available); stored on each weight and in
            checkpoints (``torchao_mx_ext.kernels``).
    """

    block_size: int = 32
    scale_rule: str = DEFAULT_SCALE_RULE
    act_quant: bool = True
    act_scale_rule: Optional[str] = None
    rotation: str = "identity"
    rotation_size: Optional[int] = 32
    seed: int = 0
    kernel_preference: str = "auto"

    def __post_init__(self):
        if not _is_int(self.block_size) or self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"block_size must be a positive even integer, got {self.block_size!r}")
        if not isinstance(self.act_quant, bool):
            raise TypeError(f"act_quant must be True (W4A4) or False (weight-only), got {self.act_quant!r}")
        if not _is_int(self.seed):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        check_scale_rule(self.scale_rule)
        if self.act_scale_rule is not None:
            check_scale_rule(self.act_scale_rule)
        check_rotation(self.rotation)
        check_kernel_preference(self.kernel_preference)
        if self.rotation_size is not None and (not _is_int(self.rotation_size) or self.rotation_size <= 0):
            raise ValueError(f"rotation_size must be a positive integer or None, got {self.rotation_size!r}")

    @property
    def activation_scale_rule(self) -> Optional[str]:
        if not self.act_quant:
            return None
        return self.act_scale_rule or self.scale_rule


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class MXFP4BlockRotConfig(MXFP4Config):
    """MXFP4 with a Hadamard inside each ``rotation_size``-wide block of the input dimension (BRQ,
    arXiv 2511.04214): weights rotated offline, activations online. ``rotation_size=None`` rotates the
    full width instead (the QuaRot/SpinQuant-style global baseline)."""

    rotation: str = "hadamard"


_REPORTED_PADDING: set = set()


def reset_padding_reports() -> None:
    """Forget which widths were reported, so that the next padding of each width warns again."""
    _REPORTED_PADDING.clear()


def report_padding(width: int, padded: int, what: str = "input") -> None:
    """Warn once per ``(width, padded)`` and process (not once per layer) that inputs of this width are
    zero-padded, and what it costs: padding is exact (the padded columns meet zero activations), but a
    rotation block that does not fit the width can multiply storage and GEMM work."""
    if padded == width or (width, padded) in _REPORTED_PADDING:
        return
    _REPORTED_PADDING.add((width, padded))
    level = logging.WARNING if padded <= 1.5 * width else logging.ERROR
    logger.log(
        level,
        "%s width %d is not a multiple of the MX/rotation block; padding weights and activations with zeros "
        "to %d (exact; %.2fx the storage and GEMM work of those weights); every such layer is padded%s",
        what, width, padded, padded / width,
        "" if level == logging.WARNING else ": choose a rotation_size that divides the width",
    )


def weight_layout(config: MXFP4Config, width: int, device) -> Tuple[int, Optional[torch.Tensor]]:
    """(padded input width, shared float32 rotation block or ``None``) of a linear under ``config``:
    one place decides it, so every handler (RTN, GPTQ) stores weights in the same domain."""
    if config.rotation == "identity":
        return padded_width(width, config.block_size, None), None
    size = config.rotation_size or padded_width(width, config.block_size, None)
    return padded_width(width, config.block_size, size), rotation_block(config.rotation, size, config.seed, device)


def _quantize_linear_weight(module: torch.nn.Module, config: MXFP4Config, parameter_name: str = "weight") -> torch.nn.Module:
    weight = getattr(module, parameter_name, None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no tensor parameter {parameter_name!r} to quantize")
    if isinstance(weight, RotatedMXFP4Tensor):
        raise TypeError(f"{type(module).__name__}.{parameter_name} is already MXFP4-quantized; quantize_ it once")
    width = weight.shape[-1]
    padded, block = weight_layout(config, width, weight.device)
    report_padding(width, padded)
    new_weight = RotatedMXFP4Tensor.from_hp(
        weight.detach(), config.block_size, config.scale_rule, config.activation_scale_rule, block, config.kernel_preference
    )
    setattr(module, parameter_name, torch.nn.Parameter(new_weight, requires_grad=False))
    set_linear_repr(module)
    return module


def set_linear_repr(module: torch.nn.Module) -> None:
    """Show the MXFP4 layout in a quantized linear's repr. A ``partial`` rather than a bound method:
    it pickles by reference to this module's function, so ``torch.save(model)`` round-trips."""
    if isinstance(module, torch.nn.Linear):
        module.extra_repr = functools.partial(linear_extra_repr, module)


def linear_extra_repr(self) -> str:
    w = self.weight
    rot = "none" if w.rotation is None else f"{w.rotation.shape[0]}-block"
    return (
        f"in_features={w.in_features}, out_features={w.shape[0]}, bias={self.bias is not None}, "
        f"mxfp4(scale_rule={w.scale_rule}, act={w.act_scale_rule}, rotation={rot})"
    )


# Quantizers of module kinds that do not take the linear path (``module.weight``): fused MoE experts,
# registered by torchao_mx_ext.moe.experts (their forward lives in the MoE layer).
_MODULE_QUANTIZERS: dict = {}


def register_module_quantizer(kind: str, quantize: Callable) -> None:
    """Let the ``quantize_`` handler of our configs quantize modules of ``kind`` (``"fused_experts"``:
    :func:`~torchao_mx_ext.architectures.expert_projection_names` is not ``None``) with
    ``quantize(module, config)``."""
    _MODULE_QUANTIZERS[kind] = quantize


def _module_quantizer(module: torch.nn.Module) -> Tuple[Tuple[str, ...], Optional[Callable]]:
    """(names of the parameters the handler replaces, the quantizer of its kind or ``None`` for a linear)."""
    names = expert_projection_names(module)
    if names is None:
        return ("weight",), None
    quantize = _MODULE_QUANTIZERS.get("fused_experts")
    if quantize is None:
        raise TypeError(f"{type(module).__name__} is a fused MoE experts module: import torchao_mx_ext.moe to quantize it")
    return names, quantize


def check_quantizable(module: torch.nn.Module, fqn: str = "") -> None:
    """Raise (naming ``fqn``) unless the handler can quantize ``module``: a linear's weight, or the
    weights of a registered module kind (fused experts), finite, floating point, not quantized yet."""
    where = f"{fqn or type(module).__name__}"
    names, quantize = _module_quantizer(module)
    if quantize is not None and getattr(module, "is_transposed", False):
        raise NotImplementedError(f"{where} stores its weights transposed ([E, in, out]); not supported")
    for name in names:
        weight = getattr(module, name, None)
        if isinstance(weight, RotatedMXFP4Tensor):
            raise TypeError(f"{where}.{name} is already MXFP4-quantized; quantize_ it once")
        if weight is None:
            raise TypeError(f"{where} has no tensor parameter {name!r}: MXFP4 configs quantize linear weights and fused MoE experts")
        check_weight(weight, 2 if quantize is None else 3, f"{where}.{name}")


def _check_every_target_first(config: MXFP4Config) -> None:
    """Inside ``torchao.quantization.quantize_(model, config, filter_fn)``: check every module the call
    will hand to our handler before the first one changes, so a bad weight anywhere (a NaN in the last
    layer) raises with the model untouched instead of half quantized. torchao calls the handler module
    by module and has no such hook, so the call's ``model`` and ``filter_fn`` are read from its frame;
    elsewhere (e.g. ``FqnToConfig``, or a direct call) each module is checked just before it changes."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _QUANTIZE_CODE:
        frame = frame.f_back
    if frame is None:
        return
    model, filter_fn = frame.f_locals.get("model"), frame.f_locals.get("filter_fn")
    if frame.f_locals.get("config") is not config or not isinstance(model, torch.nn.Module) or filter_fn is None:
        return
    global _CHECKED_CALL
    key = (id(frame), id(config))
    if _CHECKED_CALL is not None and _CHECKED_CALL[0] == key and _CHECKED_CALL[1]() is model:
        return
    errors = []
    for fqn, module in model.named_modules():
        if filter_fn(module, fqn):
            try:
                check_quantizable(module, fqn)
            except (TypeError, ValueError, NotImplementedError) as e:
                errors.append(e)
    if errors:
        more = f" (and {len(errors) - 1} more: {'; '.join(str(e) for e in errors[1:4])})" if len(errors) > 1 else ""
        raise type(errors[0])(f"{errors[0]}{more}; quantize_ changed nothing")
    _CHECKED_CALL = (key, weakref.ref(model))


_QUANTIZE_CODE = quantize_.__code__
_CHECKED_CALL = None  # ((frame id, config id), weakref to the model) of the quantize_ call checked last


def _quantize_module(module: torch.nn.Module, config: MXFP4Config, *, parameter_name: str = "weight") -> torch.nn.Module:
    """The ``quantize_`` handler: a linear's ``weight`` (or ``parameter_name``, as torchao's
    ``FqnToConfig`` passes it), or a module with its own registered quantizer (fused MoE experts)."""
    _check_every_target_first(config)
    _, quantize = _module_quantizer(module)
    if quantize is not None:
        check_quantizable(module)
        return quantize(module, config)
    if parameter_name == "weight":
        check_quantizable(module)
    return _quantize_linear_weight(module, config, parameter_name)


# torchao's config_from_dict resolves class names only in an allow-list of modules: add our package's
# root (which exports every config), so our configs round-trip like torchao's own.
ALLOWED_AO_MODULES.add("torchao_mx_ext")

# torchao looks handlers up by exact config type, so each config class is registered.
register_quantize_module_handler(MXFP4Config)(_quantize_module)
register_quantize_module_handler(MXFP4BlockRotConfig)(_quantize_module)


# -- whole models -------------------------------------------------------------------------------

ConfigFor = Callable[[str], Optional[MXFP4Config]]  # a module's short name -> its config (None: skip it)


def as_config_for(config: Union[MXFP4Config, ConfigFor]) -> ConfigFor:
    return (lambda _: config) if isinstance(config, MXFP4Config) else config


def is_quantizable(module: torch.nn.Module) -> bool:
    """A module our handler quantizes and that is not quantized yet: a non-empty ``nn.Linear`` (a
    zero-width one, e.g. a MoEfied model's empty shared expert, has nothing to store) or a registered
    module kind (fused MoE experts)."""
    names, quantize = _module_quantizer(module)
    if quantize is not None:
        return not any(isinstance(getattr(module, n, None), RotatedMXFP4Tensor) for n in names)
    return (
        isinstance(module, torch.nn.Linear)
        and not isinstance(module.weight, RotatedMXFP4Tensor)
        and module.weight.numel() > 0
    )


def quantizable_filter(model: torch.nn.Module) -> Callable[[torch.nn.Module, str], bool]:
    """The ``quantize_`` filter of every recipe: :func:`is_quantizable` modules outside
    :func:`~torchao_mx_ext.architectures.high_precision_modules` (the output head, keep-in-fp32 modules)."""
    keep = high_precision_modules(model)
    return lambda module, fqn: fqn not in keep and is_quantizable(module)


def quantize_linears(model: torch.nn.Module, config: Union[MXFP4Config, ConfigFor]) -> torch.nn.Module:
    """RTN-``quantize_`` every module :func:`quantizable_filter` selects (every linear but the output
    head, and every fused MoE experts module) with ``config``, or ``config(short name)`` per module."""
    config_for = as_config_for(config)
    wanted = quantizable_filter(model)
    chosen = {}
    for fqn, module in model.named_modules():
        if wanted(module, fqn):
            cfg = config_for(fqn.rpartition(".")[2])
            if cfg is not None:
                chosen.setdefault(id(cfg), (cfg, set()))[1].add(fqn)
    for cfg, names in chosen.values():
        quantize_(model, cfg, filter_fn=lambda m, fqn, names=names: fqn in names)
    return model
