"""Hand-written kernels behind a small boundary: each module says when it applies (``applies``) and
the emulation runs otherwise. Nothing here is needed for correctness.

- ``cpu_mxfp4_gemv``: CPU dequant-GEMV for small batches (decode), a C++ custom op with a fake kernel.
- ``cuda_mxfp4_mm``: MXFP4 tensor-core GEMM on Blackwell GPUs (``F.scaled_mm``), opt-in.
"""

from . import cpu_mxfp4_gemv, cuda_mxfp4_mm

__all__ = ["cpu_mxfp4_gemv", "cuda_mxfp4_mm"]
