"""Prefill and decode wall time of a causal LM (CPU or GPU), measured the same way for every method."""

import time
from typing import Dict

import torch

from .generation import greedy_token


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_decode_time(model: torch.nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 16, repeats: int = 1) -> Dict[str, float]:
    """Greedy generation with the model's KV cache, timed per phase: ``prefill_s`` (one forward over the
    prompt ``[1, L]``) and ``decode_ms_per_token`` (mean of ``new_tokens`` one-token steps). The fastest of
    ``repeats`` runs is kept (less noise from other processes)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = model(prompt_ids, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        cache, token = out.cache, greedy_token(out.logits)
        for _ in range(new_tokens):
            out = model(token, cache=cache, use_cache=True)
            cache, token = out.cache, greedy_token(out.logits)
        _sync(device)
        t2 = time.perf_counter()
        best_prefill = min(best_prefill, t1 - t0)
        best_decode = min(best_decode, (t2 - t1) / new_tokens)
    return {"prefill_s": best_prefill, "decode_ms_per_token": 1000 * best_decode, "prompt_tokens": prompt_ids.shape[1], "new_tokens": new_tokens}
