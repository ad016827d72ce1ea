"""Where data and caches live: the shared data folder (read only) and the cache folder (ours).

``shared_dir()`` is ``$TORCHAO_MX_SHARED`` or the first ``shared/`` folder (holding ``data/``) found
beside the working directory or the package, walking up; ``cache_dir()`` is ``$TORCHAO_MX_CACHE``,
else ``.cache/`` in the source checkout, else ``~/.cache/torchao_mx_ext``.
"""

import os
from pathlib import Path

__all__ = ["cache_dir", "data_dir", "shared_dir"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def shared_dir() -> Path:
    env = os.environ.get("TORCHAO_MX_SHARED")
    if env:
        path = Path(env)
        if not (path / "data").is_dir():
            raise FileNotFoundError(f"TORCHAO_MX_SHARED={env} has no data/ folder")
        return path
    for base in (Path.cwd().resolve(), _PACKAGE_DIR):
        for folder in (base, *base.parents):
            candidate = folder / "shared"
            if (candidate / "data").is_dir():
                return candidate
    raise FileNotFoundError(
        "cannot find the shared data folder (a 'shared/' with 'data/' beside the project); "
        "set TORCHAO_MX_SHARED to its path"
    )


def data_dir() -> Path:
    return shared_dir() / "data"


def cache_dir() -> Path:
    env = os.environ.get("TORCHAO_MX_CACHE")
    if env:
        path = Path(env)
    elif (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        path = _PACKAGE_DIR.parent / ".cache"
    else:
        path = Path.home() / ".cache" / "torchao_mx_ext"
    path.mkdir(parents=True, exist_ok=True)
    return path
