"""Per-channel smoothing folded into the model before MXFP4 quantization (SmoothQuant, arXiv 2211.10438).

A linear ``y = x W^T`` computes the same with ``x / s`` and ``W diag(s)`` for any ``s > 0`` per input
channel. Where ``x`` comes from something with a per-channel scale of its own, ``x / s`` costs nothing
at run time: it is folded into that producer. Per decoder layer (:func:`smoothing_groups`):

- the attention input: ``input_layernorm``'s scale ``c + w`` becomes ``(c + w) / s`` (Gemma ``c = 1``,
  else 0), q/k/v (or Phi-3's ``qkv_proj``) take ``W diag(s)``;
- the MLP input: ``post_attention_layernorm`` likewise, gate/up (or ``gate_up_proj``) take ``W diag(s)``;
- the ``down_proj`` input ``act(gate) * up``: up_proj's rows (and bias) are divided by ``s``, which
  divides the product channel by channel.

``s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)`` (over the calibration tokens and the group's
linears), divided by its geometric mean. Why it helps MXFP4 W4A4 with a block rotation: a massive
input channel sets the shared exponent of its 32-block (after a block Hadamard, of all 32 rotated
values) and buries the other 31 channels under the FP4 step; dividing it by ``s_j`` moves part of that
range into ``W``'s column, whose quantization error GPTQ then corrects. Measured in docs/results.md.

With a quantization ``config`` and a grid of alphas, :func:`smooth_model` chooses alpha per group
instead (the grid search of AWQ, arXiv 2306.00978, with SmoothQuant's scales): the one minimising
``sum_readers ||Q(W diag(s)) applied to Q(x / s) - W x||^2`` on a subsample of the group's calibration
inputs, where ``Q`` is what ``config`` does to the linear (its rotation, weight and activation MXFP4).
The groups' inputs are independent (smoothing keeps the full-precision function, so every group's
inputs are those of the original model), so one pass over the calibration data serves them all. One
approximation: the MLP group is judged with up_proj's rows as they are before the down_proj group
divides them by its own ``s`` (a factor per row: it changes only how those rows round to MXFP4).

The full-precision model computes the same function after smoothing, up to float rounding.
"""

import copy
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization import quantize_

from ..architectures import check_supported, decoder_layers
from ..rotation.fusion import attention_readers, mlp_readers, norm_weight_offset
from .data import check_calibration_ids, check_real

__all__ = [
    "DEFAULT_SMOOTHING_ALPHA", "SMOOTHING_ALPHA_GRID", "smooth_model", "smoothed_group_error", "smoothing_groups",
    "smoothing_scales",
]

logger = logging.getLogger(__name__)

# SmoothQuant's default migration strength; 0.5 measured best on SmolLM2-135M (docs/results.md).
DEFAULT_SMOOTHING_ALPHA = 0.5
# The per-group search's alphas (alpha 0 still moves range: s = 1 / max|W_:j|).
SMOOTHING_ALPHA_GRID = tuple(i / 10 for i in range(11))
# Calibration tokens per group the search measures its error on (spread evenly over the calibration set).
SEARCH_TOKENS = 2048


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)`` in float64, divided by its geometric mean (so
    smoothing moves range between channels, not overall). Channels that are zero on either side get 1."""
    x = x_absmax.to(torch.float64)
    w = w_absmax.to(torch.float64)
    live = (x > 0) & (w > 0)
    s = torch.ones_like(x)
    s[live] = x[live].pow(alpha) / w[live].pow(1 - alpha)
    if live.any():
        s[live] /= s[live].log().mean().exp()
    return s


def _up_rows(mlp: torch.nn.Module) -> Tuple[torch.nn.Linear, slice]:
    """The linear computing ``up`` in ``act(gate) * up`` and its rows: all of ``up_proj``, or the second
    half of Phi-3's ``gate_up_proj`` (rows ``gate | up``)."""
    fused = getattr(mlp, "gate_up_proj", None)
    if fused is None:
        return mlp.up_proj, slice(0, mlp.up_proj.out_features)
    half = fused.out_features // 2
    return fused, slice(half, fused.out_features)


def smoothing_groups(layer: torch.nn.Module) -> List[Tuple[str, List[torch.nn.Linear], object]]:
    """``(name, readers, producer)`` of one decoder layer: the linears reading one input, and what
    produces it (an RMSNorm, or ``(up linear, rows)`` for ``down_proj``)."""
    return [
        ("attention", attention_readers(layer.self_attn), layer.input_layernorm),
        ("mlp", mlp_readers(layer.mlp), layer.post_attention_layernorm),
        ("down_proj", [layer.mlp.down_proj], _up_rows(layer.mlp)),
    ]


@torch.no_grad()
def _fold(readers: List[torch.nn.Linear], producer, s: torch.Tensor, offset: float) -> None:
    for lin in readers:
        lin.weight.copy_((lin.weight.to(torch.float64) * s).to(lin.weight.dtype))
    if isinstance(producer, tuple):
        lin, rows = producer
        lin.weight[rows] = (lin.weight[rows].to(torch.float64) / s[:, None]).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias[rows] = (lin.bias[rows].to(torch.float64) / s).to(lin.bias.dtype)
    else:
        w = producer.weight
        w.copy_(((offset + w.to(torch.float64)) / s - offset).to(w.dtype))


@torch.no_grad()
def smoothed_group_error(readers: List[torch.nn.Linear], x: torch.Tensor, s: torch.Tensor, config: AOBaseConfig) -> float:
    """``sum_readers ||Q_s(x / s) - lin(x)||^2``: the output error of the group's linears when their
    input is divided by ``s`` and their weight columns multiplied by it, then quantized by ``config``
    (``quantize_`` of a copy: the same rotation, scale rules and activation quantization the method uses)."""
    x = x.to(torch.float32)
    xs = (x.to(torch.float64) / s).to(torch.float32)
    error = 0.0
    for lin in readers:
        quantized = torch.nn.Sequential(copy.deepcopy(lin))
        quantized[0].weight.copy_((lin.weight.to(torch.float64) * s).to(lin.weight.dtype))
        quantize_(quantized, config)
        bias = None if lin.bias is None else lin.bias.float()
        reference = torch.nn.functional.linear(x, lin.weight.float(), bias).to(torch.float64)
        error += float((quantized(xs.to(lin.weight.dtype)).to(torch.float64) - reference).pow(2).sum())
    return error


@torch.no_grad()
def smooth_model(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    alpha: Union[float, Sequence[float]] = DEFAULT_SMOOTHING_ALPHA,
    config: Optional[AOBaseConfig] = None,
) -> Dict[str, Tuple[float, torch.Tensor]]:
    """Fold SmoothQuant scales (module docstring) into every decoder layer of ``model`` in place, from
    the per-channel maxima of the linears' inputs on ``calib_ids [n, L]`` (one forward pass of the
    full-precision model per sample). ``alpha``: one migration strength for every group, or a grid
    (e.g. :data:`SMOOTHING_ALPHA_GRID`) searched per group for the least output error under the
    quantization ``config`` (required then). Returns ``{fqn of the group's first linear: (alpha, s)}``.

    Supported: the decoders whose norms feed only linears (:func:`~torchao_mx_ext.architectures.check_supported`);
    others (MoE, Gemma 2/3) are refused before anything changes."""
    try:
        check_supported(model)
    except NotImplementedError as e:  # the same layouts as model-level rotation fusion: say so for smoothing
        raise NotImplementedError(f"smoothing folds into the decoder's norms like model-level rotation: {e}") from None
    search = not isinstance(alpha, (int, float, torch.Tensor))
    if search:
        alphas = [check_real(a, "alpha", low=0, high=1) for a in alpha]
        if not alphas:
            raise ValueError("alpha: an empty grid")
        if not isinstance(config, AOBaseConfig):
            raise TypeError(f"searching alpha over a grid needs the quantization config it is judged by, got config={config!r}")
    else:
        if config is not None:
            raise ValueError("config judges a grid of alphas; with one alpha it would be ignored: pass a grid or no config")
        alphas = [check_real(alpha, "alpha", low=0, high=1)]
    calib_ids = check_calibration_ids(model, calib_ids, "smooth_model")
    layers = decoder_layers(model, "smoothing")
    groups = [smoothing_groups(layer) for layer in layers]
    maxima: Dict[Tuple[int, str], torch.Tensor] = {}
    samples: Dict[Tuple[int, str], List[torch.Tensor]] = {}
    step = max(1, calib_ids.numel() // SEARCH_TOKENS)  # every step-th token: spread over the calibration set
    hooks = []
    for i, layer_groups in enumerate(groups):
        for name, readers, _ in layer_groups:
            def hook(module, args, key=(i, name)):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                m = x.abs().amax(0).to(torch.float64)
                maxima[key] = m if key not in maxima else torch.maximum(maxima[key], m)
                if search:
                    samples.setdefault(key, []).append(x[::step].clone())

            hooks.append(readers[0].register_forward_pre_hook(hook))
    try:
        for ids in calib_ids:
            model(ids.unsqueeze(0), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    offset = norm_weight_offset(model)
    names = {m: n for n, m in model.named_modules()}
    chosen = {}
    for i, layer_groups in enumerate(groups):
        for name, readers, producer in layer_groups:
            w_absmax = torch.cat([lin.weight.detach().to(torch.float64) for lin in readers]).abs().amax(0)
            candidates = [(a, smoothing_scales(maxima[(i, name)], w_absmax, a)) for a in alphas]
            if search:
                x = torch.cat(samples.pop((i, name)))
                errors = [smoothed_group_error(readers, x, s, config) for _, s in candidates]
                best, s = candidates[min(range(len(errors)), key=errors.__getitem__)]
            else:
                best, s = candidates[0]
            _fold(readers, producer, s, offset)
            chosen[names[readers[0]]] = (best, s)
    if search:
        picked = [a for a, _ in chosen.values()]
        logger.info("smoothing alpha per group (searched over %s): %s", alphas, {a: picked.count(a) for a in sorted(set(picked))})
    return chosen
