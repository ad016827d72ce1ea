"""Inference-time modes for models quantized with our configs."""

import torch

from .tensors import RotatedMXFP4Tensor


def quantized_weights(model: torch.nn.Module):
    """``(module, name, weight)`` for every :class:`RotatedMXFP4Tensor` parameter of ``model``."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(param, RotatedMXFP4Tensor):
                yield module, name, param


def cache_dequantized_weights(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Keep each quantized weight's ``Q(W R)`` decoded, in its GEMM dtype, next to its codes.

    Decoding packed FP4 on every call costs more than the matmul on CPUs (each call writes a fresh
    dense weight); with the cache a large batch (prefill) is the activation's rotate+quantize kernel
    plus a dense GEMM, at the memory cost of a dense weight. Small CPU batches (decode steps, at most
    ``kernels.cpu_mxfp4_gemv.MAX_ROWS_CACHED`` rows) keep using the fused dequant-GEMV on the packed codes,
    which reads a quarter of the cache's bytes. Numbers are unchanged. Checkpoints never store the
    cache (``hf/serialization.py``); ``enabled=False`` drops it from memory.
    """
    found = False
    for module, name, weight in list(quantized_weights(model)):
        setattr(module, name, torch.nn.Parameter(weight.with_dequantized_cache(enabled), requires_grad=False))
        found = True
    if not found:
        raise ValueError("the model has no MXFP4-quantized weights; run quantize_ with an MXFP4 config first")
    return model
