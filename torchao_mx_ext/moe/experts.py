"""MXFP4 (RTN or GPTQ, optional block rotation; W4A4 or weight-only) for fused 3-D MoE expert weights.

transformers 5.x keeps a MoE layer's experts in one module (``mlp.experts``) with 3-D parameters
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (not ``nn.Linear``). For expert ``e`` and token
``x`` the module computes, exactly like ``E`` linears,

    g, u = split(Q_a(x R_H) Q(W1_e R_H)^T)           W1 = gate_up_proj
    y_e  = Q_a(h R_I) Q(W2_e R_I)^T,  h = act(g) * u  W2 = down_proj
    out  = sum over the token's top-k slots of  p_slot * y_e(slot)   (a slot with e >= E is skipped)

with ``R`` the config's block-diagonal rotation along each projection's input (last) dimension, ``Q`` the
MXFP4 quantize-dequantize along that same dimension, and ``Q_a`` the activation's (identity when
weight-only). Each weight is a 3-D :class:`RotatedMXFP4Tensor` (``qdata [E, N, K_p/2]``, ``scale
[E, N, K_p/32]``: 4.25 bits per weight), quantized expert by expert with the same rotation block object
as the model's linears (:func:`torchao_mx_ext.configs.weight_layout`).

Design: an experts *backend*, not aten ops on the tensor subclass. Neither the rotation nor an
activation's MX blocks (32 consecutive features of one token) depend on the expert, so ``Q_a(x R)`` is
computed ONCE per projection for all tokens (not once per expert that a token visits), then the routed
(token, expert) rows are sorted by expert and multiplied in one grouped GEMM against the dequantized
weights. Teaching the subclass the stock backends' ops instead (``select``/``index`` per expert for
eager, per-pair gathers + ``bmm`` for batched_mm, ``transpose`` + ``grouped_mm`` + transformers'
fallback custom op for grouped_mm) would quantize the activation inside every GEMM, i.e. repeat it per
expert, and tie correctness to every backend's op sequence. :func:`mxfp4_experts_forward` has the
backend signature and also runs unquantized experts (plain math), so it is registered in transformers'
``ALL_EXPERTS_FUNCTIONS`` as ``"torchao_mx_ext"``. A quantized module does not rely on the model-wide
``config._experts_implementation`` (shared by every layer, reset by ``set_experts_implementation``):
:func:`quantize_experts_module` swaps its class for a subclass whose ``forward`` is this backend, so no
setting can route packed weights into a stock backend; ``isinstance`` checks on the original class
still hold. Everything has static shapes and compiles with ``torch.compile(fullgraph=True)``: compiled,
the pairs of pruned slots (router passes) ride along and are masked; eager drops them first, so a
pass that prunes a fraction of the slots saves that fraction of the experts' work.

:func:`quantize_experts_module` is RTN. GPTQ (per-expert Hessians from the tokens routed to each
expert) goes through :class:`torchao_mx_ext.calibration.MXFP4GPTQConfig` with ``filter_fn=is_fused_experts``
(and :func:`torchao_mx_ext.calibration.sequential.sequential_gptq` does it for every layer); its
calibration forward is :func:`experts_forward` with an ``observe`` callback, and the result has the
layout and class this module gives.
"""

from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ..architectures import expert_projection_names
from ..configs import MXFP4Config, register_module_quantizer, report_padding, weight_layout
from ..tensors import RotatedMXFP4Tensor


__all__ = [
    "EXPERTS_BACKEND",
    "expert_projection_names",
    "experts_forward",
    "install_mxfp4_experts_class",
    "is_fused_experts",
    "mxfp4_experts_forward",
    "quantize_expert_weights",
    "quantize_experts_module",
    "register_experts_backend",
]

EXPERTS_BACKEND = "torchao_mx_ext"



# -- detection (the layout itself is a structural fact: torchao_mx_ext.architectures) -----------------
def is_fused_experts(module: torch.nn.Module, fqn: str = "") -> bool:
    """``quantize_`` filter: a fused experts module (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``).

    Already-quantized experts match too, so quantizing twice fails loudly (as for linears)."""
    return expert_projection_names(module) is not None


# -- weights ------------------------------------------------------------------------------------
def quantize_expert_weights(weight: torch.Tensor, config: MXFP4Config) -> RotatedMXFP4Tensor:
    """``W [E, N, K]`` -> 3-D :class:`RotatedMXFP4Tensor` holding ``Q(W_e R)`` for every expert ``e``.

    ``R`` and the padded width ``K_p`` come from :func:`weight_layout`, so the rotation block is the very
    tensor object the linears use. Quantized one expert at a time (the float64 rotation of a whole
    ``[E, N, K]`` stack would be a large temporary); each expert row is the 2-D case bit for bit.
    """
    if isinstance(weight, RotatedMXFP4Tensor):
        raise TypeError("expert weight is already MXFP4-quantized; quantize_ it once")
    if weight.dim() != 3:
        raise ValueError(f"expected a 3-D expert weight [E, N, K], got shape {tuple(weight.shape)}")
    width = weight.shape[-1]
    padded, block = weight_layout(config, width, weight.device)
    report_padding(width, padded, "expert input")
    experts = [
        RotatedMXFP4Tensor.from_hp(w, config.block_size, config.scale_rule, config.activation_scale_rule, block, config.kernel_preference)
        for w in weight.detach()
    ]
    qdata = torch.stack([q.qdata for q in experts])
    scale = torch.stack([q.scale for q in experts])
    return RotatedMXFP4Tensor(
        qdata, scale, config.block_size, config.scale_rule, config.activation_scale_rule, width, weight.dtype, block, None,
        config.kernel_preference,
    )


def quantize_experts_module(module: torch.nn.Module, config: MXFP4Config) -> torch.nn.Module:
    """Quantize a fused experts module's two projections in place (``quantize_`` handler form).

    Both weights become 3-D :class:`RotatedMXFP4Tensor` parameters along their input dimension, and the
    module's class becomes a subclass of the original whose ``forward`` is :func:`mxfp4_experts_forward`.
    Returns the module (same object).
    """
    if not isinstance(config, MXFP4Config):
        raise TypeError(f"expected an MXFP4Config, got {type(config).__name__}")
    names = expert_projection_names(module)
    if names is None:
        raise TypeError(f"{type(module).__name__} is not a fused experts module (3-D gate_up_proj/up_proj and down_proj)")
    if getattr(module, "is_transposed", False):
        # [E, K, N] storage would quantize along dim -2 and change the parameters' shapes.
        raise NotImplementedError(f"{type(module).__name__} stores transposed expert weights [E, in, out]; not supported")
    for name in names:
        weight = getattr(module, name)
        if isinstance(weight, RotatedMXFP4Tensor):
            raise TypeError(f"{type(module).__name__}.{name} is already MXFP4-quantized; quantize_ it once")
    for name in names:
        quantized = quantize_expert_weights(getattr(module, name), config)
        setattr(module, name, torch.nn.Parameter(quantized, requires_grad=False))
    module.__class__ = _mxfp4_experts_class(type(module))
    return module


def install_mxfp4_experts_class(module: torch.nn.Module) -> torch.nn.Module:
    """Give a fused experts module whose projections were already made :class:`RotatedMXFP4Tensor`
    parameters elsewhere (loaded from a checkpoint, or quantized one projection at a time as
    ``from_pretrained`` reads them) the class :func:`quantize_experts_module` gives: the original class
    with ``forward = mxfp4_experts_forward``. Idempotent; returns the module (same object)."""
    names = expert_projection_names(module)
    if names is None:
        raise TypeError(f"{type(module).__name__} is not a fused experts module (3-D gate_up_proj/up_proj and down_proj)")
    if not any(isinstance(getattr(module, name), RotatedMXFP4Tensor) for name in names):
        raise TypeError(f"{type(module).__name__} has no MXFP4-quantized projection")
    if getattr(module, "is_transposed", False):
        raise NotImplementedError(f"{type(module).__name__} stores transposed expert weights [E, in, out]; not supported")
    if type(module) not in _MXFP4_CLASSES.values():
        module.__class__ = _mxfp4_experts_class(type(module))
    return module


_MXFP4_CLASSES: dict = {}


def _mxfp4_experts_class(cls: type) -> type:
    """``MXFP4<cls>``: ``cls`` with ``forward = mxfp4_experts_forward`` (one subclass per class)."""
    sub = _MXFP4_CLASSES.get(cls)
    if sub is None:
        sub = type(f"MXFP4{cls.__name__}", (cls,), {
            "forward": mxfp4_experts_forward, "extra_repr": _extra_repr, "__reduce_ex__": _reduce_mxfp4_experts,
        })
        _MXFP4_CLASSES[cls] = sub
    return sub


def _reduce_mxfp4_experts(self, protocol):
    # The class is made at run time, so pickle cannot find it by name: pickle the module as its original
    # class plus state, and rebuild the MXFP4 subclass on load (torch.save / torch.load of a whole model).
    return new_mxfp4_experts, (type(self).__mro__[1],), self.__dict__.copy()


def new_mxfp4_experts(original: type) -> torch.nn.Module:
    """An empty instance of ``MXFP4<original>``, for unpickling (its state is set afterwards)."""
    cls = _mxfp4_experts_class(original)
    return cls.__new__(cls)


def _extra_repr(self) -> str:
    parts = [f"num_experts={self.num_experts}"]
    for name in expert_projection_names(self):
        w = getattr(self, name)
        if isinstance(w, RotatedMXFP4Tensor):
            rot = "none" if w.rotation is None else f"{w.rotation.shape[0]}-block"
            parts.append(f"{name}=mxfp4{list(w.shape)}(scale_rule={w.scale_rule}, act={w.act_scale_rule}, rotation={rot})")
    return ", ".join(parts)


# -- forward ------------------------------------------------------------------------------------
class _Routes(NamedTuple):
    """The ``S = T * k`` (token, slot) pairs sorted by expert."""

    perm: torch.Tensor  # [S] position in top_k_index.reshape(-1) of each sorted pair
    expert: torch.Tensor  # [S] expert of each sorted pair, sentinels clamped to E - 1 (for bias gathers)
    valid: Optional[torch.Tensor]  # [S, 1] False for sentinel pairs (id >= E); None: none left (compacted)
    offsets: torch.Tensor  # [E] int32 end row of each expert's group (cumulative counts)


def _route(top_k_index: torch.Tensor, num_experts: int) -> _Routes:
    # Every id >= E is a sentinel (E itself from router passes, larger ones from expert parallelism):
    # clamped to E they sort last and fall outside all groups, so the grouped GEMM skips them.
    ids = top_k_index.reshape(-1).clamp(max=num_experts)
    sorted_ids, perm = torch.sort(ids, stable=True)
    # Counts by scatter_add, not bincount: bincount's output size is data-dependent (breaks fullgraph).
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    counts = counts.scatter_add(0, ids, torch.ones_like(ids, dtype=torch.int32))
    offsets = torch.cumsum(counts[:num_experts], 0, dtype=torch.int32)
    return _Routes(perm, sorted_ids.clamp(max=num_experts - 1), (sorted_ids < num_experts).unsqueeze(-1), offsets)


def _gemm_operands(weight: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(activation operand ``[..., K_p]``, weight operand ``[E, N, K_p]``) of ``x W_e^T``, in the GEMM dtype.

    MXFP4: ``Q_a(x R)`` (padded, rotated, quantized in float32; ``x R`` when weight-only) and ``Q(W R)``
    (cached or decoded), in float32, or bfloat16 for bfloat16 inputs (exact there, see
    :class:`RotatedMXFP4Tensor`). Plain weights: ``x`` cast to the weight's dtype and ``W``.
    """
    if not isinstance(weight, RotatedMXFP4Tensor):
        return x.to(weight.dtype), weight
    # The class's methods called as plain functions: Dynamo inlines those, while a method call on the
    # subclass instance is traced as an opaque tensor method (and fails when it returns a dtype).
    cls = RotatedMXFP4Tensor
    dtype = cls.gemm_dtype(weight, x.dtype)
    xr = cls.transform_input(weight, x)
    w = weight.dequantized if weight.dequantized is not None else cls.dequantize(weight, dtype)
    return xr.to(dtype), w.to(dtype)


def grouped_gemm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Kernel boundary: ``y[s] = x[s] @ weight[e(s)]^T`` for rows grouped by expert (``offsets[e]`` is the
    end of expert ``e``'s rows); rows at or past ``offsets[-1]`` are undefined.

    transformers' grouped-mm dispatcher (``torch.nn.functional.grouped_mm`` where the device/dtype/compile
    combination supports it, else its opaque per-expert custom op), i.e. what its grouped_mm backend runs.
    """
    # transformers' private dispatcher: the one function its grouped_mm backend runs (imported here so
    # that importing this module does not import transformers).
    from transformers.integrations.moe import _grouped_mm

    return _grouped_mm(x, weight.transpose(-2, -1), offsets)


def _expert_projection(weight, bias, x_rows, routes: _Routes, out_dtype) -> torch.Tensor:
    """One projection for the sorted pair rows ``x_rows`` (already GEMM operands), sentinel rows zeroed."""
    y = grouped_gemm(x_rows, weight, routes.offsets)
    if bias is not None:
        y = y + bias[routes.expert].to(y.dtype)
    if routes.valid is None:
        return y.to(out_dtype)
    # where, not multiply: the undefined sentinel rows may hold NaN/Inf.
    return torch.where(routes.valid, y, 0.0).to(out_dtype)


def mxfp4_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts backend (transformers' signature): ``[T, H]``, ``[T, k]`` expert ids, ``[T, k]`` routing
    weights -> ``[T, H]`` (math in the module docstring). Works for MXFP4 and for plain expert weights."""
    return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    observe: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """:func:`mxfp4_experts_forward`, optionally showing each projection's input rows to ``observe``.

    ``observe(p, rows, offsets)`` is called once per projection ``p`` (0: the first, 1: ``down_proj``)
    with that projection's input rows ``[S, K]`` (``S = T * k``, before any cast, rotation or
    quantization: the hidden states of the routed tokens for ``p = 0``, ``act(gate) * up`` for ``p = 1``)
    sorted by expert, and ``offsets [E]``: expert ``e``'s rows are ``rows[offsets[e-1]:offsets[e]]``
    (``offsets[-1] = 0``); the sentinel rows (slot id >= E) come after ``offsets[E-1]``. GPTQ's
    calibration of fused experts uses it (:mod:`torchao_mx_ext.calibration.gptq`).
    """
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    first = self.gate_up_proj if has_gate else self.up_proj
    first_bias = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    routes = _route(top_k_index, self.num_experts)
    compact = False
    if not torch.compiler.is_compiling():
        # Eager: drop the pruned (sentinel) pairs, which sort last, so no pass over the hidden rows
        # touches them and pruning saves its share of every step; on CPU always, since summing the
        # pairs with index_add_ is also cheaper than the static-shape combination below (CUDA keeps
        # that when nothing is pruned: its index_add_ is not deterministic). Compiled code keeps
        # static shapes.
        valid_pairs = int(routes.offsets[-1])
        if valid_pairs < routes.perm.numel() or hidden_states.device.type == "cpu":
            compact = True
            routes = _Routes(routes.perm[:valid_pairs], routes.expert[:valid_pairs], None, routes.offsets)

    token = routes.perm // top_k  # the token of each sorted pair
    if observe is not None:
        observe(0, hidden_states[token], routes.offsets)
    # Rotate + quantize each token once, then gather its rows for the experts it visits.
    x, w = _gemm_operands(first, hidden_states)
    h = _expert_projection(w, first_bias, x[token], routes, hidden_states.dtype)
    if has_gate:
        h = self._apply_gate(h) if hasattr(self, "_apply_gate") else _gate(self.act_fn, h)
    else:
        h = self.act_fn(h)
    if observe is not None:
        observe(1, h, routes.offsets)
    x, w = _gemm_operands(self.down_proj, h)
    y = _expert_projection(w, self.down_proj_bias if has_bias else None, x, routes, hidden_states.dtype)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)

    # Weight each pair, put the pairs back in (token, slot) order and sum the slots (in float32, in a
    # fixed order: deterministic, unlike index_add_ on CUDA).
    p = top_k_weights.reshape(-1)[routes.perm].unsqueeze(-1)
    if compact:  # every pair is valid; tokens sum their pairs in expert order (CPU index_add_ is sequential)
        out = torch.zeros(num_tokens, hidden_dim, dtype=torch.float32, device=hidden_states.device)
        return out.index_add_(0, token, y.float() * p.float()).to(hidden_states.dtype)
    y = torch.where(routes.valid, y.float() * p.float(), 0.0)
    y = torch.zeros_like(y).index_copy(0, routes.perm, y)
    return y.view(num_tokens, top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _gate(act_fn, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def register_experts_backend() -> None:
    """Make :func:`mxfp4_experts_forward` selectable model-wide in transformers:
    ``model.set_experts_implementation("torchao_mx_ext")``. Done by ``import torchao_mx_ext`` as soon as
    transformers' experts registry is imported (:mod:`torchao_mx_ext.registration`); idempotent."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_BACKEND, mxfp4_experts_forward)


# The quantize_ handler of MXFP4Config calls quantize_experts_module for fused experts modules.
register_module_quantizer("fused_experts", quantize_experts_module)
