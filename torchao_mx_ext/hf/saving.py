"""Atomic ``save_pretrained`` for MXFP4 models.

The checkpoint is written into a temporary sibling folder; the files of the existing folder that are
not part of a checkpoint (notes, eval results, sub-folders) are hard-linked into it, and the two folders
are then exchanged in one ``renameat2(RENAME_EXCHANGE)`` call. At every instant the target path holds
either the complete old folder or the complete new one. Where the exchange is not available (not
Linux, or a filesystem without it) two renames are used, and the one window in between (no folder at
the target, the old one parked in a hidden sibling) is repaired by the next save to the same target.

Temporary folders are named ``.<target>.<tag>-<pid>-<random>``; a save removes those whose process no
longer runs (interrupted saves), so nothing accumulates.
"""

import os
import re
import shutil
from pathlib import Path

from ..atomic import clean_interrupted, install_folder, new_sibling
from ..tensors import RotatedMXFP4Tensor
from .config import MXFP4HfConfig

__all__ = ["attach_quantizer", "clean_interrupted_saves", "save_pretrained"]

clean_interrupted_saves = clean_interrupted  # what the next save to a target does first

# Files that belong to a checkpoint's weights: a new save replaces all of them (a sharded save must not
# leave the shards of an unsharded one behind, and vice versa). Any other file in the folder is kept.
_WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


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

    An interrupted or failed save never leaves a half-written checkpoint and never loses the previous
    one. Saving into an existing folder replaces its checkpoint files (config, weights, tokenizer) and
    keeps every other file. A symlink is followed (the folder it points to is replaced, the link stays);
    ``.`` works. ``kwargs`` go to ``model.save_pretrained`` (``push_to_hub`` is not supported here).
    Returns the folder (``save_directory`` as given).
    """
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained here writes locally; push the saved folder separately")
    attach_quantizer(model, quant_config)
    target = Path(os.path.realpath(save_directory))
    if target.parent == target:
        raise ValueError(f"cannot save a checkpoint as the filesystem root {target}")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{save_directory} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_interrupted(target)
    tmp = new_sibling(target, "saving")
    try:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        install_folder(tmp, target, before_swap=_link_unrelated_files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old checkpoint
    return Path(save_directory)


def _link_unrelated_files(old: Path, new: Path) -> None:
    """Hard-link (copy where links fail) every entry of ``old`` that the new checkpoint does not replace."""
    for entry in os.scandir(old):
        if os.path.lexists(new / entry.name) or _WEIGHT_FILES.fullmatch(entry.name):
            continue
        src, dst = Path(entry.path), new / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
