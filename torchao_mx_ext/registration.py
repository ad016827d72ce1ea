"""What this package registers with transformers, done when transformers' registries are imported.

``import torchao_mx_ext`` does not import transformers (seconds of start-up that a user of ``quantize_``
on a plain ``nn.Module`` never needs). Two registrations must still be in place before transformers
uses its registries, so each one is hooked to the import of the transformers module that holds it (or
made at once if that module is already imported):

- ``transformers.quantizers.auto``: the quantization method ``"torchao_mx_ext"``, so that
  ``from_pretrained`` reads our checkpoints. The entries are stand-ins that import
  :mod:`torchao_mx_ext.hf` on first use (which then puts the real classes in place): the hook itself
  imports nothing, as it runs in the middle of transformers' own imports.
- ``transformers.integrations.moe``: the MXFP4 experts backend ``"torchao_mx_ext"``
  (:func:`torchao_mx_ext.moe.experts.register_experts_backend`).

This module sits at the bottom of the package's layers (the integrations import it for
:data:`QUANT_METHOD` and :class:`DeferredHfClass`); it reaches the layers above only by module name, at
the moment transformers needs them, like an entry point.
"""

import importlib
import importlib.abc
import sys
from typing import Callable, Dict, List

__all__ = ["install"]

QUANT_METHOD = "torchao_mx_ext"


class DeferredHfClass:
    """A registry entry standing for ``torchao_mx_ext.hf.<name>``: imports it on first use."""

    def __init__(self, name: str):
        self.name = name

    def _real(self):
        # Importing the integration registers the real classes in place of the stand-ins.
        return getattr(importlib.import_module("torchao_mx_ext.hf"), self.name)

    def __getattr__(self, attr):
        return getattr(self._real(), attr)

    def __call__(self, *args, **kwargs):
        return self._real()(*args, **kwargs)


def _register_quant_method(auto) -> None:
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, DeferredHfClass("MXFP4HfConfig"))
    auto.AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, DeferredHfClass("MXFP4HfQuantizer"))


def _register_experts_backend(_module) -> None:
    importlib.import_module("torchao_mx_ext.moe.experts").register_experts_backend()


_HOOKS: Dict[str, List[Callable]] = {
    "transformers.quantizers.auto": [_register_quant_method],
    "transformers.integrations.moe": [_register_experts_backend],
}


class _RunAfterExec(importlib.abc.Loader):
    """Wraps a module's loader: executes the module, then the hooks waiting for it."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for hook in _HOOKS.pop(self._name, ()):
            hook(module)

    def __getattr__(self, attr):  # get_data, is_package, ... of the wrapped loader
        return getattr(self._loader, attr)


class _HookFinder(importlib.abc.MetaPathFinder):
    """Finds hooked modules with the other finders and wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RunAfterExec(spec.loader, fullname)
                return spec
        return None


_FINDER = _HookFinder()


def install() -> None:
    """Run each hook now if its module is imported, else when it is. Idempotent."""
    for name in list(_HOOKS):
        module = sys.modules.get(name)
        if module is not None:
            for hook in _HOOKS.pop(name):
                hook(module)
    if _HOOKS and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
