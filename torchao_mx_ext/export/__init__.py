"""Exports of quantized models for serving engines.

- :func:`to_gguf` (:mod:`.gguf`): llama.cpp's GGUF, every quantized linear as GGML ``MXFP4`` blocks
  (weight-only; llama.cpp quantizes activations itself). Needs the ``gguf`` package (``[export]`` extra).
- :func:`to_compressed_tensors` (:mod:`.compressed_tensors`): vLLM's compressed-tensors checkpoint.

Both write atomically and refuse, with the reason, what their format cannot express. Names are
imported on first use, so importing this package imports neither ``gguf`` nor ``compressed_tensors``.
"""

from ..lazy import lazy_attributes

__all__ = ["CompressedTensorsExportError", "GGUFExportError", "to_compressed_tensors", "to_gguf"]

# public name -> submodule that defines it
_EXPORTS = {
    "to_gguf": "gguf",
    "GGUFExportError": "gguf",
    "to_compressed_tensors": "compressed_tensors",
    "CompressedTensorsExportError": "compressed_tensors",
}


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
