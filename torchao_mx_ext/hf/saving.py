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

import ctypes
import errno
import os
import re
import shutil
import uuid
from pathlib import Path

from ..tensors import RotatedMXFP4Tensor
from .config import MXFP4HfConfig

__all__ = ["attach_quantizer", "save_pretrained"]

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
    clean_interrupted_saves(target)
    tmp = _new_folder(target, "saving")
    try:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old checkpoint
    return Path(save_directory)


def _install(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``; afterwards ``new`` holds what is to be deleted."""
    try:
        os.rename(new, target)  # no folder there (or an empty one): one atomic rename
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    _link_unrelated_files(target, new)
    cwd = _cwd_inside(target)
    if not _exchange(new, target):
        parked = _new_folder(target, "old")
        os.rmdir(parked)
        os.replace(target, parked)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(parked, target)
            raise
        os.replace(parked, new)
    if cwd is not None:
        # The process's working directory moved with the old folder: follow the path instead.
        os.chdir(cwd)


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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2``); ``False`` where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _cwd_inside(folder: Path):
    try:
        cwd = Path(os.getcwd())
    except FileNotFoundError:
        return None
    return cwd if cwd == folder or folder in cwd.parents else None


def _new_folder(target: Path, tag: str) -> Path:
    # os.mkdir (unlike tempfile.mkdtemp's 0700) honours the umask, so the renamed folder gets the
    # permissions a plain save_pretrained would give it.
    path = target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.mkdir(path)
    return path


def clean_interrupted_saves(target: Path) -> None:
    """Remove the temporary folders of saves to ``target`` whose process is gone; if such a save was
    killed between its two renames (no exchange available), put the parked old checkpoint back."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(saving|old)-(\d+)-[0-9a-f]{{12}}")
    for entry in sorted(os.scandir(target.parent), key=lambda e: e.name):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False) or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not os.path.lexists(target):
            os.replace(entry.path, target)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
