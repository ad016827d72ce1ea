"""Calibration token windows from local text files (never an evaluation split), and the checks every
calibration entry point applies to its inputs.

Sources: ``wikitext2`` (WikiText-2 *validation*, ``wikitext2/wt2_tokenized_valid.txt``) and
``tinystories`` (``tinystories/tinystories_val_subset.txt``) in the shared data folder, or any text
file path. The text is read through ``datasets`` (``load_dataset("text")``, cached outside the data
folder), joined, tokenised once, and ``n_samples`` windows of ``seq_len`` tokens are drawn at
seeded random offsets, as GPTQ's loaders do.

Argument checks (:func:`check_real`, :func:`check_int`, :func:`check_bool`, :func:`check_calibration_ids`)
are shared by the calibration entry points (GPTQ, DartQuant, sequential GPTQ) and the MoE router passes
(PESF, Ban&Pick, QESC): a bad value is refused when it is given, with an error naming the argument and
its accepted range, before any model is touched.
"""

import math
import numbers
import operator
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..paths import cache_dir
from ..paths import data_dir as shared_data_dir

SOURCES = {
    "wikitext2": "wikitext2/wt2_tokenized_valid.txt",
    "tinystories": "tinystories/tinystories_val_subset.txt",
}


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
class CalibrationIdsTypeError(TypeError, ValueError):
    """Calibration token ids of the wrong type or dtype. A ``TypeError`` (what it is) that is also a
    ``ValueError``, like every other refused calibration-ids input (:func:`check_calibration_ids`)."""


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "finite"


def _is_bool(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    # numpy's bool scalar is no Python bool; its class is named bool_ (numpy 1) or bool (numpy 2)
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def check_real(
    value: Any,
    name: str,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite real number in the range (``low``/``high``, each
    inclusive unless ``*_open``); otherwise ``TypeError`` (not a number, a bool) or ``ValueError``
    (NaN, inf, out of range), naming ``name`` and the accepted range."""
    accepted = _range_text(low, high, low_open, high_open)
    scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()
    if _is_bool(value) or not (isinstance(value, numbers.Real) or scalar_tensor):
        raise TypeError(f"{name} must be a real number ({accepted}), got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number ({accepted}), got {v}")
    if (low is not None and (v < low or (low_open and v == low))) or (
        high is not None and (v > high or (high_open and v == high))
    ):
        raise ValueError(f"{name} must be {accepted}, got {v}")
    return v


def check_int(value: Any, name: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float) in ``[low, high]``; otherwise
    ``TypeError`` / ``ValueError`` naming ``name`` and the accepted range."""
    accepted = _range_text(low, high, False, False)
    if _is_bool(value):
        raise TypeError(f"{name} must be an integer ({accepted}), got the bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer ({accepted}), got {type(value).__name__} {value!r}") from None
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be an integer {accepted}, got {v}")
    return v


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool (Python or numpy); ``TypeError`` naming ``name`` otherwise."""
    if isinstance(value, torch.Tensor) or not _is_bool(value):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def vocab_size_of(model: torch.nn.Module) -> Optional[int]:
    """The number of valid token ids of ``model``: ``config.vocab_size`` and the input embedding's
    ``num_embeddings``, the smaller where both are known; None if neither is."""
    sizes = []
    cfg_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(cfg_size, int) and not isinstance(cfg_size, bool):
        sizes.append(cfg_size)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            embeddings = get_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
        if isinstance(getattr(embeddings, "num_embeddings", None), int):
            sizes.append(embeddings.num_embeddings)
    return min(sizes) if sizes else None


def check_calibration_ids(
    model: torch.nn.Module,
    calib_ids: Any,
    purpose: str = "calibration",
    max_positions: Optional[int] = None,
    allow_1d: bool = False,
) -> torch.Tensor:
    """Check calibration token ids against ``model`` before anything runs, and return them as int64.

    ``calib_ids`` must be an integer tensor ``[n, seq_len]`` (``[seq_len]`` too with ``allow_1d``)
    with ``n, seq_len >= 1`` and every id in ``[0, vocab size)`` (:func:`vocab_size_of`); with
    ``max_positions``, ``seq_len <= max_positions``.

    Raises:
        CalibrationIdsTypeError: not a tensor, or not an integer dtype (a ``TypeError`` and a ``ValueError``).
        ValueError: a wrong shape, no tokens, ids outside the vocabulary, sequences that are too long.
    """
    shape_text = "[n, seq_len]" + (" or [seq_len]" if allow_1d else "")
    if not isinstance(calib_ids, torch.Tensor):
        raise CalibrationIdsTypeError(
            f"{purpose}: calib_ids must be an integer (Long) tensor of token ids, shape {shape_text}; "
            f"got {type(calib_ids).__name__}"
        )
    if calib_ids.is_floating_point() or calib_ids.is_complex() or calib_ids.dtype == torch.bool:
        raise CalibrationIdsTypeError(
            f"{purpose}: calib_ids must be an integer (Long) tensor of token ids, shape {shape_text}; "
            f"got dtype {calib_ids.dtype}"
        )
    if calib_ids.ndim != 2 and not (allow_1d and calib_ids.ndim == 1):
        raise ValueError(f"{purpose}: calib_ids must have shape {shape_text}, got {tuple(calib_ids.shape)}")
    if calib_ids.numel() == 0:
        raise ValueError(f"{purpose}: calib_ids is empty (shape {tuple(calib_ids.shape)}): it needs calibration tokens")
    if max_positions is not None and calib_ids.shape[-1] > max_positions:
        raise ValueError(
            f"{purpose}: calibration sequences of {calib_ids.shape[-1]} tokens are longer than the model's "
            f"max_position_embeddings ({max_positions}); cut them to at most {max_positions}"
        )
    vocab = vocab_size_of(model)
    lo, hi = int(calib_ids.min()), int(calib_ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(
            f"{purpose}: calib_ids hold token ids in [{lo}, {hi}], outside the vocabulary [0, {vocab}) of "
            f"{type(model).__name__} (ids of another tokenizer?)"
        )
    return calib_ids.long()


# ---------------------------------------------------------------------------------------------
# calibration text
# ---------------------------------------------------------------------------------------------
def resolve_source(source: Union[str, Path], data_dir: Optional[Path] = None) -> Path:
    if str(source) in SOURCES:
        if data_dir is None:
            data_dir = shared_data_dir()
        path = Path(data_dir) / SOURCES[str(source)]
    else:
        path = Path(source)
    if "test" in path.name:
        raise ValueError(f"refusing to calibrate on an evaluation split: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    return path


def read_text(path: Path) -> str:
    """The lines of the text file ``path`` joined by newlines. ``ValueError`` naming the file when it
    has no text (empty, or only whitespace) or cannot be read as text."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    if Path(path).stat().st_size == 0:  # datasets fails on it with a bare DatasetGenerationError
        raise ValueError(f"calibration file {path} has no text (it is empty)")
    try:
        rows = load_dataset("text", data_files=str(path), split="train", cache_dir=str(cache_dir() / "datasets"))
    except DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__ or e
        raise ValueError(f"cannot read calibration file {path} as text: {type(cause).__name__}: {cause}") from e
    text = "\n".join(rows["text"])
    if not text.strip():
        raise ValueError(f"calibration file {path} has no text (only whitespace)")
    return text


def calibration_ids(
    tokenizer,
    source: Union[str, Path] = "wikitext2",
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    data_dir: Optional[Path] = None,
    max_positions: Optional[int] = None,
) -> torch.LongTensor:
    """``[n_samples, seq_len]`` token ids drawn from ``source`` with a seeded generator.

    Windows start at seeded random offsets (drawn with replacement, as GPTQ's loaders do: windows may
    overlap, and together they may hold more tokens than the text). Refused with a ``ValueError``
    naming the file: a text with no window of ``seq_len`` tokens, or fewer distinct windows (start
    offsets) than ``n_samples``, which would force repeated samples.
    """
    n_samples = check_int(n_samples, "n_samples", low=1)
    seq_len = check_int(seq_len, "seq_len", low=2)
    seed = check_int(seed, "seed")
    if max_positions is not None:
        max_positions = check_int(max_positions, "max_positions", low=1)
        if seq_len > max_positions:
            raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    path = resolve_source(source, data_dir)
    ids = tokenizer(read_text(path), return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        raise ValueError(f"{path} has {ids.numel()} tokens, too short for one calibration window of {seq_len}")
    windows = ids.numel() - seq_len  # distinct start offsets randint draws from
    if n_samples > windows:
        raise ValueError(
            f"{path} has {ids.numel()} tokens: only {windows} distinct calibration windows of {seq_len} tokens, "
            f"fewer than the {n_samples} samples asked for; ask for fewer samples or shorter windows, or use a "
            "longer text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, windows, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
