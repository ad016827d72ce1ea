"""The tensors an export writes, shared by every format."""

from typing import Dict

import torch

from ..shared_quant import per_linear_state_dict

__all__ = ["export_state"]


def export_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors to write, by HF name: per-linear weights (also in shared-input mode), no rotary
    ``inv_freq`` buffers, and no output head tied to the input embedding (a checkpoint holds one copy;
    engines reuse the embedding, llama.cpp its ``token_embd``)."""
    state = per_linear_state_dict(model)
    state = {k: v for k, v in state.items() if not k.endswith(".rotary_emb.inv_freq")}
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if callable(get_in) and callable(get_out):
        emb, head = get_in(), get_out()
        if emb is not None and head is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0):
            for name, module in model.named_modules():
                if module is head:
                    state.pop(f"{name}.weight", None)
    return state
