"""Facts about model structure that several layers need, each decided in one place.

- :data:`SUPPORTED_ARCHITECTURES` / :func:`check_supported`: the decoders model-level rotation fusion
  knows (per-linear rotations work on any model); :data:`UNFUSABLE_ARCHITECTURES`: decoders it refuses
  because no residual-stream rotation can be fused into them exactly, each with the reason.
- :func:`decoder_layers`: the decoder layers of a Hugging Face causal LM (``model.model.layers``), for
  everything that walks a model layer by layer (sequential GPTQ, QESC, rotation fusion, regional compile).
- :func:`expert_projection_names`: the layout of transformers 5.x fused MoE experts (one module, 3-D
  ``gate_up_proj [E, 2I, H]`` or ``up_proj``, and ``down_proj [E, H, I]``), which a tool walking
  ``nn.Linear`` would skip silently.
- :func:`high_precision_modules`: the modules no recipe quantizes. For a transformers model that is the
  output embedding (``get_output_embeddings()``, i.e. ``lm_head``) and the model's own
  ``_keep_in_fp32_modules`` / ``_keep_in_fp32_modules_strict``, the rule of transformers' quantizers
  (``get_keys_to_not_convert``) restricted to modules that are linears; for any other module, a child
  named ``lm_head``. W4A4 recipes keep the output head in high precision: its error lands directly on
  the logits.

Pure torch and duck typing: nothing here imports transformers.
"""

from typing import Optional, Set, Tuple

import torch

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "UNFUSABLE_ARCHITECTURES",
    "check_supported",
    "decoder_layers",
    "expert_projection_names",
    "high_precision_modules",
    "is_high_precision",
]

# Decoders whose layout model-level rotation fusion (rotation/fusion.py) knows: pre-norm decoders whose
# every RMSNorm is read only by linears (q/k/v or a fused qkv_proj, gate/up or a fused gate_up_proj, lm_head).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Phi3ForCausalLM", "GraniteForCausalLM", "GemmaForCausalLM",
)

# Gemma 2 and 3 write ``post_norm(y) = y / rms(y) * (1 + w)`` (y: the o_proj or down_proj output) to the
# residual stream. With the stream rotated (``h -> h R1``) that write must become ``post_norm(y) R1``,
# and all fusion can change is what feeds the norm (``y -> y M``) and its weight (``w -> w'``). Asking
# ``y M / rms(y M) * (1 + w') = y / rms(y) * (1 + w) R1`` for all y forces ``M diag(1 + w') = diag(1 + w) R1``
# and ``rms(y M) = rms(y)`` (a linear map sending every y to a multiple of itself is a multiple of the
# identity; the norm's eps fixes the multiple), so M is orthogonal and ``R1 diag(1 + w')^-2 R1^T =
# diag(1 + w)^-2``: R1 may only map channels onto channels of equal |1 + w|. With trained per-channel
# weights that leaves signed permutations, which mix nothing. (The head-wise R2 alone would be exact: it
# never touches the stream.)
_POST_NORM_REASON = (
    "its post-sublayer RMSNorms (post_attention_layernorm, post_feedforward_layernorm) scale each "
    "sublayer's output per channel, by 1 + w, just before the residual add, with no linear after them: "
    "a residual-stream rotation R1 would have to commute with diag(1 + w) up to an orthogonal change of "
    "the sublayer's output, which only (signed) permutations do when the weights differ per channel"
)
UNFUSABLE_ARCHITECTURES = {"Gemma2ForCausalLM": _POST_NORM_REASON, "Gemma3ForCausalLM": _POST_NORM_REASON}


def check_supported(model: torch.nn.Module) -> None:
    """Raise unless model-level rotation fusion (QuaRot/BRQ/DartQuant) knows ``model``'s layout; for a
    decoder it cannot rotate exactly (:data:`UNFUSABLE_ARCHITECTURES`) the error says why."""
    name = type(model).__name__
    if name in UNFUSABLE_ARCHITECTURES:
        raise NotImplementedError(
            f"model-level rotation cannot be fused exactly into {name}: {UNFUSABLE_ARCHITECTURES[name]}. "
            "Per-linear rotations (MXFP4BlockRotConfig) work on any model."
        )
    if name not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"model-level rotation supports {', '.join(SUPPORTED_ARCHITECTURES)}; got {name}. "
            "Per-linear rotations (MXFP4BlockRotConfig) work on any model."
        )


def decoder_layers(model: torch.nn.Module, purpose: str = "layer-by-layer processing") -> torch.nn.ModuleList:
    """``model.model.layers`` of a Llama-family (or MoE) HF causal LM; a clear error for other models."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise NotImplementedError(
            f"{purpose} needs a decoder with model.model.layers (Llama-family HF models); got {type(model).__name__}"
        )
    return layers


def expert_projection_names(module: torch.nn.Module) -> Optional[Tuple[str, str]]:
    """``(first, second)`` projection parameter names of a fused experts module (``("gate_up_proj",
    "down_proj")``, or ``("up_proj", "down_proj")`` without a gate), ``None`` for any other module."""
    first = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    weights = [getattr(module, name, None) for name in (first, "down_proj")]
    if hasattr(module, "num_experts") and all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights):
        return first, "down_proj"
    return None


def high_precision_modules(model: torch.nn.Module) -> Set[str]:
    """Fully qualified names of the modules every recipe leaves unquantized (see the module docstring)."""
    names = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    )
    for fqn, module in model.named_modules():
        if (head is not None and module is head) or (head is None and fqn.rpartition(".")[2] == "lm_head"):
            names.add(fqn)
        elif fqn and any(fqn == k or fqn.endswith("." + k) or k in fqn.split(".") for k in keep):
            names.add(fqn)
    return names


def is_high_precision(model: torch.nn.Module, fqn: str) -> bool:
    """Whether the module ``fqn`` of ``model`` stays unquantized (:func:`high_precision_modules`)."""
    return fqn in high_precision_modules(model)
