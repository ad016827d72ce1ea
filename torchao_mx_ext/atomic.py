"""Replace a folder (or file) by a new one atomically, and clean up after interrupted replacements.

The new content is written into a temporary sibling ``.<target>.<tag>-<pid>-<random>`` and swapped with
the target in one ``renameat2(RENAME_EXCHANGE)`` call: at every instant the target path holds either
the complete old or the complete new content. Where the exchange is not available (not Linux, or a
filesystem without it) two renames are used, and the one window in between (nothing at the target, the
old content parked in a hidden sibling) is repaired by :func:`clean_interrupted` before the next write
to the same target. Temporaries carry the writing process's pid, so those of dead processes are removed.
Used by the checkpoint save (``hf/saving.py``) and the exports (``export/``).
"""

import ctypes
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional

__all__ = ["clean_interrupted", "install_folder", "new_sibling", "process_alive"]


def install_folder(new: Path, target: Path, before_swap: Optional[Callable[[Path, Path], None]] = None) -> None:
    """Put the complete folder ``new`` at ``target``; afterwards ``new`` holds what is to be deleted (the
    old folder, or nothing). ``before_swap(old, new)`` runs when a folder is already there, just before
    the swap (the checkpoint save hard-links the user's own files into ``new`` then)."""
    try:
        os.rename(new, target)  # no folder there (or an empty one): one atomic rename
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if before_swap is not None:
        before_swap(target, new)
    cwd = _cwd_inside(target)
    if not _exchange(new, target):
        parked = new_sibling(target, "old")
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


def new_sibling(target: Path, tag: str) -> Path:
    # os.mkdir (unlike tempfile.mkdtemp's 0700) honours the umask, so the renamed folder gets the
    # permissions a plain save_pretrained would give it.
    path = target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.mkdir(path)
    return path


def clean_interrupted(target: Path) -> None:
    """Remove the temporaries of writes to ``target`` whose process is gone; if such a write was killed
    between its two renames (no exchange available), put the parked old content back."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\w+)-(\d+)-[0-9a-f]{{12}}")
    for entry in sorted(os.scandir(target.parent), key=lambda e: e.name):
        match = pattern.fullmatch(entry.name)
        if match is None or process_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not os.path.lexists(target):
            os.replace(entry.path, target)
        elif entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
