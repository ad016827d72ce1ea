"""Atomic ``save_pretrained`` for MXFP4 models: write into a temporary folder, then rename."""

import os
import shutil
import uuid
from pathlib import Path

from ..tensors import RotatedMXFP4Tensor
from .config import MXFP4HfConfig

__all__ = ["attach_quantizer", "save_pretrained"]


def attach_quantizer(model, quant_config=None) -> None:
    """Make ``model.save_pretrained`` write our format for a model quantized with ``quantize_`` directly.

    Sets ``model.hf_quantizer`` and ``model.config.quantization_config`` (``MXFP4HfConfig(quant_config)``;
    ``quant_config`` is the recipe used, recorded for information). A model loaded through
    ``from_pretrained`` with our method already has both, and is left as it is.
    """
    from .quantizer import MXFP4HfQuantizer

    current = getattr(model, "hf_quantizer", None)
    if isinstance(current, MXFP4HfQuantizer):
        return
    if current is not None:
        raise ValueError(f"model is already quantized with {current.quantization_config.quant_method}")
    if not any(isinstance(p, RotatedMXFP4Tensor) for p in model.parameters()):
        raise ValueError("model has no MXFP4-quantized weights; quantize_ it with an MXFP4 config first")
    hf_config = MXFP4HfConfig(quant_config)
    model.hf_quantizer = MXFP4HfQuantizer(hf_config, pre_quantized=True)
    model.config.quantization_config = hf_config


def save_pretrained(model, save_directory, quant_config=None, tokenizer=None, **kwargs) -> Path:
    """Save a quantized model (and ``tokenizer``) to ``save_directory`` all at once.

    Everything is written into a temporary sibling folder that then replaces ``save_directory``, so an
    interrupted or failed save never leaves a half-written checkpoint (nor touches an existing one).
    ``kwargs`` go to ``model.save_pretrained`` (``push_to_hub`` is not supported here).
    Returns the folder.
    """
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained here writes locally; push the saved folder separately")
    attach_quantizer(model, quant_config)
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(target, "saving")
    old = None
    try:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if target.exists():
            # A folder cannot be atomically replaced by another: move the old one aside first, then
            # delete it only once the new one is in place.
            old = _new_folder(target, "old")
            os.replace(target, old / "x")
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old / "x", target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _new_folder(target: Path, tag: str) -> Path:
    # os.mkdir (unlike tempfile.mkdtemp's 0700) honours the umask, so the renamed folder gets the
    # permissions a plain save_pretrained would give it.
    path = target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}"
    os.mkdir(path)
    return path
