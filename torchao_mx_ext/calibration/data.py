"""Calibration token windows from local text files (never an evaluation split).

Sources: ``wikitext2`` (WikiText-2 *validation*, ``wikitext2/wt2_tokenized_valid.txt``) and
``tinystories`` (``tinystories/tinystories_val_subset.txt``) in the shared data folder, or any text
file path. The text is read through ``datasets`` (``load_dataset("text")``, cached outside the data
folder), joined, tokenised once, and ``n_samples`` windows of ``seq_len`` tokens are drawn at
seeded random offsets, as GPTQ's loaders do.
"""

from pathlib import Path
from typing import Optional, Union

import torch

SOURCES = {
    "wikitext2": "wikitext2/wt2_tokenized_valid.txt",
    "tinystories": "tinystories/tinystories_val_subset.txt",
}


def resolve_source(source: Union[str, Path], data_dir: Optional[Path] = None) -> Path:
    if str(source) in SOURCES:
        if data_dir is None:
            from ..zoo import data_dir as shared_data_dir

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
    from datasets import load_dataset

    from ..zoo import cache_dir

    rows = load_dataset("text", data_files=str(path), split="train", cache_dir=str(cache_dir() / "datasets"))
    return "\n".join(rows["text"])


def calibration_ids(
    tokenizer,
    source: Union[str, Path] = "wikitext2",
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    data_dir: Optional[Path] = None,
    max_positions: Optional[int] = None,
) -> torch.LongTensor:
    """``[n_samples, seq_len]`` token ids drawn from ``source`` with a seeded generator."""
    if n_samples <= 0 or seq_len <= 1:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    path = resolve_source(source, data_dir)
    ids = tokenizer(read_text(path), return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        raise ValueError(f"{path} has {ids.numel()} tokens, too short for one calibration window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
