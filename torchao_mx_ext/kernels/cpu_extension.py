"""The C++ CPU kernels, built once per process from the sources beside this file.

``mxfp4_gemv.cpp`` (weight-only dequant-GEMV, :mod:`.cpu_mxfp4_gemv`), ``mxfp4_mm.cpp`` (exact
integer W4A4 GEMM, :mod:`.cpu_mxfp4_mm`), the decode and quantize kernels and ``int8_gemv.cpp`` (the
int8 output head, :mod:`.cpu_int8_gemv`) and ``decode_attention.cpp`` (:mod:`.cpu_decode_attention`) are
compiled into one library with
``torch.utils.cpp_extension`` (needs a C++ compiler and ninja; the ``ninja`` PyPI package is a
dependency) on the first call of either operator, and reused from torch's extension cache afterwards.
The operators themselves (schemas, fake kernels, pure-torch fallbacks) are defined in Python by the
kernel modules, so nothing depends on this build succeeding: if it fails (no compiler, no ninja) one
warning is logged and both kernels stay off. ``TORCHAO_MX_EXT_CPU_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

__all__ = ["AMX", "ATEN_AVX512", "AVX512_VNNI", "DISABLE_ENV", "VECTORIZED", "is_available", "known_unavailable"]

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(f) for f in ("mxfp4_gemv.cpp", "mxfp4_mm.cpp", "mxfp4_dequantize.cpp", "mxfp4_fake_quantize.cpp", "int8_gemv.cpp",
                                                   "decode_attention.cpp", "prompt_attention.cpp", "decoder_step.cpp")]
_HEADERS = [Path(__file__).with_name(f) for f in ("cpu_isa.h", "mxfp4_codes.h", "mxfp4_fake_quantize.h", "mxfp4_panels.h", "cpu_ops.h")]
_EXTENSION_NAME = "torchao_mx_ext_cpu_kernels"
# The ops with a CPU kernel in the library (one per source at least): it is loaded once all of them have one.
_OPS = ("torchao_mx_ext::mxfp4_gemv", "torchao_mx_ext::mxfp4_gemv_group", "torchao_mx_ext::mxfp4_mm", "torchao_mx_ext::mxfp4_dequantize", "torchao_mx_ext::mxfp4_fake_quantize",
        "torchao_mx_ext::int8_gemv", "torchao_mx_ext::decode_attention", "torchao_mx_ext::prompt_attention")
DISABLE_ENV = "TORCHAO_MX_EXT_CPU_KERNELS"

# Whether ATen runs its own CPU kernels at AVX-512 width here (ATEN_CPU_CAPABILITY included): where the
# library GEMMs take prompts (cpu_mxfp4_dequantize.DENSE_FIRST). Read once at import: compiled graphs
# see a constant.
ATEN_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
# Whether our kernels have SIMD paths here (AVX2 + FMA or AVX-512 by ATen's capability, which also caps
# the paths they take). The decode-step kernels (int8 head, decode attention, the GEMV's integer path)
# run where this holds: measured faster than ATen's on AVX2 (Zen 3) and AVX-512 (Zen 4) CPUs alike.
VECTORIZED = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _cpu_has(feature: str) -> bool:
    """torch's cpuinfo query ``torch.cpu._is_<feature>_supported()`` (private: False where it is missing)."""
    query = getattr(torch.cpu, f"_is_{feature}_supported", None)
    return bool(query()) if query is not None else False


# AVX-512 VNNI (vpdpbusd) and AMX tiles in the CPU: the integer kernels' panel GEMM runs where the first
# holds, and AMX CPUs keep oneDNN's bf16 GEMMs and attention for prompts. Read once at import.
AVX512_VNNI = _cpu_has("vnni")
AMX = _cpu_has("amx_tile")

_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet


@contextlib.contextmanager
def _ninja_on_path():
    """torch's JIT builder runs ``ninja`` from PATH; the ``ninja`` wheel's binary may not be on it
    (a virtual environment used without activating it)."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


def _headers_digest_flag() -> str:
    """A ``-D`` flag carrying a digest of the shared headers: torch's extension cache keys a build on its
    sources and flags only, so without it an edited header would reuse a stale library."""
    digest = hashlib.sha256(b"".join(h.read_bytes() for h in _HEADERS)).hexdigest()[:16]
    return f"-DTME_HEADERS_DIGEST={digest}"


def _load_extension() -> None:
    """Compile (or reuse from torch's extension cache) and load the kernels."""
    if all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU") for op in _OPS):
        return
    from torch.utils import cpp_extension

    start = time.perf_counter()
    with _ninja_on_path():
        cpp_extension.load(
            name=_EXTENSION_NAME,
            sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-fopenmp", _headers_digest_flag()],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    logger.info("built/loaded the CPU MXFP4 kernels in %.1f s", time.perf_counter() - start)


def _build() -> bool:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("%s=0: the CPU MXFP4 kernels are off; linears use the pure-torch paths", DISABLE_ENV)
        return False
    try:
        _load_extension()
        return True
    except Exception as e:  # no compiler, no ninja, a build error: keep working, slower, and say so once
        lines = str(e).strip().splitlines()
        logger.warning(
            "torchao_mx_ext: the CPU MXFP4 kernels are unavailable (%s: %s); MXFP4 linears on CPU use the "
            "pure-torch paths instead (same numbers, slower).",
            type(e).__name__,
            lines[-1] if lines else "",
        )
        return False


def is_available() -> bool:
    """Whether the C++ kernels are loaded; builds them on the first call."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _build()
    return _state


@torch.compiler.assume_constant_result
def known_unavailable() -> bool:
    """True once a build was tried and failed (or the kernels are turned off); never builds.

    A constant to torch.compile (no guard): a graph traced before the first build (state unknown,
    kernels assumed) stays valid once the build succeeds, instead of being recompiled on the next call,
    and if it fails the ops' pure-torch fallbacks give the same numbers."""
    return _state is False
