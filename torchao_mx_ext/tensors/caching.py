"""Stable metadata hash for AOT-autograd's compile cache (torch asks subclasses for one).

The cache keys a compiled graph by the Dynamo graph, which shows a linear on our weights only as
``F.linear(x, w)``: what that becomes (emulation, the CPU dequant-GEMV, the dense cache) is decided by
our Python code while AOTAutograd traces the subclass. So the hash includes a digest of this package's
source: after an upgrade or an edit, graphs compiled by the old code are not reused from the on-disk
cache: a graph cached by older code would keep its old dispatch.
"""

import functools
import hashlib
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def package_source_digest() -> str:
    """Digest of every ``.py`` and ``.cpp`` file of the package (names and contents)."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in _PACKAGE.rglob("*") if p.suffix in (".py", ".cpp") and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def stable_metadata_hash(tensor) -> str:
    """Deterministic across processes: class, attributes, shape/dtype/device of the inner tensors, and
    the package's source digest."""
    names, attrs = tensor.__tensor_flatten__()
    inner = [(n, tuple(getattr(tensor, n).shape), str(getattr(tensor, n).dtype), str(getattr(tensor, n).device)) for n in names]
    meta = (type(tensor).__qualname__, tuple(tensor.shape), sorted((k, repr(v)) for k, v in attrs.items()), inner, package_source_digest())
    return hashlib.blake2b(repr(meta).encode(), digest_size=16).hexdigest()
