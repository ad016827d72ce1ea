"""QESC: quantization-aware expert selection calibration (EAC-MoE, arXiv 2508.01625, section 3.1).

Quantizing a MoE layer's attention (and every earlier layer) shifts the hidden states its router
sees, so the quantized model selects other experts than the full-precision one ("expert shift").
QESC re-fits each router, layer after layer, so that on the quantized model's inputs it reproduces
the full-precision router's logits of the experts that matter:

    L(W') = 1/K sum_t sum_{i in topK(W x_t)} ((W x_t)_i - (W' x^_t)_i)^2

with ``x_t`` the router input of token ``t`` in the full-precision model, ``x^_t`` the same token's
router input in the model quantized so far (this layer's attention and all earlier layers), ``W`` the
original router weight and ``K`` larger than the routing top-k (the paper uses 8..20). Then the
layer's experts (and its other linears) are quantized and the quantized layer's outputs feed the next.

The loss is a least-squares problem per expert row ``i`` over the tokens ``T_i`` whose top-K holds
``i``, so instead of the paper's gradient descent we take its exact minimiser, with a ridge term that
keeps rows seen by few tokens near ``W``:

    w'_i = (X^_i^T X^_i + lam_i I)^-1 (X^_i^T z_i + lam_i w_i),   z_i = (W x_t)_i for t in T_i,
    lam_i = damp * mean(diag(X^_i^T X^_i))

(float64). The router has ``E x d`` weights fitted from a few thousand tokens, so a weak ridge
overfits the calibration text: on the top-4-of-16 trained SmolLM2 MoE, damp 0.01 raised calibration
agreement 0.852 -> 0.905 while held-out agreement fell 0.834 -> 0.815. ``damp="auto"`` (the default)
therefore chooses it per layer by held-out validation, the standard way to set a ridge: the last
quarter of the calibration sequences is held out, each ``damp`` of :data:`DAMP_GRID` is fitted on the
rest, and the one whose router reproduces the full-precision routing top-k best on the held-out tokens
wins, if it beats the unchanged router there (ties go to the stronger ridge); the winner is re-fitted on
all tokens. A layer where no fit wins keeps its router. Calibration keeps one layer's inputs of both
models in memory (``2 x n x L x d``).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torchao.quantization import quantize_
from tqdm.auto import tqdm

from ..architectures import decoder_layers
from ..calibration.data import check_bool, check_calibration_ids, check_int, check_real
from ..calibration.sequential import capture_first_layer_inputs, decoder_layers_fqn, run_layer
from ..configs import MXFP4Config, quantizable_filter
from . import experts  # noqa: F401  registers fused MoE experts with the configs' handler (quantizable_filter)
from .adapters import find_moe_blocks

__all__ = ["DAMP_GRID", "QESCReport", "choose_damp", "fit_router_to_topk_logits", "qesc_quantize", "topk_agreement"]

DAMP_GRID = (0.01, 0.1, 1.0, 10.0)  # ridge fractions ``damp="auto"`` chooses from (module docstring)


@dataclass
class QESCReport:
    """Per layer: top-k agreement with the full-precision router on the calibration tokens (the
    routing top-k, not QESC's K), with the original router weight and after QESC, and the ridge
    fraction used (``None``: the router was kept, as ``damp="auto"`` decided or with
    ``calibrate_routers=False``)."""

    agreement_before: List[float] = field(default_factory=list)
    agreement_after: List[float] = field(default_factory=list)
    damp: List[Optional[float]] = field(default_factory=list)


def _moe_blocks_by_layer(model: torch.nn.Module) -> Dict[int, tuple]:
    """``{decoder layer index: (router, top_k)}`` (a clear error for dense / unsupported models)."""
    blocks = {id(block): (block.gate, adapter.top_k(block.gate)) for _, block, adapter in find_moe_blocks(model)}
    found = {}
    for i, layer in enumerate(decoder_layers(model, "QESC")):
        mlp = getattr(layer, "mlp", None)
        if id(mlp) in blocks:
            found[i] = blocks[id(mlp)]
    return found


def fit_router_to_topk_logits(
    weight: torch.Tensor, x_fp: torch.Tensor, x_q: torch.Tensor, k_loss: int, damp: float = 0.01
) -> torch.Tensor:
    """The exact minimiser of QESC's loss (module docstring) for router ``weight [E, d]``, full-precision
    router inputs ``x_fp [T, d]`` and quantized-model inputs ``x_q [T, d]`` of the same tokens.
    ``k_loss``: an integer >= 1 (clipped to ``E``); ``damp``: a finite ridge fraction >= 0."""
    k_loss = check_int(k_loss, "k_loss", low=1)
    damp = check_real(damp, "damp", low=0)
    if x_fp.shape != x_q.shape or x_fp.shape[-1] != weight.shape[1]:
        raise ValueError(f"router inputs {tuple(x_fp.shape)} / {tuple(x_q.shape)} do not fit weight {tuple(weight.shape)}")
    e, d = weight.shape
    k_loss = min(k_loss, e)
    w = weight.detach().to(torch.float64)
    xq = x_q.to(torch.float64)
    z = x_fp.to(torch.float64) @ w.T  # [T, E] full-precision logits
    in_top = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(k_loss, dim=1).indices, True)
    fitted = torch.empty_like(w)
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(e):
        rows = xq[in_top[:, i]]
        gram = rows.T @ rows
        lam = damp * float(gram.diagonal().mean()) if rows.shape[0] else 1.0
        lam = max(lam, 1e-12)
        rhs = rows.T @ z[in_top[:, i], i] + lam * w[i]
        fitted[i] = torch.linalg.solve(gram + lam * eye, rhs)
    return fitted.to(weight.dtype)


def choose_damp(
    weight: torch.Tensor, x_fp: torch.Tensor, x_q: torch.Tensor, k_loss: int, top_k: int,
    held_out: torch.Tensor, grid: Sequence[float] = DAMP_GRID,
) -> Optional[float]:
    """The ridge fraction of ``grid`` whose fit on the tokens outside the boolean mask ``held_out``
    reproduces the full-precision routing top-``top_k`` best on the tokens inside it; ``None`` where
    none beats the unchanged ``weight`` there. Ties go to the larger ``damp`` (the safer fit)."""
    if not bool(held_out.any()) or bool(held_out.all()):
        raise ValueError("held_out must mark some of the tokens, not all of them")
    fit = ~held_out
    target = _topk_indices(weight, x_fp[held_out], top_k)
    best, best_agreement = None, _agreement(target, _topk_indices(weight, x_q[held_out], top_k))
    for damp in sorted(grid, reverse=True):
        fitted = fit_router_to_topk_logits(weight, x_fp[fit], x_q[fit], k_loss, damp)
        agreement = _agreement(target, _topk_indices(fitted, x_q[held_out], top_k))
        if agreement > best_agreement:
            best, best_agreement = damp, agreement
    return best


def _agreement(index_a: torch.Tensor, index_b: torch.Tensor) -> float:
    """Mean over tokens of |S_a & S_b| / k for top-k index sets ``[T, k]``."""
    same = (index_a.unsqueeze(-1) == index_b.unsqueeze(-2)).any(-1)
    return float(same.float().mean())


def _topk_indices(weight: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    return (x.to(torch.float32) @ weight.to(torch.float32).T).topk(k, dim=1).indices


class _RouterInputs:
    """Forward pre-hook collecting a router's inputs as ``[tokens, d]`` rows."""

    def __init__(self, router: torch.nn.Module):
        self.rows: List[torch.Tensor] = []
        self.handle = router.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0]
        self.rows.append(x.detach().reshape(-1, x.shape[-1]).to(torch.float32))

    def take(self) -> torch.Tensor:
        self.handle.remove()
        return torch.cat(self.rows)


@torch.no_grad()
def qesc_quantize(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    config: Union[MXFP4Config, Callable[[str], Optional[MXFP4Config]]],
    k_loss: Optional[int] = None,
    damp: Union[float, str] = "auto",
    calibrate_routers: bool = True,
    progress: bool = True,
) -> QESCReport:
    """Quantize a MoE decoder layer by layer with ``config`` (or ``config(fqn inside the layer)``,
    ``None`` = keep), re-fitting every MoE router with QESC before its experts are quantized.

    Order per layer: attention linears -> (QESC on the router) -> experts and remaining linears; the
    router itself stays in full precision. ``calibrate_routers=False`` runs the same pipeline without
    QESC (the baseline it is measured against). ``k_loss``: QESC's ``K``, which must exceed the routing
    top-k (the paper: 8..20); default ``min(E, max(8, 2 * top_k))``, so for a top-14-of-16 router every
    logit counts (with ``K`` below top-k the fit ignores the ranks that decide the selection).
    ``damp``: the ridge fraction, or ``"auto"`` to choose it per layer on held-out calibration
    sequences (module docstring; needs >= 2 of them). Returns the per-layer top-k agreement and damp.

    Checked before the model is touched: ``calib_ids`` (an integer ``[n, seq_len]`` tensor of ids in
    the vocabulary), ``config``, ``k_loss`` (an integer above every MoE layer's top-k, or ``>= E``
    where ``top_k = E``), ``damp`` (a finite number >= 0, or ``"auto"`` with >= 2 calibration
    sequences), ``calibrate_routers`` (a bool).
    """
    layers = decoder_layers(model, "QESC")
    calib_ids = check_calibration_ids(model, calib_ids, "QESC")
    if not isinstance(config, MXFP4Config) and not callable(config):
        raise TypeError(
            f"config must be an MXFP4Config or a callable fqn -> MXFP4Config/None, got {type(config).__name__}"
        )
    if isinstance(damp, str):
        if damp != "auto":
            raise ValueError(f"damp must be a finite number >= 0 or 'auto', got {damp!r}")
        if calib_ids.shape[0] < 2:
            raise ValueError(
                "damp='auto' holds out whole calibration sequences to choose the ridge: give >= 2 sequences, "
                f"got {calib_ids.shape[0]}, or a number"
            )
    else:
        damp = check_real(damp, "damp", low=0)
    calibrate_routers = check_bool(calibrate_routers, "calibrate_routers")
    moe = _moe_blocks_by_layer(model)
    if k_loss is not None:
        k_loss = check_int(k_loss, "k_loss", low=1)
        for i, (router, k) in moe.items():
            num_experts = router.weight.shape[0]
            if k_loss <= k and k_loss < num_experts:
                raise ValueError(
                    f"k_loss must exceed the routing top-k ({k} in layer {i}; or be >= the {num_experts} experts), "
                    f"got {k_loss}: with K <= top-k the fit ignores the logits that decide the selection"
                )
    config_for = (lambda _: config) if isinstance(config, MXFP4Config) else config
    report = QESCReport()
    quantizable = quantizable_filter(model)  # linears and fused experts, not the output head / keep-in-fp32 ones
    layers_fqn = decoder_layers_fqn(model)
    hidden_fp, kwargs = capture_first_layer_inputs(model, calib_ids)
    hidden_q = hidden_fp.clone()

    def quantize_part(i: int, layer, wanted: Callable[[str], bool]):
        for fqn, module in list(layer.named_modules()):
            if wanted(fqn) and quantizable(module, f"{layers_fqn}.{i}.{fqn}"):
                cfg = config_for(fqn)
                if cfg is not None:
                    quantize_(layer, cfg, filter_fn=lambda m, n, f=fqn: n == f)

    for i, layer in enumerate(tqdm(layers, desc="QESC layers", disable=not progress)):
        if i not in moe:  # a dense layer: quantize it, nothing to calibrate
            hidden_fp = run_layer(layer, hidden_fp, kwargs)
            quantize_part(i, layer, lambda fqn: True)
            hidden_q = run_layer(layer, hidden_q, kwargs)
            continue
        router, k = moe[i]
        fp_inputs = _RouterInputs(router)
        hidden_fp = run_layer(layer, hidden_fp, kwargs)
        x_fp = fp_inputs.take()

        quantize_part(i, layer, lambda fqn: fqn.startswith("self_attn"))
        q_inputs = _RouterInputs(router)
        run_layer(layer, hidden_q, kwargs)
        x_q = q_inputs.take()

        target = _topk_indices(router.weight, x_fp, k)
        report.agreement_before.append(_agreement(target, _topk_indices(router.weight, x_q, k)))
        layer_damp = None
        if calibrate_routers:
            num_experts = router.weight.shape[0]
            k_fit = k_loss if k_loss is not None else min(num_experts, max(8, 2 * k))
            layer_damp = damp
            if damp == "auto":  # rows are sequence-major: hold out the last quarter of the sequences
                n = calib_ids.shape[0]
                held_out = torch.zeros(n, x_fp.shape[0] // n, dtype=torch.bool)
                held_out[n - max(1, n // 4):] = True
                layer_damp = choose_damp(router.weight, x_fp, x_q, k_fit, k, held_out.reshape(-1))
            if layer_damp is not None:
                router.weight.copy_(fit_router_to_topk_logits(router.weight, x_fp, x_q, k_fit, layer_damp))
        report.damp.append(layer_damp)
        report.agreement_after.append(_agreement(target, _topk_indices(router.weight, x_q, k)))

        quantize_part(i, layer, lambda fqn: not fqn.startswith("self_attn"))
        hidden_q = run_layer(layer, hidden_q, kwargs)
    return report


@torch.no_grad()
def topk_agreement(reference: torch.nn.Module, model: torch.nn.Module, input_ids: torch.Tensor) -> Dict[str, float]:
    """Top-k agreement of ``model``'s routers with ``reference``'s (e.g. the full-precision model) on
    ``input_ids``, each model on its own hidden states: per MoE layer and overall, the mean over
    tokens of ``|S_ref & S_model| / k`` (sentinel slots of pruning passes count as misses)."""

    def routed(m):
        found, handles = {}, []
        for i, (router, _) in _moe_blocks_by_layer(m).items():
            handles.append(router.register_forward_hook(lambda mod, a, out, i=i: found.setdefault(i, []).append(out[2])))
        try:
            m(input_ids)
        finally:
            for h in handles:
                h.remove()
        return {i: torch.cat(v) for i, v in found.items()}

    ref, got = routed(reference), routed(model)
    per_layer = {f"layer{i}": _agreement(ref[i], got[i]) for i in ref}
    per_layer["mean"] = sum(per_layer.values()) / len(per_layer)
    return per_layer
