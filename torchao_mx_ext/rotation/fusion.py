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
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from ..architectures import SUPPORTED_ARCHITECTURES, check_supported, decoder_layers  # noqa: F401 (re-exported)
from .rotations import orthogonal_block



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


@torch.no_grad()
def fold_rms_norms(model: torch.nn.Module) -> None:
    """Fold every RMSNorm weight into the linears that read its output, and set it to ones."""
    check_supported(model)

    def fold(norm, linears):
        g = norm.weight.detach().to(torch.float64)
        for lin in linears:
            lin.weight.copy_((lin.weight.to(torch.float64) * g).to(lin.weight.dtype))
        norm.weight.fill_(1.0)

    for layer in decoder_layers(model, "model-level rotation"):
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    fold(model.model.norm, [model.lm_head])


@torch.no_grad()
def untie_embeddings(model: torch.nn.Module) -> None:
    emb, head = model.model.embed_tokens, model.lm_head
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _rotate_input(lin: torch.nn.Linear, r: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.to(torch.float64) @ r).to(lin.weight.dtype))


def _rotate_output(lin: torch.nn.Linear, r: torch.Tensor) -> None:
    lin.weight.copy_((r.T @ lin.weight.to(torch.float64)).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.to(torch.float64) @ r).to(lin.bias.dtype))


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
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _rotate_input(lin, r1)
        for lin in (attn.o_proj, mlp.down_proj):
            _rotate_output(lin, r1)
        # R2: v rows are [kv_heads * head_dim]; o columns are [heads * head_dim].
        n_kv = attn.v_proj.weight.shape[0] // head_dim
        per_head_v = torch.block_diag(*([r2] * n_kv))
        _rotate_output(attn.v_proj, per_head_v)
        n_heads = attn.o_proj.weight.shape[1] // head_dim
        _rotate_input(attn.o_proj, torch.block_diag(*([r2] * n_heads)))
    _rotate_input(model.lm_head, r1)
    return FusedRotations(r1=r1, r2=r2s)


def head_dim_of(model: torch.nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
