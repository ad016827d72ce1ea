"""``MXFP4HfConfig``: the transformers quantization config of our method (``quant_method="torchao_mx_ext"``).

It carries one of our ``quantize_`` configs (``MXFP4Config``, ``MXFP4BlockRotConfig``, ...) and is what
``config.json`` stores under ``quantization_config``::

    {"quant_method": "torchao_mx_ext", "format_version": 2,
     "quant_config": {"_type": "MXFP4BlockRotConfig", "_version": 1, "_data": {...}},
     "modules_to_not_convert": null}

A model saved with MoE router passes installed (:mod:`torchao_mx_ext.moe`: PESF, Ban, Pick) also has
``"router_passes"``: per router, the installed passes in order with their values read from the pass
buffers (form: :func:`torchao_mx_ext.moe.router_configs.router_pass_settings`), e.g.
``{"model.layers.0.mlp.gate": [{"pass": "pick", "experts": [3], "boost": 1.0}, {"pass": "ban", "tau":
0.8, "k_min": 1, "protected": [3]}]}``; ``from_pretrained`` re-installs them after loading the weights.
Without passes the key is absent.

The inner config goes through torchao's ``config_to_dict`` / ``config_from_dict``; only classes of this
package are accepted. ``format_version`` is the version of our checkpoint layout: a checkpoint from a
newer layout than this code reads fails with an error that says so; older layouts still load
(versions: :mod:`torchao_mx_ext.hf.serialization`).
"""

from typing import Any, Dict, List, Optional

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..registration import QUANT_METHOD

__all__ = ["FORMAT_VERSION", "MXFP4HfConfig", "QUANT_METHOD", "known_configs"]

# Version of the checkpoint layout (config.json fields + safetensors tensors and metadata) written here.
# 1: 2-D linear weights. 2: N-D weights (fused MoE experts), tensors under the model's own names.
# 3: each weight's kernel_preference (hf/serialization.py).
FORMAT_VERSION = 3

_FIELDS = ("quant_method", "format_version", "quant_config", "modules_to_not_convert", "router_passes")


def known_configs() -> Dict[str, type]:
    """Our ``AOBaseConfig`` subclasses, by class name: the configs a checkpoint may record."""
    from ..calibration import GPTQConfig, MXFP4GPTQConfig
    from ..configs import MXFP4BlockRotConfig, MXFP4Config
    from ..moe.router_configs import BanConfig, BanPickConfig, PESFConfig, PickConfig

    configs = (MXFP4Config, MXFP4BlockRotConfig, MXFP4GPTQConfig, GPTQConfig, PESFConfig, PickConfig, BanConfig, BanPickConfig)
    return {cls.__name__: cls for cls in configs}


def check_format_version(version: Any, where: str) -> int:
    """``version`` as an int, or a ``ValueError`` when it is malformed or newer than :data:`FORMAT_VERSION`."""
    if version is None:
        raise ValueError(f"{where}: no format_version (not written by torchao_mx_ext, or edited)")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: this checkpoint uses torchao_mx_ext format version {version}, but the installed "
            f"torchao_mx_ext reads versions up to {FORMAT_VERSION}; upgrade torchao_mx_ext to load it"
        )
    return version


def _config_from_dict(data: Any):
    from torchao.core.config import config_from_dict

    known = known_configs()
    if not isinstance(data, dict) or "_type" not in data or "_data" not in data:
        raise ValueError(f"quantization_config.quant_config must be a serialised torchao config dict, got {data!r}")
    name = data["_type"]
    cls = known.get(name)
    if cls is None:
        raise ValueError(
            f"unknown torchao_mx_ext config {name!r} in quantization_config; this version knows "
            f"{', '.join(sorted(known))} (was the checkpoint written by a newer torchao_mx_ext?)"
        )
    stored, current = data.get("_version", 1), getattr(cls, "version", 1)
    if stored != current:
        raise ValueError(f"config {name} has version {stored!r}; this torchao_mx_ext reads version {current}")
    config = config_from_dict(data)
    # config_from_dict searches several modules by name; make sure it built our class.
    if type(config) is not cls:
        raise ValueError(f"config {name!r} resolved to {type(config).__module__}.{type(config).__name__}, not ours")
    return config


class MXFP4HfConfig(QuantizationConfigMixin):
    """Quantization config for ``from_pretrained`` with our MXFP4 methods.

    Args:
        quant_config: one of our ``quantize_`` configs, e.g. ``MXFP4BlockRotConfig()``. Required to
            quantize a full-precision checkpoint on load; ``None`` is allowed for an already-quantized
            checkpoint whose recipe is unknown (each weight carries its own parameters).
        modules_to_not_convert: extra module names (transformers' ``should_convert_module`` patterns) left
            in high precision; modules named ``lm_head`` are never quantized (as in ``torchao-mx compare``).
        format_version: checkpoint layout version (set when reading a checkpoint; leave the default).
        router_passes: MoE router passes to install after loading, ``{router_fqn: [{"pass": name, ...}]}``
            (written by ``save_pretrained`` from the model's installed passes; ``None``: none).

    Example::

        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=MXFP4HfConfig(MXFP4BlockRotConfig()))
    """

    def __init__(
        self,
        quant_config=None,
        modules_to_not_convert: Optional[List[str]] = None,
        format_version: int = FORMAT_VERSION,
        router_passes: Optional[Dict[str, List[Dict[str, Any]]]] = None,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"MXFP4HfConfig got unknown fields {sorted(kwargs)}; known: {', '.join(_FIELDS)}")
        self.quant_method = QUANT_METHOD
        self.format_version = check_format_version(format_version, "MXFP4HfConfig")
        self.quant_config = quant_config
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.router_passes = _copy_router_passes(router_passes)
        self.post_init()

    def post_init(self):
        """Validate the fields."""
        if self.quant_config is not None:
            known = known_configs()
            if type(self.quant_config) not in known.values():
                raise TypeError(
                    f"quant_config must be one of torchao_mx_ext's configs ({', '.join(sorted(known))}), "
                    f"got {type(self.quant_config).__name__}"
                )
        if self.modules_to_not_convert is not None and not all(isinstance(m, str) for m in self.modules_to_not_convert):
            raise TypeError(f"modules_to_not_convert must be a list of strings, got {self.modules_to_not_convert!r}")
        if self.router_passes is not None:
            from ..moe.router_configs import check_router_pass_settings

            check_router_pass_settings(self.router_passes)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON-ready dict stored in ``config.json``."""
        from torchao.core.config import config_to_dict

        data = {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "quant_config": None if self.quant_config is None else config_to_dict(self.quant_config),
            "modules_to_not_convert": None if self.modules_to_not_convert is None else list(self.modules_to_not_convert),
        }
        router_passes = _copy_router_passes(self.router_passes)
        if router_passes is not None:  # absent without passes: config.json keeps its plain form
            data["router_passes"] = router_passes
        return data

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """Inverse of :meth:`to_dict`; a newer ``format_version`` or an unknown inner config raises ``ValueError``."""
        config_dict = dict(config_dict)
        method = config_dict.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method {method!r} is not {QUANT_METHOD!r}")
        # Check the version before anything else: a newer layout may carry fields we do not know.
        version = check_format_version(config_dict.pop("format_version", None), "quantization_config")
        inner = config_dict.pop("quant_config", None)
        config = cls(
            quant_config=None if inner is None else _config_from_dict(inner),
            format_version=version,
            **config_dict,
        )
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    def __eq__(self, other) -> bool:
        return isinstance(other, MXFP4HfConfig) and self.to_dict() == other.to_dict()

    __hash__ = None


def _copy_router_passes(router_passes):
    """A deep copy of the router-pass settings as plain dicts and lists (``None`` for none/empty);
    malformed input is passed through for :func:`check_router_pass_settings` to report."""
    if not router_passes:
        return None
    import copy

    copied = copy.deepcopy(router_passes)
    if isinstance(copied, dict):  # tuples (from Python callers) as lists, as JSON gives them back
        copied = {
            fqn: [
                {k: list(v) if isinstance(v, tuple) else v for k, v in e.items()} if isinstance(e, dict) else e
                for e in entries
            ] if isinstance(entries, (list, tuple)) else entries
            for fqn, entries in copied.items()
        }
    return copied
