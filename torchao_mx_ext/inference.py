"""Inference-time modes for models quantized with our configs: the dequantized-weight cache, and a
quantized output head (:func:`quantize_output_head`, int8 or MXFP4 weight-only)."""

import torch
import torch.nn.functional as F

from .kernels import cpu_int8_gemv
from .rotation.fusion import untie_embeddings
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


class Int8WeightOnlyLinear(torch.nn.Module):
    """``y = x (s * Q)^T + b`` with ``Q`` int8 ``[N, K]`` and one float scale per output row ``s [N]``.

    Symmetric per-row int8 (``s = max|W_n| / 127``, ``Q = round(W / s)``, round half to even), the
    weight-only scheme of gpt-fast's and llama.cpp's 8-bit rows: the rounding error of an element is at
    most ``max|W_n| / 254``, so logits move by far less than any 4-bit head would move them. On CPU the
    product reads the int8 codes directly: our ``int8_gemv`` kernel on AVX2 and AVX-512 CPUs
    (:mod:`.kernels.cpu_int8_gemv`), ATen's ``_weight_int8pack_mm`` on the others; elsewhere the weight
    is decoded and ``F.linear`` runs. Both are custom/ATen ops that compiled graphs call as one kernel.
    ``scales`` is a floating buffer, so ``.to(dtype)`` moves it with the model (the CPU kernel wants the
    activation's dtype; inputs of another dtype are cast to it).
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias=None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != (qweight.shape[0],):
            raise ValueError(f"need an int8 [N, K] weight and [N] scales, got {qweight.dtype} {tuple(qweight.shape)} and {tuple(scales.shape)}")
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Int8WeightOnlyLinear":
        w = linear.weight.detach()
        if not w.is_floating_point() or not bool(torch.isfinite(w).all()):
            raise ValueError("int8 quantization needs a finite floating-point weight (NaN/Inf found, or not floating point)")
        w = w.to(torch.float32)
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # all-zero rows: codes 0, any scale
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scale.to(linear.weight.dtype), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_int8_gemv.applies(x, self.qweight):
            return cpu_int8_gemv.int8_gemv(x, self.qweight, self.scales, self.bias)
        if x.device.type == "cpu" and self.scales.dtype in (torch.float32, torch.bfloat16, torch.float16):
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(self.scales.dtype), self.qweight, self.scales)
            y = y.reshape(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.to(x.dtype)
        w = self.qweight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only, per-row scales"


def quantize_output_head(model: torch.nn.Module, config="int8") -> torch.nn.Module:
    """Quantize the output head (``lm_head``) weight-only, a decode-speed option.

    Every recipe keeps the head in high precision (``architectures.high_precision_modules``): its error
    lands on the logits directly. At batch 1 it is also the largest single GEMV of a small decoder
    (SmolLM2-135M: 49152 x 576, about a seventh of a compiled decode step in bf16), so reading fewer
    bytes per weight there is the lever left on the head. Two schemes, their perplexity cost measured
    in ``docs/results.md``:

    - ``"int8"`` (default): :class:`Int8WeightOnlyLinear`, per-row symmetric int8 (8 bits + a scale per
      row), close to lossless;
    - an :class:`~torchao_mx_ext.configs.MXFP4Config` / ``MXFP4BlockRotConfig`` with ``act_quant=False``:
      MXFP4 weight-only through ``quantize_`` (4.25 bits; faster still, at a real perplexity cost).

    A head tied to the input embedding (``tie_word_embeddings``) is untied first: the embedding keeps
    its high-precision table, the head gets its own quantized copy, and the model's config records
    ``tie_word_embeddings=False``. A refused quantization leaves the model as it was.

    Checkpoints (``save_pretrained``) keep the head in high precision by design, so a model with a
    quantized head refuses to be saved with a clear error rather than losing it silently: quantize the
    head after loading.
    """
    from torchao.quantization import quantize_

    from .configs import MXFP4Config

    if not (config == "int8" or isinstance(config, MXFP4Config)):
        raise TypeError(f"config must be 'int8' or an MXFP4Config (or MXFP4BlockRotConfig), got {config!r}")
    if isinstance(config, MXFP4Config) and config.act_quant:
        raise ValueError("the output head is quantized weight-only: pass a config with act_quant=False")
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if is_quantized_head(head):
        raise ValueError("the output head is already quantized")
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"the model has no nn.Linear output head (get_output_embeddings() gave {type(head).__name__})")
    if config == "int8":
        quantized = Int8WeightOnlyLinear.from_linear(head)  # checks the weight first
        model.set_output_embeddings(quantized)
        untie_embeddings(model)  # the new head shares nothing: only the config records the untie
        return model
    original = head.weight
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    flags = (model.config.tie_word_embeddings, text.tie_word_embeddings)
    untie_embeddings(model)
    try:
        quantize_(model, config, filter_fn=lambda module, fqn: module is head)
    except BaseException:
        # quantize_ refused (e.g. NaN weights): tied again, as it was
        head.weight = original
        model.config.tie_word_embeddings, text.tie_word_embeddings = flags
        raise
    return model


def is_quantized_head(module) -> bool:
    """Whether ``module`` is an output head :func:`quantize_output_head` quantized."""
    return isinstance(module, Int8WeightOnlyLinear) or isinstance(getattr(module, "weight", None), RotatedMXFP4Tensor)
