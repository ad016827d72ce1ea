"""Whole-model quantization methods, by name: what ``torchao-mx compare`` runs.

Every method quantizes all ``nn.Linear`` layers except ``lm_head`` (W4A4 recipes keep it in high
precision), and the fused 3-D experts of MoE models, to MXFP4; they differ in the rotations around the quantizers and in how weights are
rounded (RTN, or GPTQ calibrated layer by layer):

- ``rtn``: no rotation.
- ``block-rot``: per-linear 32-wide block Hadamard (BRQ per linear; ``MXFP4BlockRotConfig``).
- ``global-rot``: per-linear full-width randomised Hadamard (seeded).
- ``quarot``: model-level QuaRot: norms folded, full-width randomised Hadamard R1 on the residual,
  per-head randomised Hadamard R2, online full-width Hadamard R4 before down_proj (seeded).
- ``brq``: the same with every rotation block-diagonal, 32 wide (deterministic).
- ``dartquant``: QuaRot's structure with R1 and per-layer R2 learned by DartQuant (whip loss,
  QR-Orth) from calibration activations; ``dartquant-block``: learned block-diagonal (32-wide) R1/R2
  with block R4 (new: DartQuant was published for INT formats and full-width rotations).
- ``mxrot-block``: ``dartquant-block``'s structure with R1/R2 learned on the MXFP4 quantize-dequantize
  error of the rotated activations instead of the whip loss (MX-aware; new here).
- ``gptq``, ``gptq-block-rot``, ``quarot+gptq``, ``brq+gptq``, ``dartquant-block+gptq``,
  ``mxrot-block+gptq``: the same rotations, GPTQ weights (sequential, layer by layer).
- ``gptq-block-rot+exp-search``: ``gptq-block-rot`` whose groups each take the E8M0 exponent among
  ``{e - 1, e, e + 1}`` with the smallest Hessian-weighted error before the GPTQ loop (``mse_shrink``,
  :mod:`torchao_mx_ext.calibration.gptq`; MR-GPTQ's per-group scale search).
- ``gptaq``, ``gptaq-block-rot``, ``brq+gptaq``: GPTQ with asymmetric calibration (GPTAQ): each linear
  fitted to the full-precision model's output from what it really consumes (drifted, MXFP4-quantized
  inputs), :mod:`torchao_mx_ext.calibration.gptq`.
- ``smooth+block-rot``, ``smooth+gptq-block-rot``, ``smooth+gptaq-block-rot``: SmoothQuant's per-channel
  scales (alpha 0.5, from the calibration data) folded into the norms and up_proj first
  (:mod:`torchao_mx_ext.calibration.smoothing`), then the same method. ``smooth+gptaq-block-rot`` is
  the W4A4 default (:data:`DEFAULT_METHOD`). ``smooth-search+block-rot``, ``smooth-search+gptaq-block-rot``:
  alpha chosen per group from a grid by the block-rot W4A4 output error (AWQ's search).
"""

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .calibration.data import check_bool, check_int, check_real
from .calibration.sequential import sequential_gptq
from .calibration.smoothing import SMOOTHING_ALPHA_GRID, smooth_model
from .configs import (
    ConfigFor, MXFP4BlockRotConfig, MXFP4Config, as_config_for, is_quantizable, quantizable_filter, quantize_linears,
)
from .rotation.fusion import block_diagonal, check_supported, fuse_rotations, head_dim_of

__all__ = [
    "DEFAULT_METHOD", "DEFAULT_PER_LINEAR_METHOD", "DEFAULT_WEIGHT_ONLY_METHOD", "METHODS", "Method", "default_method", "QuantSettings", "is_quantizable_linear", "quantizable_filter", "quantize_linears",
    "quantize_model",
]

logger = logging.getLogger(__name__)


def is_quantizable_linear(module: torch.nn.Module, fqn: str) -> bool:
    """Deprecated: ``quantizable_filter(model)``, the same rule with the model's own output head and
    keep-in-fp32 modules where this one knows only the name ``lm_head``."""
    warnings.warn("is_quantizable_linear is deprecated; use quantizable_filter(model)", DeprecationWarning, stacklevel=2)
    return is_quantizable(module) and fqn.rpartition(".")[2] != "lm_head"


@dataclass(frozen=True)
class QuantSettings:
    scale_rule: str
    act_scale_rule: Optional[str] = None
    weight_only: bool = False
    seed: int = 0
    calib_ids: Optional[torch.Tensor] = None  # [n, L] token ids, for calibrated methods
    gptaq_alpha: float = 0.25  # fraction of GPTAQ's asymmetric correction (MXFP4GPTQConfig.asymmetric_alpha)

    def config(self, cls=MXFP4Config, **kw) -> MXFP4Config:
        return cls(scale_rule=self.scale_rule, act_scale_rule=self.act_scale_rule, act_quant=not self.weight_only, **kw)


def _fuse_model_rotation(model, s: QuantSettings, block: Optional[int], name: str) -> ConfigFor:
    """Fuse R1/R2 (QuaRot: full width, BRQ: 32-wide blocks); return the per-linear configs, with
    R4 as an online Hadamard on down_proj's input (full width for QuaRot, 32-wide blocks for BRQ)."""
    check_supported(model)
    r1 = block_diagonal(name, model.config.hidden_size, block, s.seed)
    r2 = block_diagonal(name, head_dim_of(model), block, s.seed + 1)
    return _fuse_with_online_r4(model, s, r1, r2, block)


def _fuse_with_online_r4(model, s: QuantSettings, r1, r2, block: Optional[int]) -> ConfigFor:
    """Fuse R1/R2 and return the per-linear configs: R4 is an online Hadamard on down_proj's input
    (``block`` wide, full width for ``None``); every other linear reads already-rotated inputs."""
    fuse_rotations(model, r1, r2)
    r4 = s.config(MXFP4BlockRotConfig, rotation="hadamard", rotation_size=block)
    plain = s.config()
    return lambda short: r4 if short == "down_proj" else plain


def _fuse_learned_rotation(model, s: QuantSettings, block: Optional[int], loss: str = "whip") -> ConfigFor:
    """DartQuant: learn R1/R2 on the calibration activations (``loss="mxfp4"``: on their MXFP4 error under
    the activations' scale rule), fuse them, R4 online as above."""
    from .calibration.dartquant import learn_rotations

    check_supported(model)
    if s.calib_ids is None:
        raise ValueError("DartQuant needs calibration data (QuantSettings.calib_ids)")
    r1, r2, _ = learn_rotations(model, s.calib_ids, block=block, seed=s.seed, loss=loss,
                                scale_rule=s.act_scale_rule or s.scale_rule)
    return _fuse_with_online_r4(model, s, r1, r2, block)


def _per_linear(s: QuantSettings, kind: str) -> MXFP4Config:
    if kind == "rtn":
        return s.config()
    if kind == "block-rot":
        return s.config(MXFP4BlockRotConfig)
    return s.config(MXFP4BlockRotConfig, rotation="random_hadamard", rotation_size=None, seed=s.seed)


def _gptq(model, s: QuantSettings, config: Union[MXFP4Config, ConfigFor], asymmetric: bool = False,
          exponent_search: bool = False):
    if s.calib_ids is None:
        raise ValueError("GPTQ methods need calibration data (QuantSettings.calib_ids)")
    extra = {"asymmetric_alpha": s.gptaq_alpha} if asymmetric else {}
    return sequential_gptq(model, s.calib_ids, as_config_for(config), asymmetric=asymmetric, mse_shrink=exponent_search, **extra)


def _make(kind: str, gptq: bool, asymmetric: bool = False, exponent_search: bool = False, smooth: str = "") -> Callable:
    """``smooth``: "" (none), "smooth" (alpha 0.5) or "smooth-search" (alpha per group, judged by the
    per-linear config the method quantizes with)."""
    def apply(model, s: QuantSettings):
        if smooth:
            if s.calib_ids is None:
                raise ValueError("smoothing needs calibration data (QuantSettings.calib_ids)")
            if smooth == "smooth-search":
                smooth_model(model, s.calib_ids, SMOOTHING_ALPHA_GRID, config=_per_linear(s, kind))
            else:
                smooth_model(model, s.calib_ids)
        if kind in ("quarot", "brq"):
            config = _fuse_model_rotation(model, s, None if kind == "quarot" else 32, "random_hadamard" if kind == "quarot" else "hadamard")
        elif kind in ("dartquant", "dartquant-block", "mxrot-block"):
            config = _fuse_learned_rotation(model, s, None if kind == "dartquant" else 32,
                                            "mxfp4" if kind == "mxrot-block" else "whip")
        else:
            config = _per_linear(s, kind)
        return _gptq(model, s, config, asymmetric, exponent_search) if gptq else quantize_linears(model, config)

    apply.__name__ = f"{smooth + '+' if smooth else ''}{kind}{('+gptaq' if asymmetric else '+gptq') if gptq else ''}{'+exp-search' if exponent_search else ''}"
    return apply


@dataclass(frozen=True)
class Method:
    apply: Optional[Callable]  # None: the unquantized model
    seeded: bool = False  # has a random component: run per seed, report mean and spread
    calibrated: bool = False  # needs calibration data
    asymmetric: bool = False  # GPTAQ: QuantSettings.gptaq_alpha applies


METHODS = {
    "fp": Method(None),
    "rtn": Method(_make("rtn", False)),
    "block-rot": Method(_make("block-rot", False)),
    "global-rot": Method(_make("global-rot", False), seeded=True),
    "quarot": Method(_make("quarot", False), seeded=True),
    "brq": Method(_make("brq", False)),
    "gptq": Method(_make("rtn", True), calibrated=True),
    "gptq-block-rot": Method(_make("block-rot", True), calibrated=True),
    "gptq-block-rot+exp-search": Method(_make("block-rot", True, exponent_search=True), calibrated=True),
    "quarot+gptq": Method(_make("quarot", True), seeded=True, calibrated=True),
    "brq+gptq": Method(_make("brq", True), calibrated=True),
    "dartquant": Method(_make("dartquant", False), seeded=True, calibrated=True),
    "dartquant-block": Method(_make("dartquant-block", False), seeded=True, calibrated=True),
    "dartquant-block+gptq": Method(_make("dartquant-block", True), seeded=True, calibrated=True),
    "mxrot-block": Method(_make("mxrot-block", False), seeded=True, calibrated=True),
    "mxrot-block+gptq": Method(_make("mxrot-block", True), seeded=True, calibrated=True),
    "gptaq": Method(_make("rtn", True, asymmetric=True), calibrated=True, asymmetric=True),
    "gptaq-block-rot": Method(_make("block-rot", True, asymmetric=True), calibrated=True, asymmetric=True),
    "brq+gptaq": Method(_make("brq", True, asymmetric=True), calibrated=True, asymmetric=True),
    "smooth+block-rot": Method(_make("block-rot", False, smooth="smooth"), calibrated=True),
    "smooth+gptq-block-rot": Method(_make("block-rot", True, smooth="smooth"), calibrated=True),
    "smooth+gptaq-block-rot": Method(_make("block-rot", True, asymmetric=True, smooth="smooth"), calibrated=True, asymmetric=True),
    "smooth-search+block-rot": Method(_make("block-rot", False, smooth="smooth-search"), calibrated=True),
    "smooth-search+gptaq-block-rot": Method(
        _make("block-rot", True, asymmetric=True, smooth="smooth-search"), calibrated=True, asymmetric=True,
    ),
}

# The methods that measure best on the full protocol (docs/results.md, "Accuracy methods" for W4A4,
# "Weight-only MXFP4" for weight-only): what quantize_model runs unless told otherwise. Smoothing folds
# into the decoder's norms, which only the layouts of architectures.SUPPORTED_ARCHITECTURES allow; any
# other model gets the best per-linear method.
DEFAULT_METHOD = "smooth+gptaq-block-rot"
DEFAULT_PER_LINEAR_METHOD = "gptaq-block-rot"
DEFAULT_WEIGHT_ONLY_METHOD = "gptaq-block-rot"


def default_method(weight_only: bool = False, model: Optional[torch.nn.Module] = None) -> str:
    """The best measured method for weight-only (:data:`DEFAULT_WEIGHT_ONLY_METHOD`) or W4A4 MXFP4:
    :data:`DEFAULT_METHOD`, or :data:`DEFAULT_PER_LINEAR_METHOD` (with one log line saying why) for a
    ``model`` whose layout smoothing cannot fold into."""
    if weight_only:
        return DEFAULT_WEIGHT_ONLY_METHOD
    if model is not None:
        try:
            check_supported(model)
        except NotImplementedError:
            logger.warning(
                "%s: smoothing cannot fold into %s's layout; default method %s", DEFAULT_METHOD,
                type(model).__name__, DEFAULT_PER_LINEAR_METHOD,
            )
            return DEFAULT_PER_LINEAR_METHOD
    return DEFAULT_METHOD


def quantize_model(
    model: torch.nn.Module,
    calib_ids: Optional[torch.Tensor] = None,
    method: Optional[str] = None,
    scale_rule: str = "mse",
    weight_only: bool = False,
    act_scale_rule: Optional[str] = None,
    seed: int = 0,
    gptaq_alpha: float = 0.25,
) -> torch.nn.Module:
    """Quantize ``model`` in place with a named method of :data:`METHODS` (default: the best measured,
    :func:`default_method` of ``weight_only``) and return it: the one-line recipe ::

        calib = calibration_ids(tokenizer, "wikitext2", 32, 2048)   # torchao_mx_ext.calibration.data
        tme.quantize_model(model, calib)                             # W4A4: DEFAULT_METHOD
        tme.quantize_model(model, calib, weight_only=True)           # weight-only: DEFAULT_WEIGHT_ONLY_METHOD

    ``calib_ids [n, L]``: token ids for calibrated methods (checked by the method: in the model's
    vocabulary, ``L`` within its positions); ``weight_only``: MXFP4 weights, activations unquantized.
    ``gptaq_alpha``: the fraction of GPTAQ's asymmetric correction the ``gptaq*`` methods apply
    (:class:`~.calibration.gptq.MXFP4GPTQConfig`'s ``asymmetric_alpha``; 0.25 as in the authors' code).
    Calibration cost of the default on SmolLM2-135M with 32 x 2048 tokens: docs/results.md.
    """
    check_bool(weight_only, "weight_only")
    method = default_method(weight_only, model) if method is None else method
    if method not in METHODS or METHODS[method].apply is None:
        raise ValueError(f"method must be one of {sorted(m for m, s in METHODS.items() if s.apply is not None)}, got {method!r}")
    if METHODS[method].calibrated and calib_ids is None:
        raise ValueError(f"{method} is calibrated: pass calib_ids (e.g. torchao_mx_ext.calibration.data.calibration_ids)")
    check_int(seed, "seed", 0)
    check_real(gptaq_alpha, "gptaq_alpha", low=0, high=1)
    settings = QuantSettings(scale_rule, act_scale_rule, weight_only, seed, calib_ids, gptaq_alpha)
    settings.config()  # the rules checked before anything (a model-level rotation) changes the model
    METHODS[method].apply(model, settings)
    return model
