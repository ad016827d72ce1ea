"""GPTQ for MXFP4 weights, the MR-GPTQ recipe (Egiazarian et al., arXiv 2509.23202).

GPTQ (Frantar et al., arXiv 2210.17323) quantizes a linear weight ``W`` (``N x K``) column by
column so as to minimise the layer's output error on calibration inputs ``X`` (``n x K``)::

    min_Q || X W^T - X Q^T ||^2  =  min_Q  tr((W - Q) H (W - Q)^T) / 2,     H = 2/n X^T X.

After rounding column ``j`` to ``q_j``, the Optimal Brain Surgeon update moves the not yet
quantized columns ``F`` to compensate::

    delta_F = -(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j,F},      H_F^-1 <- H_F^-1 without j (elimination)

and the rows of the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) are exactly those
successively eliminated rows scaled by ``1/sqrt([H_F^-1]_jj)``, so the update is
``W[:, j:] -= ((w_j - q_j) / U_jj) U_{j, j:}``. Updates are applied lazily: inside a block of
``column_block`` columns immediately, to the columns after the block once per block as one matmul.

MXFP4 specifics (MR-GPTQ):

- static groups: every 32-element group's E8M0 exponent is chosen once, from the full weight, with
  the configured scale rule (``floor``, ``even``, ``rceil``, ``fp_quant``, ``mse``), before the column
  loop; the loop only rounds elements (E2M1, round half to even, saturating at 6) onto those scales.
- static act-order: columns are processed by decreasing ``diag(H)``, each keeping the scale of its
  original group, so the stored layout is plain MXFP4 and inference needs no permutation index.
- optional ``mse_shrink``: per group, the exponent among ``{e - 1, e, e + 1}`` (``e`` the rule's)
  minimising the group's Hessian-weighted error ``(w_g - q_g) H_gg (w_g - q_g)^T``.
- weight and Hessian live in the rotated, zero-padded domain the weight is stored in (``W R`` and
  ``H = 2/n (X R)^T (X R)``), so the result is a :class:`RotatedMXFP4Tensor` payload.

:class:`MXFP4GPTQConfig` wires this into torchao's ``quantize_`` as prepare (observe inputs) -> calibrate
(run forward passes) -> convert (run GPTQ, install :class:`RotatedMXFP4Tensor` weights)::

    quantize_(model, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(), step="prepare"))
    for batch in calibration_batches:
        model(batch)
    quantize_(model, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(), step="convert"))

This module holds the algorithm, the observer, the config and the linear steps
(:func:`prepare_linear`, :func:`convert_linear`); the ``quantize_`` handler that dispatches a module to
them or to the fused-experts steps is :mod:`.gptq_handler`, registered when the
``torchao_mx_ext.calibration`` package is imported (which any import of this module does first).

All layers observe the full-precision model's inputs (one pass). The paper's sequential variant (each
layer calibrated on the outputs of the already quantized layers before it) is the per-layer driver
:func:`torchao_mx_ext.calibration.sequential.sequential_gptq` on top of this.

Asymmetric calibration (``asymmetric=True``; GPTAQ, Li et al., ICML 2025, arXiv 2504.02692): plain GPTQ fits the
quantized layer to its *own* full-precision output on the inputs it sees, ``X~ W^T``. The asymmetric
objective fits it to the *reference* output instead, ``min_Q || X~_q Q^T - X W^T ||^2``, where ``X~_q``
is what the quantized linear really consumes (its input rotated and, for W4A4, MXFP4-quantized) and
``X`` the reference input (the full-precision model's, when :func:`~.sequential.sequential_gptq`
runs a full-precision stream beside the quantized one; else the same rows unquantized). With
``H = 2/n X~_q^T X~_q`` and ``C = 2/n X~_q^T X`` the objective equals, up to a constant,
``|| X~_q (Q - W*)^T ||^2`` with the least-squares target ``W* = W C^T H^-1``, so it is GPTQ of ``W*``
on ``H`` (the same greedy OBS steps, since the two quadratics differ by a constant). The target is
computed as a correction, ``W* = W + W (C - H)^T (H + lambda I)^-1`` (``lambda`` GPTQ's damping): the
ridge solution pulled towards ``W`` (``+ lambda ||V - W||^2``), so the correction vanishes exactly
when ``X~_q = X``. Taking the Hessian on the *quantized* activations (W4A4) is our choice: fitting
through the activation quantizer lets the weights absorb part of its error too, but that fit needs
many calibration rows per input channel to generalise (tests: 8x the width did not, 48x did).

The full least-squares correction ``W* - W`` over-fits: it also "explains" the part of the input drift
``X - X~_q`` that is noise (not predictable from ``X~_q``), and on SmolLM2-135M it reaches 10-20% of
``|W|`` by layer 10 (input drift 16-27%); held-out output errors of o_proj/down_proj then rise above
plain GPTQ's and the perplexity explodes (weight-only 109 vs 23.3). So only ``asymmetric_alpha`` (0.25,
the value the authors' code, GPTQv2 ``fasterquant(alpha=0.25)``, hard-wires) of the correction is
applied: ``W_alpha = W + alpha (W* - W)``.

Fused MoE experts (3-D weights) are GPTQ'd expert by expert through the same config
(``filter_fn=is_fused_experts``): :mod:`.gptq_experts`.

``GPTQConfig`` is the deprecated former name of :class:`MXFP4GPTQConfig` (it clashes with torchao's
own ``torchao.prototype.gptq.GPTQConfig``): it still works, with a ``DeprecationWarning``.
"""

import logging
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import List, Optional, Tuple

import torch
from torchao.core.config import AOBaseConfig
from torchao.utils import TorchAOBaseTensor

from ..configs import MXFP4Config, report_padding, set_linear_repr, weight_layout
from ..mx import check_scale_rule, e2m1_to_code, element_multiplier, mxfp4_fake_quantize, pack_uint4, round_onto_scales
from ..mx.e8m0 import E8M0_MAX_EXP, E8M0_MIN_EXP, exp2_int, exponent_to_e8m0
from ..mx.quantize import quantize_blocks
from ..rotation import pad_and_rotate
from ..tensors import RotatedMXFP4Tensor
from .data import check_bool, check_real

logger = logging.getLogger(__name__)

__all__ = [
    "GPTQConfig",
    "HESSIAN_DTYPES",
    "HessianObserver",
    "asymmetric_target",
    "MXFP4GPTQConfig",
    "OBSERVER_ATTR",
    "convert_linear",
    "gptq_mxfp4",
    "gptq_rotated",
    "prepare_linear",
    "static_group_exponents",
    "warn_dead_channels",
]

# The accepted values of MXFP4GPTQConfig.hessian_dtype / compute_dtype and the dtypes they name.
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Attribute of a prepared module holding its observer (HessianObserver, or ExpertsHessianObserver).
OBSERVER_ATTR = "mxfp4_gptq_observer"


# ---------------------------------------------------------------------------------------------
# the algorithm
# ---------------------------------------------------------------------------------------------
def _group_errors(wb: torch.Tensor, e: torch.Tensor, multiplier: float, h_groups: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-group reconstruction error ``[N, G]`` of blocks ``wb [N, G, B]`` on exponents ``e [N, G]``:
    ``d H_gg d^T`` with ``d = w_g - deq(q_g)`` (plain ``|d|^2`` when ``h_groups`` is None)."""
    q = round_onto_scales(wb, exp2_int(-e).unsqueeze(-1), multiplier)
    d = wb.to(torch.float64) - (q * (exp2_int(e) * multiplier).unsqueeze(-1)).to(torch.float64)
    if h_groups is None:
        return d.square().sum(-1)
    return (torch.einsum("ngi,gij->ngj", d, h_groups) * d).sum(-1)


def static_group_exponents(
    weight: torch.Tensor,
    block_size: int = 32,
    scale_rule: str = "floor",
    mse_shrink: bool = False,
    hessian: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Unbiased int32 E8M0 exponents ``[N, K / block_size]`` fixed before the GPTQ loop.

    The rule's exponent of every group of the (float32-cast) weight, exactly as ``mxfp4_quantize``
    picks it (``mse`` included: it compares ``e`` and ``e + 1`` on the weight itself). With
    ``mse_shrink`` each group then takes the exponent among ``{e - 1, e, e + 1}`` with the smallest
    error ``d H_gg d^T`` (``H_gg`` the group's diagonal block of ``hessian``; plain squared error when
    ``hessian`` is None); ties keep ``e``, then prefer ``e - 1``.
    """
    n, k = weight.shape
    wb = weight.to(torch.float32).reshape(n, k // block_size, block_size)
    _, e, _ = quantize_blocks(wb, scale_rule)
    if not mse_shrink:
        return e
    multiplier = element_multiplier(scale_rule)
    h_groups = None
    if hessian is not None:
        g = k // block_size
        # [G, B, B]: the diagonal blocks H[gB:(g+1)B, gB:(g+1)B]
        h_groups = hessian.to(torch.float64).reshape(g, block_size, g, block_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    best_e = e
    best_err = _group_errors(wb, e, multiplier, h_groups)
    for step in (-1, 1):
        cand = torch.clamp(e + step, E8M0_MIN_EXP, E8M0_MAX_EXP)
        err = _group_errors(wb, cand, multiplier, h_groups)
        better = err < best_err  # strict: ties keep the earlier candidate
        best_e = torch.where(better, cand, best_e)
        best_err = torch.where(better, err, best_err)
    return best_e


def _check_damp(damp, where: str = "") -> float:
    try:
        return check_real(damp, f"{where}damp", low=0)
    except TypeError as e:  # one exception type for every bad damp (None, "0.01", True, nan, -1): ValueError
        raise ValueError(str(e)) from None


def _check_column_block(column_block, where: str = "") -> int:
    if isinstance(column_block, bool) or not isinstance(column_block, int) or column_block <= 0:
        raise ValueError(f"{where}column_block must be a positive integer (>= 1), got {column_block!r}")
    return column_block


def _check_gptq_inputs(
    weight, hessian, block_size, scale_rule, damp, column_block, compute_dtype, act_order, mse_shrink
):
    check_scale_rule(scale_rule)
    if isinstance(weight, TorchAOBaseTensor) or isinstance(hessian, TorchAOBaseTensor):
        raise TypeError("gptq_mxfp4 takes plain high-precision tensors, not quantized tensor subclasses")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even integer, got {block_size!r}")
    _check_column_block(column_block)
    _check_damp(damp)
    check_bool(act_order, "act_order")
    check_bool(mse_shrink, "mse_shrink")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point [N, K] tensor, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if k % block_size:
        raise ValueError(
            f"weight width {k} is not a multiple of block_size {block_size}; pad the weight (and the "
            "Hessian) with zeros to the stored width first"
        )
    if tuple(hessian.shape) != (k, k) or not hessian.is_floating_point():
        raise ValueError(f"hessian must be a floating-point [{k}, {k}] tensor, got {hessian.dtype} {tuple(hessian.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has NaN/Inf values; MXFP4 cannot represent them")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian has NaN/Inf values (overflowing calibration activations?)")


def gptq_mxfp4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    block_size: int = 32,
    scale_rule: str = "floor",
    damp: float = 0.01,
    column_block: int = 128,
    act_order: bool = True,
    mse_shrink: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    name: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize ``weight [N, K]`` to MXFP4 given ``hessian [K, K]`` (``H = 2/n X^T X``).

    Both are in the domain the weight is stored in (rotated, zero-padded; ``K % block_size == 0``).
    Returns ``(qdata uint8 [N, K/2], scale uint8 [N, K/block_size])`` in the layout of
    :func:`torchao_mx_ext.mx.mxfp4_quantize` (two E2M1 codes per byte, biased E8M0 bytes), ready for
    ``RotatedMXFP4Tensor(qdata, scale, block_size, scale_rule, ...)``.

    Steps (see the module docstring for the math):

    1. dead inputs (``H_ii = 0``): ``H_ii = 1``, ``W[:, i] = 0`` (GPTQ); they never contribute;
    2. static group exponents from the whole weight (:func:`static_group_exponents`);
    3. damping ``H += damp * mean(diag H) * I``;
    4. act-order: permute columns by decreasing ``diag(H)`` (stable), scales stay with their groups;
    5. ``U = chol(H^-1)`` (upper, float64), then the lazy-batch GPTQ loop in ``compute_dtype``.

    Each column is rounded with the same float32 arithmetic as ``mxfp4_quantize``, and its error is
    taken against the value inference will use (float32 ``q * 2^e * m``), so with ``H = I`` and no
    act-order the result equals plain RTN on the static scales bit for bit.

    Step 1 is a silent loss when the channel is not dead at inference: a ``logging`` warning gives the
    number of dead channels whose weights were not already zero (``name``: how it names the weight;
    the ``quantize_`` flow warns once per layer instead, naming it).
    """
    qdata, scale, zeroed = _gptq_mxfp4(
        weight, hessian, block_size, scale_rule, damp, column_block, act_order, mse_shrink, compute_dtype
    )
    if zeroed:
        warn_dead_channels(name or f"weight {tuple(weight.shape)}", zeroed, weight.shape[-1])
    return qdata, scale


def warn_dead_channels(name: str, zeroed: int, width: int, detail: str = "") -> None:
    """Log the warning of GPTQ's step 1 (:func:`gptq_mxfp4`): ``zeroed`` of the ``width`` input
    channels of the weight ``name`` saw no calibration signal and lost their nonzero weights
    (``detail``: appended to the count, e.g. how experts were summed)."""
    logger.warning(
        "GPTQ-MXFP4: %s: %d of %d input channels%s saw no calibration signal (zero Hessian diagonal, in the "
        "stored rotated/padded domain); GPTQ set their nonzero weights to zero, so these inputs are ignored "
        "at inference (calibrate on more varied data, or quantize this layer without GPTQ)",
        name, zeroed, width, detail,
    )


def _gptq_mxfp4(weight, hessian, block_size, scale_rule, damp, column_block, act_order, mse_shrink, compute_dtype):
    """:func:`gptq_mxfp4` without the warning: ``(qdata, scale, zeroed)``, ``zeroed`` the number of dead
    input channels (``H_ii = 0``) whose weight column was not all zero before step 1 zeroed it."""
    _check_gptq_inputs(weight, hessian, block_size, scale_rule, damp, column_block, compute_dtype, act_order, mse_shrink)
    device = weight.device
    n, k = weight.shape
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()

    dead = torch.diagonal(h) == 0
    zeroed = int((dead & (w != 0).any(dim=0)).sum())  # padding columns (zero weights) lose nothing
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0

    # Sort key before damping (as GPTQ does; damping adds a constant, the order is the same).
    order_key = torch.diagonal(h).clone()
    h.diagonal().add_(damp * torch.diagonal(h).mean())

    e = static_group_exponents(w, block_size, scale_rule, mse_shrink, h)
    multiplier = element_multiplier(scale_rule)
    inv_scale = exp2_int(-e)  # [N, G] float32, exact powers of two
    deq_scale = exp2_int(e) * multiplier  # float32, as mxfp4_dequantize computes it

    if act_order:
        perm = torch.argsort(order_key, descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = torch.arange(k, device=device)
    col_group: List[int] = (perm // block_size).tolist()

    u = _upper_cholesky_of_inverse(h).to(compute_dtype)
    w = w.to(compute_dtype)
    q_all = torch.empty(n, k, dtype=torch.float32, device=device)  # E2M1 values, permuted order

    for i1 in range(0, k, column_block):
        i2 = min(i1 + column_block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = col_group[i1 + i]
            col = w1[:, i]
            q = round_onto_scales(col, inv_scale[:, g], multiplier)
            q_all[:, i1 + i] = q
            err = (col - (q * deq_scale[:, g]).to(compute_dtype)) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        if i2 < k:
            # Lazy batch update: the block's errors reach all later columns in one matmul.
            w[:, i2:] -= err1 @ u[i1:i2, i2:]

    values = torch.empty_like(q_all)
    values[:, perm] = q_all
    qdata = pack_uint4(e2m1_to_code(values))
    scale = exponent_to_e8m0(e, torch.zeros_like(e, dtype=torch.bool))
    return qdata, scale, zeroed


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """``U`` with ``H^-1 = U^T U`` (float64), with a clear error when ``H`` is not positive definite."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        # H^-1 = L^-T L^-1 by a triangular solve: the same math as torch.cholesky_inverse, which is
        # much slower on CPU.
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False)
        upper, info = torch.linalg.cholesky_ex(lower_inv.T @ lower_inv, upper=True)
    if int(info) != 0:
        raise ValueError(
            "the damped Hessian is not positive definite (Cholesky failed); use a larger damp or more "
            "calibration data"
        )
    return upper


def asymmetric_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight ``W* [N, K]`` (float64) that GPTQ quantizes under asymmetric calibration (module docstring).

    ``hessian = 2/n X~_q^T X~_q`` and ``cross = 2/n X~_q^T X`` (``[K, K]``, rows ``X~_q`` the quantized
    layer's real inputs, ``X`` the reference inputs). ``W* = W + W (C - H)^T (H + lambda I)^-1`` with
    ``lambda = damp * mean(diag H)``: the minimiser of ``2/n ||X~_q V^T - X W^T||^2 + lambda ||V - W||^2``
    (ridge least squares pulled towards ``W``), written as a correction of ``W``. Dead inputs (``H_ii = 0``, so ``C_i. = 0``) get ``H_ii = 1`` first, as in
    :func:`gptq_mxfp4`, and their correction is zero; GPTQ zeroes those columns anyway.
    """
    w = weight.detach().to(torch.float64)
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    c = cross.detach().to(device=w.device, dtype=torch.float64)
    if h.shape != (w.shape[1], w.shape[1]) or c.shape != h.shape:
        raise ValueError(f"hessian {tuple(hessian.shape)} and cross {tuple(cross.shape)} must be [K, K] for a weight {tuple(weight.shape)}")
    dead = torch.diagonal(h) == 0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    # (H + lambda I) is symmetric: W* - W = ((H + lambda I)^-1 (C - H) W^T)^T
    correction = torch.linalg.solve(h, (c - hessian.to(h)) @ w.T).T
    return w + correction


# ---------------------------------------------------------------------------------------------
# prepare -> calibrate -> convert through quantize_
# ---------------------------------------------------------------------------------------------
class HessianObserver:
    """Forward pre-hook accumulating ``S = sum_x (x R)^T (x R)`` and the row count ``n`` over every
    input row ``x`` a linear sees; ``hessian() = 2/n S``. ``x R`` is computed exactly as
    ``RotatedMXFP4Tensor.rotate_input`` does (float32, zero-padded, shared rotation block).

    Asymmetric calibration (``asymmetric=True``, module docstring): the rows accumulated into ``S`` are
    what the quantized linear consumes, ``Q_a(x R)`` with ``act_quant = (block_size, act_scale_rule)``
    (``None``: weight-only, no activation quantization), and ``cross() = 2/n sum Q_a(x R)^T (x_ref R)``.
    The reference rows are the same call's ``x R``, unless :meth:`record_reference` was switched on for
    an earlier call: that call's rows (the full-precision stream's input) are kept and paired with the
    next call's (the quantized stream's), which must have as many rows.

    A plain object, not an ``nn.Module``: it must not show up in ``named_modules`` or the state dict.
    ``name``: how convert's messages name the layer (the sequential driver sets the module's fqn; a
    ``quantize_`` handler never sees it, so by default they describe the module).
    """

    def __init__(
        self,
        in_features: int,
        padded: int,
        rotation: Optional[torch.Tensor],
        dtype: torch.dtype,
        device,
        asymmetric: bool = False,
        act_quant: Optional[Tuple[int, str]] = None,
    ):
        self.name: Optional[str] = None
        self.in_features = in_features
        self.padded = padded
        self.rotation = rotation
        self.sum = torch.zeros(padded, padded, dtype=dtype, device=device)
        self.cross_sum = torch.zeros(padded, padded, dtype=dtype, device=device) if asymmetric else None
        self.act_quant = act_quant if asymmetric else None
        self.recording_reference = False
        self.reference: Optional[torch.Tensor] = None
        self.count = 0
        self.handle = None

    @property
    def asymmetric(self) -> bool:
        return self.cross_sum is not None

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return pad_and_rotate(x.to(torch.float32), self.padded, self.rotation)

    def record_reference(self, enabled: bool = True) -> None:
        """While enabled, calls store their rotated rows as the reference of the next (quantized-stream)
        call instead of accumulating (asymmetric observers only)."""
        if not self.asymmetric:
            raise ValueError("reference rows are only used by asymmetric observers")
        self.recording_reference = enabled

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"observed input width {x.shape[-1]} != in_features {self.in_features}")
        if self.sum.device != x.device:  # the model moved after prepare: follow it
            self.sum = self.sum.to(x.device)
            if self.cross_sum is not None:
                self.cross_sum = self.cross_sum.to(x.device)
            if self.rotation is not None:
                self.rotation = self.rotation.to(x.device)
        xr = self.rotate(x.detach().reshape(-1, self.in_features))
        if self.recording_reference:
            if self.reference is not None:
                raise RuntimeError(f"{self.name or 'observer'}: two reference passes without a quantized-stream pass between them")
            self.reference = xr
            return
        if self.asymmetric:
            reference = xr if self.reference is None else self.reference
            self.reference = None
            if reference.shape != xr.shape:
                raise RuntimeError(f"{self.name or 'observer'}: reference rows {tuple(reference.shape)} do not pair with "
                                   f"the quantized stream's {tuple(xr.shape)}")
            if self.act_quant is not None:
                xr = mxfp4_fake_quantize(xr, *self.act_quant)
            xq = xr.to(self.sum.dtype)
            self.cross_sum.addmm_(xq.t(), reference.to(self.sum.dtype))
        else:
            xq = xr.to(self.sum.dtype)
        self.sum.addmm_(xq.t(), xq)
        self.count += xq.shape[0]

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        self.update(x)

    def cross(self) -> torch.Tensor:
        """``C = 2/n sum Q_a(x R)^T (x_ref R)`` (asymmetric observers)."""
        if self.cross_sum is None:
            raise ValueError("not an asymmetric observer")
        if self.count == 0:
            raise ValueError("no calibration data observed")
        return self.cross_sum.to(torch.float64) * (2.0 / self.count)

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration data observed")
        return self.sum.to(torch.float64) * (2.0 / self.count)

    def matches_layout(self, padded: int, block: Optional[torch.Tensor]) -> bool:
        """Does ``(padded, block)`` (convert's ``weight_layout``) describe the domain this observer saw?"""
        if padded != self.padded:
            return False
        if block is None or self.rotation is None:
            return block is None and self.rotation is None
        return block.shape == self.rotation.shape and torch.equal(block, self.rotation.to(block.device))


@dataclass
class MXFP4GPTQConfig(AOBaseConfig):
    """GPTQ (MR-GPTQ recipe, arXiv 2509.23202) on top of an MXFP4 config, in two ``quantize_`` steps.

    Args:
        base: the :class:`MXFP4Config` / :class:`MXFP4BlockRotConfig` whose format, scale rules and
            rotation the result uses (the same one at prepare and convert).
        step: ``"prepare"`` attaches a :class:`HessianObserver` to every targeted linear (per-expert
            ones, :class:`.gptq_experts.ExpertsHessianObserver`, to a fused experts module: ``filter_fn=is_fused_experts``);
            ``"convert"`` runs :func:`gptq_mxfp4` on the observed Hessian and installs a
            :class:`RotatedMXFP4Tensor` weight (removing the observer); for experts, one GPTQ per
            expert and projection, stacked into the 3-D weights (module docstring).
        damp: diagonal damping as a fraction of ``mean(diag H)`` (GPTQ's 1%).
        column_block: columns per lazy batch update (GPTQ's 128).
        act_order: process columns by decreasing ``diag(H)`` (static: no index at inference).
        mse_shrink: per group, search exponents ``{e - 1, e, e + 1}`` by Hessian-weighted error.
        asymmetric: asymmetric calibration (GPTAQ, module docstring): fit ``Q_a(x R) Q^T`` to the
            reference output instead of the layer's own; the Hessian is taken on the activations as the
            W4A4 linear quantizes them. Linears only (routed expert inputs of two streams do not pair).
        asymmetric_alpha: fraction (in ``[0, 1]``) of the asymmetric correction ``W* - W`` applied
            (module docstring; 0.25 as in the GPTAQ authors' code, 1 the full least-squares target).
        hessian_dtype: ``"float32"`` or ``"float64"`` accumulation of ``sum x x^T``.
        compute_dtype: ``"float32"`` or ``"float64"`` for the column loop (``H^-1`` is always float64).
    """

    base: Optional[MXFP4Config] = None
    step: str = "prepare"
    damp: float = 0.01
    column_block: int = 128
    act_order: bool = True
    mse_shrink: bool = False
    asymmetric: bool = False
    asymmetric_alpha: float = 0.25
    hessian_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        cls = type(self).__name__
        if not isinstance(self.base, MXFP4Config):
            raise TypeError(f"{cls} needs base=MXFP4Config(...) or MXFP4BlockRotConfig(...), got {self.base!r}")
        step = self.step.value if isinstance(self.step, Enum) else self.step
        if not isinstance(step, str) or step.lower() not in ("prepare", "convert"):
            raise ValueError(f"{cls} step must be 'prepare' or 'convert', got {self.step!r}")
        self.step = step.lower()
        _check_damp(self.damp, f"{cls}.")
        _check_column_block(self.column_block, f"{cls}.")
        check_bool(self.act_order, f"{cls}.act_order")
        check_bool(self.mse_shrink, f"{cls}.mse_shrink")
        check_bool(self.asymmetric, f"{cls}.asymmetric")
        self.asymmetric_alpha = check_real(self.asymmetric_alpha, f"{cls}.asymmetric_alpha", low=0, high=1)
        for name in ("hessian_dtype", "compute_dtype"):
            if getattr(self, name) not in HESSIAN_DTYPES:
                raise ValueError(f"{name} must be one of {sorted(HESSIAN_DTYPES)}, got {getattr(self, name)!r}")


class GPTQConfig(MXFP4GPTQConfig):
    """Deprecated name of :class:`MXFP4GPTQConfig` (same fields, same ``quantize_`` handler), kept for
    one release: the name clashes with torchao's own ``torchao.prototype.gptq.GPTQConfig``.
    Constructing it emits a ``DeprecationWarning``."""

    def __post_init__(self):
        warnings.warn(
            "torchao_mx_ext GPTQConfig is deprecated (it clashes with torchao.prototype.gptq.GPTQConfig); "
            "use MXFP4GPTQConfig",
            DeprecationWarning,
            stacklevel=3,  # the caller of the generated __init__
        )
        super().__post_init__()


def _describe(module: torch.nn.Module) -> str:
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    return f"{type(module).__name__}(weight {shape})"


def prepare_linear(module: torch.nn.Module, config: MXFP4GPTQConfig) -> torch.nn.Module:
    """``step="prepare"`` for a module with a 2-D ``weight``: attach a :class:`HessianObserver` (as a
    forward pre-hook, and as the attribute :data:`OBSERVER_ATTR`)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{_describe(module)} has no weight tensor to calibrate")
    if isinstance(weight, TorchAOBaseTensor):
        raise TypeError(f"{_describe(module)}: weight is already quantized ({type(weight).__name__}); prepare the original model")
    if getattr(module, OBSERVER_ATTR, None) is not None:
        raise ValueError(f"{_describe(module)} is already prepared for GPTQ; run the calibration and step='convert'")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{_describe(module)}: GPTQ needs a 2-D floating-point weight, got {weight.dtype}")
    width = weight.shape[-1]
    padded, block = weight_layout(config.base, width, weight.device)
    report_padding(width, padded)
    act_rule = config.base.activation_scale_rule
    observer = HessianObserver(
        width, padded, block, HESSIAN_DTYPES[config.hessian_dtype], weight.device,
        asymmetric=config.asymmetric, act_quant=None if act_rule is None else (config.base.block_size, act_rule),
    )
    observer.handle = module.register_forward_pre_hook(observer, with_kwargs=True)
    setattr(module, OBSERVER_ATTR, observer)
    return module


def gptq_rotated(weight: torch.Tensor, observer: HessianObserver, padded: int, block, config: MXFP4GPTQConfig):
    """GPTQ of a 2-D ``weight [N, K]`` on the observer's Hessian, in the stored domain: ``W R`` in float64
    (zero-padded to ``padded``, rotated by ``block`` as ``RotatedMXFP4Tensor.from_hp`` does), with
    ``config``'s settings. Returns ``(qdata, scale, zeroed)``, ``zeroed`` the number of dead input
    channels whose weights GPTQ set to zero: the caller warns about them (:func:`warn_dead_channels`),
    naming the layer (one linear) or summing over experts (fused experts)."""
    base = config.base
    w = pad_and_rotate(weight.to(torch.float64), padded, block)
    hessian = observer.hessian().to(weight.device)
    if observer.asymmetric and config.asymmetric_alpha > 0:
        target = asymmetric_target(w, hessian, observer.cross().to(weight.device), config.damp)
        w = w + config.asymmetric_alpha * (target - w)
    return _gptq_mxfp4(
        w, hessian, base.block_size, base.scale_rule, config.damp,
        config.column_block, config.act_order, config.mse_shrink, HESSIAN_DTYPES[config.compute_dtype],
    )


def convert_linear(module: torch.nn.Module, config: MXFP4GPTQConfig) -> torch.nn.Module:
    """``step="convert"`` for a module prepared by :func:`prepare_linear`: GPTQ on the observed Hessian,
    a :class:`RotatedMXFP4Tensor` weight in place of the original, the observer removed."""
    observer = getattr(module, OBSERVER_ATTR, None)
    if observer is None:
        if isinstance(getattr(module, "weight", None), RotatedMXFP4Tensor):
            raise ValueError(f"{_describe(module)} is already MXFP4-quantized; convert runs once")
        raise ValueError(
            f"{_describe(module)} was not prepared for GPTQ: run quantize_(model, MXFP4GPTQConfig(step='prepare', ...)) "
            "with the same filter_fn first"
        )
    if observer.count == 0:
        raise ValueError(
            f"{_describe(module)} saw no calibration data: run forward passes between step='prepare' and "
            "step='convert' (or leave this layer out with filter_fn)"
        )
    base = config.base
    weight = module.weight.detach()
    padded, block = weight_layout(base, weight.shape[-1], weight.device)
    if not observer.matches_layout(padded, block):
        raise ValueError(f"{_describe(module)}: convert's base config has another rotation/padding than prepare's")
    qdata, scale, zeroed = gptq_rotated(weight, observer, padded, block, config)
    if zeroed:
        warn_dead_channels(observer.name or _describe(module), zeroed, padded)
    new_weight = RotatedMXFP4Tensor(
        qdata, scale, base.block_size, base.scale_rule, base.activation_scale_rule, weight.shape[-1], weight.dtype, block,
        None, base.kernel_preference,
    )
    observer.handle.remove()
    delattr(module, OBSERVER_ATTR)
    module.weight = torch.nn.Parameter(new_weight, requires_grad=False)
    set_linear_repr(module)
    logger.info("GPTQ-MXFP4: %s quantized from %d calibration rows", _describe(module), observer.count)
    return module
