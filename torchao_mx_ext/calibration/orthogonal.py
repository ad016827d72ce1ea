"""Learning orthogonal (block-diagonal) rotations from activations: QR-Orth and Cayley SGD.

A rotation here is ``R = diag(Q_1, ..., Q_m)`` with ``m`` orthogonal ``b x b`` blocks (``m = 1``: a
full-width rotation), stored as a ``[m, b, b]`` tensor and applied along the last dimension of the
data, ``o = x R`` (:func:`rotate`). Every block is independent: block ``k`` only mixes features
``k*b .. (k+1)*b - 1``, so with ``b = 32`` no rotation mixes values across MX blocks.

Loss: DartQuant's *whip* loss (Shao et al., "DartQuant: Efficient Rotational Distribution
Calibration for LLM Quantization", arXiv 2511.04063), per row ``sum_i exp(-|o_i|)`` over all features
of the row, averaged over rows (:func:`whip_loss`). It is the form of the authors' code
(``calibrater/r1_base_qr.py``: ``torch.sum(torch.exp(-o.abs()), dim=-1).mean()``). For a fixed
energy ``sum_i o_i^2`` (orthogonal R preserves it) it is smallest when no ``|o_i|`` is near zero,
which pushes a peaked, heavy-tailed (Laplace-like) distribution towards a flat one with a small max.

MX-aware loss (:func:`mxfp4_error_loss`, new here: DartQuant's whip loss targets INT grids): the actual
MXFP4 quantize-dequantize error of the rotated rows, in the 32-wide blocks of the last dimension that
the quantizer will see, ``mean_rows sum_i (o_i - Q(o)_i)^2 / mean_i o_i^2``.

Two optimisers of the same loss from the same start:

- :class:`QROrth` (DartQuant): ``R = Q`` of ``Z = Q U`` (QR), over an unconstrained ``Z``
  optimised by plain SGD with momentum through autograd. The sign of ``Q``'s columns is fixed so
  ``U`` has a positive diagonal (``Q <- Q diag(sign(diag(U)))``): that makes the QR factorisation
  unique and the map ``Z -> Q`` smooth, so a small step in ``Z`` never flips a column of ``R``.
- :class:`CayleySGD` (SpinQuant's optimiser; Li, Fuxin & Todorovic, "Efficient Riemannian
  optimization on the Stiefel manifold via the Cayley transform", ICLR 2020, Algorithm 2):
  Riemannian SGD with momentum on ``X`` itself, moved along the manifold by an iterative
  approximation of the Cayley transform ``(I - a/2 W)^-1 (I + a/2 W) X`` (``W`` skew-symmetric).

:func:`train_rotation` runs either one for DartQuant's schedule: ``epochs`` epochs, each on a fresh
random ``sample_fraction`` of the rows, in mini-batches of ``batch_size`` rows.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List

import torch

from ..mx.quantize import mxfp4_fake_quantize

METHODS = ("qr", "cayley")


def whip_loss(o: torch.Tensor) -> torch.Tensor:
    """DartQuant's whip loss: ``mean_rows sum_features exp(-|o|)``; ``o`` is ``[rows, ...]``.

    Every dimension after the first is summed (an R2 row is one token with all its heads)."""
    return torch.exp(-o.abs()).reshape(o.shape[0], -1).sum(1).mean()


def mxfp4_error_loss(o: torch.Tensor, block_size: int = 32, scale_rule: str = "floor") -> torch.Tensor:
    """The MXFP4 quantize-dequantize error of ``o``: ``mean_rows sum_i (o_i - Q(o)_i)^2 / mean_i o_i^2``.

    ``Q``: MXFP4 fake quantization (E2M1 elements, one E8M0 scale per ``block_size`` values of the row
    flattened over every dimension after the first: an R2 row, ``[heads, head_dim]``, is laid out as the
    o_proj input the quantizer blocks). Each row's error is relative to its mean energy, which an
    orthogonal rotation does not change, so every token counts alike. Gradient: ``Q(o)`` is piecewise
    constant in ``o`` (the codes and the shared exponent only jump), so it enters as a constant and the
    gradient is the exact almost-everywhere one, ``2 (o - Q(o)) / mean(o^2)``: it pulls each value
    towards its grid point. Jumps of the shared exponent (a block's max crossing a power of two) are the
    part no gradient sees.
    """
    rows = o.reshape(o.shape[0], -1)
    with torch.no_grad():
        target = mxfp4_fake_quantize(rows, block_size, scale_rule)
        energy = rows.pow(2).mean(-1).clamp_min(torch.finfo(rows.dtype).tiny)
    return ((rows - target).pow(2).sum(-1) / energy).mean()


def rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x R`` along the last dimension, ``R = diag(blocks[0], ..., blocks[m-1])``; ``blocks`` is ``[m, b, b]``."""
    m, b, _ = blocks.shape
    if m == 1:  # a plain matmul: the common full-width case, and the fastest
        return x @ blocks[0]
    xb = x.reshape(*x.shape[:-1], m, b)
    return torch.einsum("...kb,kbc->...kc", xb, blocks).reshape(x.shape)


def block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """The dense ``[m*b, m*b]`` matrix of ``[m, b, b]`` blocks."""
    return torch.block_diag(*blocks.unbind(0))


def sign_fixed_qr(z: torch.Tensor) -> torch.Tensor:
    """``Q`` of ``z = Q U`` (batched over leading dims) with the columns' signs chosen so that
    ``diag(U) > 0``: the unique QR factor, a smooth function of an invertible ``z``."""
    q, u = torch.linalg.qr(z)
    d = torch.diagonal(u, dim1=-2, dim2=-1)
    # sign(0) would zero a column; a zero pivot only happens for a singular z, keep the column as is
    s = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return q * s.unsqueeze(-2)


def orthogonality_error(blocks: torch.Tensor) -> float:
    """``max |R^T R - I|`` over all blocks."""
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (blocks.transpose(-2, -1) @ blocks - eye).abs().max().item()


def nearest_orthogonal(blocks: torch.Tensor) -> torch.Tensor:
    """The closest orthogonal matrix to each block in Frobenius norm (polar factor ``U V^T``)."""
    u, _, vh = torch.linalg.svd(blocks)
    return u @ vh


class QROrth:
    """DartQuant's QR-Orth: ``R = sign_fixed_qr(Z)``, ``Z`` trained by SGD with momentum.

    ``Z`` starts at ``init`` (orthogonal, so ``R = init`` at step 0). The loss is invariant to a
    positive scaling of ``Z``'s columns, so ``Z`` may drift away from orthogonal; only ``Q`` matters.
    """

    def __init__(self, init: torch.Tensor, lr: float, momentum: float = 0.9, dtype=torch.float32):
        self.z = torch.nn.Parameter(init.detach().to(dtype).clone())
        self.opt = torch.optim.SGD([self.z], lr=lr, momentum=momentum)

    def matrix(self) -> torch.Tensor:
        return sign_fixed_qr(self.z)

    def step(self, batch: torch.Tensor, loss_fn: Callable = whip_loss) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(rotate(batch.to(self.z.dtype), self.matrix()))
        loss.backward()
        self.opt.step()
        return loss.item()

    def current(self) -> torch.Tensor:
        """The rotation blocks now (optimiser dtype, no gradient)."""
        with torch.no_grad():
            return self.matrix()

    def result(self) -> torch.Tensor:
        """The rotation blocks in float64: the QR of ``Z`` redone in float64, orthogonal to ~1e-15."""
        with torch.no_grad():
            return sign_fixed_qr(self.z.detach().to(torch.float64))


class CayleySGD:
    """Cayley SGD with momentum on the Stiefel manifold (Li et al. 2020, Algorithm 2), as in SpinQuant.

    With ``X`` the current (column-orthonormal) matrix, ``G`` the Euclidean gradient, ``M`` momentum::

        M  <- beta M - G
        W^ <- M X^T - 1/2 X (X^T M X^T);   W <- W^ - W^^T      (skew-symmetric: a tangent direction)
        M  <- W X                                              (momentum projected on the tangent space)
        a  <- min(lr, 2 q / (||W||_1 + eps))
        Y  <- X + a M;   repeat s times: Y <- X + a/2 W (X + Y)  (fixed point = Cayley transform)
        X  <- Y

    ``||W||_1`` is the maximum absolute column sum (as SpinQuant's implementation); blocks are
    independent Stiefel points, each with its own step ``a``. The ``s``-step iteration only
    approximates the Cayley transform, so ``X`` drifts off the manifold slowly
    (:func:`orthogonality_error`); :meth:`result` returns the nearest orthogonal matrix in float64.
    """

    def __init__(self, init: torch.Tensor, lr: float, momentum: float = 0.9, dtype=torch.float32,
                 q: float = 0.5, iterations: int = 2, eps: float = 1e-8):
        self.x = init.detach().to(dtype).clone()
        self.m = torch.zeros_like(self.x)
        self.lr, self.momentum, self.q, self.iterations, self.eps = lr, momentum, q, iterations, eps

    def step(self, batch: torch.Tensor, loss_fn: Callable = whip_loss) -> float:
        x = self.x.requires_grad_(True)
        loss = loss_fn(rotate(batch.to(x.dtype), x))
        (g,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x.detach()
            xt = x.transpose(-2, -1)
            m = self.momentum * self.m - g
            w_hat = m @ xt - 0.5 * x @ (xt @ m @ xt)
            w = w_hat - w_hat.transpose(-2, -1)
            self.m = w @ x
            norm = w.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1)  # ||W||_1 per block
            a = torch.clamp(2 * self.q / (norm + self.eps), max=self.lr)
            y = x + a * self.m
            for _ in range(self.iterations):
                y = x + 0.5 * a * (w @ (x + y))
            self.x = y
        return loss.item()

    def current(self) -> torch.Tensor:
        return self.x.detach()

    def result(self) -> torch.Tensor:
        return nearest_orthogonal(self.x.detach().to(torch.float64))


def make_optimiser(method: str, init: torch.Tensor, lr: float, momentum: float = 0.9, dtype=torch.float32):
    if method == "qr":
        return QROrth(init, lr, momentum, dtype)
    if method == "cayley":
        return CayleySGD(init, lr, momentum, dtype)
    raise ValueError(f"unknown rotation optimiser {method!r}; choose one of {', '.join(METHODS)}")


@torch.no_grad()
def evaluate(data: torch.Tensor, blocks: torch.Tensor, loss_fn: Callable = whip_loss, chunk: int = 16384) -> float:
    """The loss over all rows of ``data`` (a row-weighted mean over chunks, so it equals one big batch)."""
    blocks = blocks.to(data.dtype)
    total = 0.0
    for start in range(0, data.shape[0], chunk):
        part = data[start:start + chunk]
        total += loss_fn(rotate(part, blocks)).item() * part.shape[0]
    return total / data.shape[0]


@dataclass
class FitStats:
    """How one rotation was learned. Losses are the whip loss over all the collected rows."""

    method: str
    width: int
    block: int
    rows: int
    steps: int
    loss_init: float
    loss_per_epoch: List[float] = field(default_factory=list)  # after each epoch
    train_loss_per_epoch: List[float] = field(default_factory=list)  # mean mini-batch loss during each epoch
    time_s: float = 0.0  # optimisation only (no evaluation)
    orthogonality_error: float = 0.0  # max |R^T R - I| of the optimiser's own matrix, in its dtype

    @property
    def loss_final(self) -> float:
        return self.loss_per_epoch[-1] if self.loss_per_epoch else self.loss_init


def train_rotation(
    data: torch.Tensor,
    init: torch.Tensor,
    method: str = "qr",
    lr: float = 1e-3,
    momentum: float = 0.9,
    epochs: int = 10,
    batch_size: int = 64,
    sample_fraction: float = 0.1,
    seed: int = 0,
    dtype=torch.float32,
    loss_fn: Callable = whip_loss,
):
    """Learn block rotations ``[m, b, b]`` minimising ``loss_fn(x R)`` over the rows of ``data``.

    ``data`` is ``[rows, ..., m*b]`` (the rotation acts on the last dimension); ``init`` the starting
    blocks (orthogonal). Each epoch draws ``max(batch_size, round(sample_fraction * rows))`` rows
    without replacement (DartQuant: 10% per epoch) and takes one optimiser step per mini-batch of
    ``batch_size`` rows. Returns ``(blocks float64 [m, b, b], FitStats)``.
    """
    if data.ndim < 2 or data.shape[0] == 0:
        raise ValueError(f"need a non-empty [rows, ..., width] tensor of activations, got shape {tuple(data.shape)}")
    m, b, b2 = init.shape
    if b != b2 or data.shape[-1] != m * b:
        raise ValueError(f"rotation blocks {tuple(init.shape)} do not match data width {data.shape[-1]}")
    if not 0 < sample_fraction <= 1 or batch_size < 1 or epochs < 0:
        raise ValueError("need 0 < sample_fraction <= 1, batch_size >= 1 and epochs >= 0")
    data = data.to(dtype)
    opt = make_optimiser(method, init.to(data.device), lr, momentum, dtype)
    gen = torch.Generator().manual_seed(seed)
    rows = data.shape[0]
    per_epoch = min(rows, max(batch_size, round(sample_fraction * rows)))
    stats = FitStats(method, m * b, b, rows, 0, evaluate(data, opt.current(), loss_fn))
    for _ in range(epochs):
        start = time.perf_counter()
        idx = torch.randperm(rows, generator=gen)[:per_epoch].to(data.device)
        losses = [opt.step(data[idx[i:i + batch_size]], loss_fn) for i in range(0, per_epoch, batch_size)]
        stats.time_s += time.perf_counter() - start
        stats.steps += len(losses)
        stats.train_loss_per_epoch.append(sum(losses) / len(losses))
        stats.loss_per_epoch.append(evaluate(data, opt.current(), loss_fn))
    stats.orthogonality_error = orthogonality_error(opt.current())
    result = opt.result()
    if not math.isfinite(stats.loss_final):
        raise FloatingPointError(f"{method} rotation training diverged (loss {stats.loss_final}); lower the learning rate")
    return result, stats
