"""DartQuant: learned R1 / R2 rotations calibrated on activations (Shao et al., arXiv 2511.04063).

DartQuant replaces QuaRot's random Hadamard R1 (residual stream, ``d x d``) and R2 (per attention
head, ``head_dim x head_dim``, one per layer) by rotations learned on calibration activations, not
end to end through the model (SpinQuant): each rotation minimises the *whip* loss of the rotated
activations, ``mean_tokens sum_i exp(-|(x R)_i|)``, which flattens their distribution (fewer values
near zero, smaller max for the same energy) so they quantize better. R3/R4 stay random Hadamards.

Activations, on the model as :func:`~torchao_mx_ext.rotation.fusion.fuse_rotations` will see it
(RMSNorm weights folded into the following linears, so each norm outputs ``x / rms(x)``):

- R1: the inputs of ``q_proj`` and ``up_proj`` of every layer, pooled: ``[rows, d]``. They are the
  normalised residual ``h / sqrt(mean(h^2) + eps)``, computed here from each norm's input exactly as
  the folded norm computes it (float32, then the model dtype), so the model is never modified.
- R2 (per layer): the input of ``o_proj`` viewed per head, ``[tokens, heads, head_dim]``; one R2 is
  shared by all heads of a layer (``fuse_rotations`` fuses one per layer), and the loss sums over all
  heads of a token, as the authors' ``r2_base_qr.py`` does. Folding does not change these inputs.

Optimisation (QR-Orth, :mod:`.orthogonal`): ``R = Q`` of ``qr(Z)`` (sign-fixed), ``Z`` initialised to a
random Hadamard; SGD with momentum 0.9, 10 epochs, each over a random 10% of the rows in mini-batches
of 64 rows; lr 1e-3 (R1 and R2). ``block=32`` (``dartquant-block``) learns ``R = diag(Q_1..Q_{d/32})``,
one independent QR-parametrised block per MX block (R2: ``min(32, head_dim)`` wide blocks), so a
learned rotation never mixes values of two MX blocks.

``loss="mxfp4"`` (the ``mxrot`` methods of ``recipes.py``; new here) swaps the whip loss for the actual
MXFP4 quantize-dequantize error of the rotated activations in their 32-wide blocks
(:func:`.orthogonal.mxfp4_error_loss`, with the scale rule the activations will be quantized with):
the same activations, parametrisation and schedule, a loss that measures the format's own error
instead of a proxy built for INT grids.

Memory: activations are subsampled to at most ``r1_max_rows`` rows for R1 (default 65,536, spread
evenly over the ``2 x layers`` sources: ``65536 * d * 4`` bytes, 151 MB for d = 576) and
``r2_max_tokens`` tokens per layer for R2 (default 8,192: ``layers * 8192 * heads * head_dim * 4``
bytes, 566 MB for SmolLM2-135M's 30 x 9 x 64), drawn at random (seeded) from all calibration tokens.

Usage (the caller fuses and quantizes, as ``recipes.py`` does for QuaRot)::

    r1, r2, stats = learn_rotations(model, calib_ids, block=None)   # or block=32
    fuse_rotations(model, r1, r2)
    # then R4 online on down_proj (MXFP4BlockRotConfig(rotation="hadamard", ...)) and quantize_linears
"""

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..mx import check_scale_rule
from ..rotation.fusion import check_supported, head_dim_of
from ..rotation.rotations import orthogonal_block
from .data import check_calibration_ids, check_int, check_real
from .orthogonal import FitStats, METHODS, block_diag, mxfp4_error_loss, train_rotation, whip_loss

logger = logging.getLogger(__name__)

DEFAULT_R1_MAX_ROWS = 65536
DEFAULT_R2_MAX_TOKENS = 8192
LOSSES = ("whip", "mxfp4")


@dataclass
class CalibrationActivations:
    """Activations for DartQuant, float32: ``r1`` ``[rows, d]``; ``r2[layer]`` ``[tokens, heads, head_dim]``."""

    r1: torch.Tensor
    r2: List[torch.Tensor]
    tokens: int  # calibration tokens seen (before subsampling)


@dataclass
class DartQuantStats:
    """What :func:`learn_rotations` did: per-rotation losses (init, after each epoch) and times."""

    r1: FitStats
    r2: List[FitStats]
    tokens: int
    collect_time_s: float
    total_time_s: float
    settings: Dict = field(default_factory=dict)

    def to_dict(self) -> Dict:
        out = asdict(self)
        out["r1"]["loss_final"] = self.r1.loss_final
        for d, s in zip(out["r2"], self.r2):
            d["loss_final"] = s.loss_final
        return out


def _check_ids(model: torch.nn.Module, calib_ids: torch.Tensor) -> torch.Tensor:
    """``calib_ids`` as int64 after :func:`.data.check_calibration_ids` (DartQuant also refuses
    sequences longer than ``max_position_embeddings``)."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return check_calibration_ids(model, calib_ids, "DartQuant", max_positions=max_pos)


def _check_collect_args(r1_max_rows, r2_max_tokens, forward_batch, seed) -> None:
    check_int(r1_max_rows, "r1_max_rows", low=1)
    check_int(r2_max_tokens, "r2_max_tokens", low=1)
    check_int(forward_batch, "forward_batch", low=1)
    check_int(seed, "seed")


def _folded_norm_output(norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """What a Llama-style RMSNorm with its weight folded away (weight = 1) outputs for input ``h``."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise NotImplementedError(f"cannot read the epsilon of {type(norm).__name__}")
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x.to(h.dtype)


@torch.no_grad()
def collect_activations(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    r1_max_rows: int = DEFAULT_R1_MAX_ROWS,
    r2_max_tokens: int = DEFAULT_R2_MAX_TOKENS,
    forward_batch: int = 8,
    seed: int = 0,
    device: Optional[torch.device] = None,
) -> CalibrationActivations:
    """Run the calibration ids through ``model`` (read-only, hooks removed afterwards) and keep a
    seeded random subset of the R1 and R2 activations (see the module docstring). ``device``: where
    the activations are kept (default: the model's device)."""
    _check_collect_args(r1_max_rows, r2_max_tokens, forward_batch, seed)
    check_supported(model)
    ids = _check_ids(model, calib_ids)
    layers = model.model.layers
    n_layers, n, seq = len(layers), ids.shape[0], ids.shape[1]
    total = n * seq
    head_dim = head_dim_of(model)
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device

    # Fixed token subsets per source, drawn up front so chunking the forward passes changes nothing.
    gen = torch.Generator().manual_seed(seed)
    per_r1 = min(total, max(1, r1_max_rows // (2 * n_layers)))  # so at most r1_max_rows rows
    per_r2 = min(total, max(1, r2_max_tokens))
    picks = {}
    for i in range(n_layers):
        for src in ("q", "up"):
            picks[(src, i)] = torch.randperm(total, generator=gen)[:per_r1].sort().values
        picks[("o", i)] = torch.randperm(total, generator=gen)[:per_r2].sort().values
    store = {key: [] for key in picks}
    window = {"start": 0, "stop": 0}

    def keep(key, x):
        sel = picks[key]
        sel = sel[(sel >= window["start"]) & (sel < window["stop"])] - window["start"]
        flat = x.reshape(-1, x.shape[-1])
        store[key].append(flat[sel.to(flat.device)].to(device=device, dtype=torch.float32))

    def norm_hook(key):
        def hook(module, args, output):
            keep(key, _folded_norm_output(module, args[0]))
        return hook

    def o_hook(key):
        def hook(module, args):
            keep(key, args[0])
        return hook

    handles = []
    was_training = model.training
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.input_layernorm.register_forward_hook(norm_hook(("q", i))))
            handles.append(layer.post_attention_layernorm.register_forward_hook(norm_hook(("up", i))))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(("o", i))))
        model.eval()
        for start in range(0, n, forward_batch):
            chunk = ids[start:start + forward_batch].to(model_device)
            window["start"], window["stop"] = start * seq, (start + chunk.shape[0]) * seq
            model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    r1 = torch.cat([torch.cat(store[(src, i)]) for i in range(n_layers) for src in ("q", "up")])
    r2 = []
    for i in range(n_layers):
        o = torch.cat(store[("o", i)])
        r2.append(o.reshape(o.shape[0], -1, head_dim))
    return CalibrationActivations(r1=r1, r2=r2, tokens=total)


def _seed(seed: int, *parts: int) -> int:
    # distinct, deterministic seeds per rotation and block
    out = seed
    for p in parts:
        out = (out * 1_000_003 + p + 1) % (2**31 - 1)
    return out


def random_hadamard_blocks(width: int, block: Optional[int], seed: int) -> torch.Tensor:
    """``[m, b, b]`` float64: an independent randomised Hadamard ``D_k H_b / sqrt(b)`` per block
    (``block=None``: one full-width block), the QR-Orth starting point."""
    size = width if block is None else min(block, width)
    if width % size:
        raise ValueError(f"width {width} is not a multiple of the rotation block {size}")
    return torch.stack([orthogonal_block("random_hadamard", size, _seed(seed, k)) for k in range(width // size)])


def learn_rotations(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    block: Optional[int] = None,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 64,
    sample_fraction: float = 0.1,
    r1_lr: float = 1e-3,
    r2_lr: float = 1e-3,
    momentum: float = 0.9,
    method: str = "qr",
    r1_max_rows: int = DEFAULT_R1_MAX_ROWS,
    r2_max_tokens: int = DEFAULT_R2_MAX_TOKENS,
    forward_batch: int = 8,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    loss: str = "whip",
    scale_rule: str = "floor",
) -> Tuple[torch.Tensor, List[torch.Tensor], DartQuantStats]:
    """Learn DartQuant's R1 and per-layer R2 for a Llama-family HF model; the model is not modified.

    ``calib_ids``: LongTensor ``[n, seq_len]`` (DartQuant: 128 x 2048 WikiText-2 tokens).
    ``block``: ``None`` (full-width rotations) or 32 (``dartquant-block``: block-diagonal R1 and R2,
    one learned block per MX block). ``method``: ``"qr"`` (QR-Orth) or ``"cayley"`` (Cayley SGD, the
    SpinQuant-style reference; same loss, init and schedule). ``dtype``: optimisation dtype.
    ``loss``: ``"whip"`` (DartQuant) or ``"mxfp4"`` (the MXFP4 quantize-dequantize error of the rotated
    activations with ``scale_rule``, blocks of ``block`` or 32 values).

    Returns ``(r1 float64 [d, d], r2 list of float64 [head_dim, head_dim] per layer, stats)``, ready
    for :func:`~torchao_mx_ext.rotation.fusion.fuse_rotations`. ``stats.r1.loss_per_epoch`` and
    ``stats.r2[i].loss_per_epoch`` hold the whip loss over all collected rows after each epoch
    (``loss_init`` before the first).
    """
    if method not in METHODS:
        raise ValueError(f"unknown rotation optimiser {method!r}; choose one of {', '.join(METHODS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown rotation loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if loss == "mxfp4":
        check_scale_rule(scale_rule)
    # Every setting is checked before the (possibly long) forward passes.
    if block is not None:
        check_int(block, "block (None or a rotation block width)", low=1)
    check_int(epochs, "epochs", low=0)
    check_int(batch_size, "batch_size", low=1)
    check_real(sample_fraction, "sample_fraction", low=0, high=1, low_open=True)
    check_real(r1_lr, "r1_lr", low=0, low_open=True)
    check_real(r2_lr, "r2_lr", low=0, low_open=True)
    check_real(momentum, "momentum", low=0, high=1, high_open=True)
    _check_collect_args(r1_max_rows, r2_max_tokens, forward_batch, seed)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.float64), got {dtype!r}")
    check_supported(model)
    d, head_dim = model.config.hidden_size, head_dim_of(model)
    for width in (d, head_dim):  # fail before the (possibly long) forward passes
        if block is not None and width % min(block, width):
            raise ValueError(f"width {width} is not a multiple of the rotation block {block}")
    _check_ids(model, calib_ids)
    t0 = time.perf_counter()
    acts = collect_activations(model, calib_ids, r1_max_rows, r2_max_tokens, forward_batch, seed, device)
    collect_s = time.perf_counter() - t0
    loss_fn = whip_loss if loss == "whip" else (lambda o: mxfp4_error_loss(o, 32, scale_rule))
    schedule = dict(method=method, momentum=momentum, epochs=epochs, batch_size=batch_size,
                    sample_fraction=sample_fraction, dtype=dtype, loss_fn=loss_fn)

    r1_blocks, r1_stats = train_rotation(
        acts.r1, random_hadamard_blocks(d, block, _seed(seed, 1)), lr=r1_lr, seed=_seed(seed, 2), **schedule
    )
    logger.info("DartQuant R1 (%dx%d, block %s): %s loss %.4f -> %.4f in %.1f s", d, d, block, loss,
                r1_stats.loss_init, r1_stats.loss_final, r1_stats.time_s)
    r2, r2_stats = [], []
    for i, data in enumerate(acts.r2):
        blocks, stats = train_rotation(
            data, random_hadamard_blocks(head_dim, block, _seed(seed, 3, i)), lr=r2_lr, seed=_seed(seed, 4, i),
            **schedule,
        )
        r2.append(block_diag(blocks).cpu())
        r2_stats.append(stats)
    settings = dict(schedule, block=block, seed=seed, r1_lr=r1_lr, r2_lr=r2_lr, r1_rows=acts.r1.shape[0],
                    r2_tokens=acts.r2[0].shape[0], dtype=str(dtype), loss=loss)
    del settings["loss_fn"]
    if loss == "mxfp4":
        settings["scale_rule"] = scale_rule
    stats = DartQuantStats(r1_stats, r2_stats, acts.tokens, collect_s, time.perf_counter() - t0, settings)
    return block_diag(r1_blocks).cpu(), r2, stats
