"""Token perplexity, GPTQ style.

The WikiText-2 raw test rows are joined with ``"\\n\\n"``, tokenised once, cut into non-overlapping
windows of ``seq_len`` tokens; perplexity is ``exp`` of the mean over windows of each window's mean
next-token negative log-likelihood (``seq_len - 1`` predictions per window).
"""

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def wikitext2_test_text(data_dir: Path) -> str:
    path = Path(data_dir) / "wikitext2" / "wikitext2_raw_test_rows.json"
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 test rows not found at {path}")
    rows = json.loads(path.read_text())
    return "\n\n".join(rows)


def tokenize_for_perplexity(tokenizer, text: str) -> torch.Tensor:
    """``[1, T]`` token ids of ``text`` (one call, as GPTQ-style evaluation does)."""
    return tokenizer(text, return_tensors="pt").input_ids


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seq_len: int,
    max_windows: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on the first ``max_windows`` windows of ``input_ids`` (``[1, T]``)."""
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    n_windows = input_ids.shape[1] // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"text has {input_ids.shape[1]} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    nlls = []
    for i in tqdm(range(n_windows), desc="perplexity", disable=not progress, leave=False):
        window = input_ids[:, i * seq_len : (i + 1) * seq_len].to(device)
        logits = model(window).logits[0, :-1].float()
        nlls.append(F.cross_entropy(logits, window[0, 1:], reduction="mean").item())
    mean_nll = sum(nlls) / len(nlls)
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "windows": n_windows, "seq_len": seq_len}
