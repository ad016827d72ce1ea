"""Stable metadata hash for AOT-autograd's compile cache (torch asks subclasses for one)."""

import hashlib


def stable_metadata_hash(tensor) -> str:
    """Deterministic across processes: class, attributes, and shape/dtype/device of the inner tensors."""
    names, attrs = tensor.__tensor_flatten__()
    inner = [(n, tuple(getattr(tensor, n).shape), str(getattr(tensor, n).dtype), str(getattr(tensor, n).device)) for n in names]
    meta = (type(tensor).__qualname__, tuple(tensor.shape), sorted((k, repr(v)) for k, v in attrs.items()), inner)
    return hashlib.blake2b(repr(meta).encode(), digest_size=16).hexdigest()
