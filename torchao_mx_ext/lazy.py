"""Package attributes imported on first use (PEP 562), so that importing a package imports none of its
heavy submodules (torchao, transformers, compressed-tensors, gguf) until a name is used."""

import importlib
from typing import Callable, Dict, Iterable, Tuple

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, exports: Dict[str, str], submodules: Iterable[str] = ()) -> Tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the submodule
    (relative to ``package``) that defines it; ``submodules`` are returned as modules. A resolved name
    is cached in the package's namespace."""
    submodules = set(submodules)

    def __getattr__(name):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(exports) | submodules)

    return __getattr__, __dir__
