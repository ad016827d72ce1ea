"""Model-level rotations fused into the weights of Llama-family decoders (QuaRot / SpinQuant / BRQ).

For a pre-norm decoder with residual stream ``h`` (QuaRot, arXiv 2404.00456):

1. Fold each RMSNorm's weight ``g`` into the linears that read it (``W <- W diag(g)``, ``g <- 1``),
   so the norm is ``x / rms(x)``, which commutes with any orthogonal ``R`` (``rms(x R) = rms(x)``).
2. Untie the embeddings from ``lm_head`` (they get different rotations).
3. R1 on the residual stream: embeddings ``E <- E R1``; readers of the stream (q/k/v, gate/up,
   lm_head) ``W <- W R1``; writers (o_proj, down_proj) ``W <- R1^T W``, ``b <- b R1``.
4. R2 per attention head between v_proj and o_proj: ``W_v[head] <- R2^T W_v[head]`` (and its bias),
   ``W_o[:, head] <- W_o[:, head] R2``. One R2 for all heads (grouped-query heads share v).
5. R4 before down_proj is online (the activation is rotated at run time): it is not fused here but
   given to down_proj's quantization as its rotation (see ``recipes.py``).

The full-precision model computes the same function after steps 1-4 (up to float rounding).

Global rotations (QuaRot) use full-width randomised Hadamards; BRQ (arXiv 2511.04214) makes every
rotation block-diagonal with 32-wide Hadamard blocks, so no rotation mixes values across MX blocks.

Families (``SUPPORTED_ARCHITECTURES``) differ only in ways the steps above absorb:

- Phi-3 fuses the readers: ``qkv_proj`` (output rows ``q | k | v``) and ``gate_up_proj`` (rows
  ``gate | up``). R1 and the norm folding act on their input columns, so fused or not makes no
  difference; R2 acts on the ``v`` rows of ``qkv_proj`` only.
- Granite scales the embeddings, each residual write, the attention logits and the logits by scalars
  (``embedding_multiplier``, ``residual_multiplier``, ``attention_multiplier``, ``logits_scaling``); a
  scalar commutes with any matrix (``(c h) R1 = c (h R1)``), and q.k is unchanged by R1 anyway.
- Gemma's RMSNorm scales by ``1 + w`` (stored weights are zero-centred): folding folds ``1 + w`` and
  sets ``w = 0``. Its embeddings are scaled by ``sqrt(hidden)``, a scalar.
- Qwen3's per-head q/k norms sit on the outputs of q_proj and k_proj, which R1 leaves unchanged
  (``x R1 (W R1)^T = x W^T``) and R2 never touches (it acts on v and o only), so they stay as they are.

Gemma 2 and 3 are refused (``UNFUSABLE_ARCHITECTURES`` says why): their post-sublayer norms scale the
sublayer outputs per channel right before the residual add, which no residual rotation passes exactly.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..architectures import (  # noqa: F401 (re-exported)
    SUPPORTED_ARCHITECTURES, UNFUSABLE_ARCHITECTURES, check_supported, decoder_layers,
)
from .rotations import orthogonal_block

# Families whose RMSNorm scales by ``offset + weight`` rather than by ``weight``.
NORM_WEIGHT_OFFSETS = {"GemmaForCausalLM": 1.0}


@dataclass
class FusedRotations:
    """What was fused: R1 (``d x d``) and one R2 (``head_dim x head_dim``) per layer, float64."""

    r1: torch.Tensor
    r2: List[torch.Tensor]


def block_diagonal(name: str, width: int, block: Optional[int], seed: int) -> torch.Tensor:
    """A ``width x width`` float64 orthogonal matrix: one ``block``-wide rotation repeated on the
    diagonal (``block=None``: a single full-width rotation)."""
    size = width if block is None else min(block, width)
    if width % size:
        raise ValueError(f"width {width} is not a multiple of the rotation block {size}")
    base = orthogonal_block(name, size, seed)
    return torch.block_diag(*([base] * (width // size)))


def norm_weight_offset(model: torch.nn.Module) -> float:
    """``c`` such that ``model``'s RMSNorms compute ``x / rms(x) * (c + weight)``: 1 for Gemma, else 0."""
    return NORM_WEIGHT_OFFSETS.get(type(model).__name__, 0.0)


def attention_readers(attn: torch.nn.Module) -> List[torch.nn.Linear]:
    """The linears reading the attention input: Phi-3's fused ``qkv_proj``, or q/k/v_proj."""
    fused = getattr(attn, "qkv_proj", None)
    return [fused] if fused is not None else [attn.q_proj, attn.k_proj, attn.v_proj]


def mlp_readers(mlp: torch.nn.Module) -> List[torch.nn.Linear]:
    """The linears reading the MLP input: Phi-3's fused ``gate_up_proj``, or gate/up_proj."""
    fused = getattr(mlp, "gate_up_proj", None)
    return [fused] if fused is not None else [mlp.gate_proj, mlp.up_proj]


def value_rows(attn: torch.nn.Module, head_dim: int) -> Tuple[torch.nn.Linear, slice]:
    """The linear computing v and the rows of its weight that do: all of ``v_proj``, or the last
    ``kv_heads * head_dim`` rows of a fused ``qkv_proj`` (rows ``q | k | v``, k and v equally wide,
    q as wide as o_proj's input)."""
    fused = getattr(attn, "qkv_proj", None)
    if fused is None:
        return attn.v_proj, slice(0, attn.v_proj.out_features)
    rows, q_rows = fused.out_features, attn.o_proj.in_features
    kv_rows, odd = divmod(rows - q_rows, 2)
    if odd or kv_rows <= 0 or kv_rows % head_dim:
        raise ValueError(f"qkv_proj has {rows} rows: not q ({q_rows}) plus k and v of whole {head_dim}-wide heads")
    return fused, slice(rows - kv_rows, rows)


@torch.no_grad()
def fold_rms_norms(model: torch.nn.Module) -> None:
    """Fold every RMSNorm's scale into the linears that read its output and make the norm unscaled.

    A norm computes ``x / rms(x) * s`` with ``s = c + w`` (:func:`norm_weight_offset`); a reader computes
    ``y W^T``, so ``W <- W diag(s)`` and ``w <- 1 - c`` (``s = 1``: Llama ``w = 1``, Gemma ``w = 0``)
    leave the model's function unchanged. Tied embeddings must be untied first (``lm_head`` is folded).
    """
    check_supported(model)
    offset = norm_weight_offset(model)

    def fold(norm, linears):
        s = offset + norm.weight.detach().to(torch.float64)
        for lin in linears:
            lin.weight.copy_((lin.weight.to(torch.float64) * s).to(lin.weight.dtype))
        norm.weight.fill_(1.0 - offset)

    for layer in decoder_layers(model, "model-level rotation"):
        fold(layer.input_layernorm, attention_readers(layer.self_attn))
        fold(layer.post_attention_layernorm, mlp_readers(layer.mlp))
    fold(model.model.norm, [model.lm_head])


@torch.no_grad()
def untie_embeddings(model: torch.nn.Module) -> None:
    """Give the output head its own copy of a weight it shares with the input embedding (a head with a
    weight of its own, or a replaced head with none, keeps it), and record ``tie_word_embeddings=False``
    on the model's config (and its text config), so nothing ties them again."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and (weight is emb.weight or weight.data_ptr() == emb.weight.data_ptr()):
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _rotate_input(lin: torch.nn.Linear, r: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.to(torch.float64) @ r).to(lin.weight.dtype))


def _rotate_output(lin: torch.nn.Linear, r: torch.Tensor, rows: slice = slice(None)) -> None:
    """Rotate the output rows ``rows`` of ``lin`` (all by default):
    ``W[rows] <- r^T W[rows]``, ``b[rows] <- b[rows] r``."""
    w = lin.weight[rows]  # a view: copy_ writes into lin.weight
    w.copy_((r.T @ w.to(torch.float64)).to(w.dtype))
    if lin.bias is not None:
        b = lin.bias[rows]
        b.copy_((b.to(torch.float64) @ r).to(b.dtype))


@torch.no_grad()
def fuse_rotations(
    model: torch.nn.Module, r1: torch.Tensor, r2: Union[torch.Tensor, Sequence[torch.Tensor]]
) -> FusedRotations:
    """Fold norms, untie embeddings, and fuse R1 (residual) and R2 (per head) into the weights.

    ``r1`` is ``hidden x hidden``; ``r2`` is one ``head_dim x head_dim`` matrix for every layer or a
    sequence of one per layer (DartQuant learns them per layer); all orthogonal.
    """
    check_supported(model)
    hidden = model.config.hidden_size
    head_dim = head_dim_of(model)
    layers = decoder_layers(model, "model-level rotation")
    r2s = [r2] * len(layers) if isinstance(r2, torch.Tensor) else list(r2)
    if len(r2s) != len(layers):
        raise ValueError(f"expected one R2 per layer ({len(layers)}), got {len(r2s)}")
    if r1.shape != (hidden, hidden) or any(r.shape != (head_dim, head_dim) for r in r2s):
        shapes = sorted({tuple(r.shape) for r in r2s})
        raise ValueError(f"expected R1 {hidden}x{hidden} and R2 {head_dim}x{head_dim}, got {tuple(r1.shape)}, {shapes}")
    r1 = r1.to(torch.float64)
    r2s = [r.to(torch.float64) for r in r2s]
    untie_embeddings(model)
    fold_rms_norms(model)
    emb = model.model.embed_tokens
    emb.weight.copy_((emb.weight.to(torch.float64) @ r1).to(emb.weight.dtype))
    for layer, r2 in zip(layers, r2s):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in attention_readers(attn) + mlp_readers(mlp):
            _rotate_input(lin, r1)
        for lin in (attn.o_proj, mlp.down_proj):
            _rotate_output(lin, r1)
        # R2: v rows are [kv_heads * head_dim]; o columns are [heads * head_dim].
        v_lin, v_rows = value_rows(attn, head_dim)
        n_kv = (v_rows.stop - v_rows.start) // head_dim
        _rotate_output(v_lin, torch.block_diag(*([r2] * n_kv)), v_rows)
        n_heads = attn.o_proj.weight.shape[1] // head_dim
        _rotate_input(attn.o_proj, torch.block_diag(*([r2] * n_heads)))
    _rotate_input(model.lm_head, r1)
    return FusedRotations(r1=r1, r2=r2s)


def head_dim_of(model: torch.nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
