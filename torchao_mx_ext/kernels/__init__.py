"""Hand-written kernels behind a small boundary: each module says when it applies and falls back
(with one log line) when it cannot be built. Nothing here is needed for correctness."""

from . import cpu_mxfp4_gemv

__all__ = ["cpu_mxfp4_gemv"]
