"""Hand-written kernels behind a small boundary. Which one a weight uses is its ``kernel_preference``
(a config field, stored on the tensor and in checkpoints); each kernel module says when it can run
(``applies``) and the float emulation runs otherwise. Nothing here is needed for correctness.

- ``cpu_mxfp4_gemv``: CPU dequant-GEMV for small batches of weight-only linears, a C++ custom op with
  a fake kernel.
- ``cpu_mxfp4_mm``: exact MXFP4 x MXFP4 GEMM for W4A4 linears on CPU, on int8 dot products (AVX2, AVX-512 VNNI).
- ``cpu_mxfp4_dequantize``: CPU decode of MXFP4 codes into a dense bfloat16 / float32 tensor, bit-equal
  to the pure-torch one, for many-row linears that hand the decoded weight to oneDNN/MKL.
- ``cpu_mxfp4_quantize``: CPU quantize-dequantize of the activations in one pass (AVX-512), what W4A4
  linears run before their GEMM there.
- ``cpu_int8_gemv``: CPU int8 weight-only GEMV, the product of the int8 output head
  (``quantize_output_head``).
- ``cpu_decode_attention``: CPU attention for a few query rows (GQA-packed decode steps).
- ``cpu_prompt_attention``: CPU attention for prompts (AVX-512 without AMX), flash-style.
- ``cpu_extension``: builds the C++ CPU kernels (one library) on first use.
- ``cuda_mxfp4_mm``: MXFP4 tensor-core GEMM on Blackwell GPUs (``F.scaled_mm``).

Preferences (:data:`KERNEL_PREFERENCES`):

- ``auto``: on CPU, the integer W4A4 GEMM or the dequant-GEMV where they apply (same numbers as the
  emulation up to float32 summation order), the emulation elsewhere. The environment variable ``TORCHAO_MX_EXT_HW_MXFP4=1``
  overrides it with ``hw_mxfp4``.
- ``emulated``: the float emulation only (the reference numbers).
- ``hw_mxfp4``: Blackwell MXFP4 tensor cores where the GPU has them (their accumulation order and
  bfloat16 output rounding differ from the emulation), else as ``auto``.
"""

import os

import torch

from . import cpu_decode_attention, cpu_extension, cpu_int8_gemv, cpu_mxfp4_dequantize, cpu_mxfp4_gemv, cpu_mxfp4_mm, cpu_mxfp4_quantize, cpu_prompt_attention, cuda_mxfp4_mm

__all__ = ["CPU_NATIVE_BF16_GEMM", "KERNEL_PREFERENCES", "check_kernel_preference", "cpu_decode_attention", "cpu_extension", "cpu_int8_gemv", "cpu_mxfp4_dequantize", "cpu_mxfp4_gemv", "cpu_mxfp4_mm", "cpu_mxfp4_quantize", "cpu_prompt_attention", "cuda_mxfp4_mm", "effective_preference"]

KERNEL_PREFERENCES = ("auto", "emulated", "hw_mxfp4")


def _cpu_native_bf16_gemm() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume bf16 is fine, as before
        return True


# Whether oneDNN has bfloat16 GEMM instructions on this CPU (AVX-512 BF16, AMX). Without them (AVX2
# CPUs) a bfloat16 GEMM is emulated and runs several times slower than a float32 one, so the dense
# GEMMs of the emulation run in float32 there (same operands, exact in float32; both accumulate in
# float32). Read once at import: compiled graphs see a constant.
CPU_NATIVE_BF16_GEMM = _cpu_native_bf16_gemm()


def check_kernel_preference(preference) -> None:
    if preference not in KERNEL_PREFERENCES:
        raise ValueError(f"kernel_preference must be one of {', '.join(KERNEL_PREFERENCES)}, got {preference!r}")


def effective_preference(preference: str) -> str:
    """The preference after the environment's override (read at call time, so a process can opt in)."""
    if preference == "auto" and os.environ.get(cuda_mxfp4_mm.ENV_FLAG, "0") == "1":
        return "hw_mxfp4"
    return preference
