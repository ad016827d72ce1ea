#!/usr/bin/env python
"""Evaluate a compressed-tensors checkpoint the way vLLM computes it, on a CPU, without torchao_mx_ext.

    python scripts/load_like_vllm.py FOLDER [--eval-windows N] [--seq-len L] [--json OUT]

What it does (this process never imports torchao_mx_ext; the JSON records that it did not):

1. Loads FOLDER with transformers + compressed-tensors, weights decompressed to dense
   (``CompressedTensorsConfig(dequantize=True)``: compressed-tensors' own decompressor).
2. Applies the ``transform_config``'s online transforms as vLLM's ``CompressedTensorsLinearTransformMethod``
   does (``vllm/model_executor/layers/quantization/compressed_tensors/transform/{linear,module}.py``):
   only ``args.is_online()`` locations; ``input``: ``x -> x @ H`` before the linear, ``output``:
   ``y -> y @ H`` after it, where for ``type: hadamard`` ``H`` is compressed-tensors'
   ``deterministic_hadamard_matrix(n) / sqrt(n)`` on blocks of ``n = head_dim`` (the full width without
   one), what vLLM's Hadacore kernel computes (``H`` is symmetric, so ``inverse`` changes nothing; it
   is honoured anyway). Offline locations (``weight_input`` / ``weight_output``) are already in the
   stored weights and are skipped, as vLLM skips them.
3. Quantizes the inputs of layers whose config group has ``input_activations`` (W4A4) with
   compressed-tensors' own dynamic quantizer (``compute_dynamic_scales_and_zp`` + ``fake_quantize``:
   MXFP4, its power-of-two scale rule), after the transform, as vLLM's W4A4 path does. Note that vLLM
   itself runs MXFP4 W4A4 only on Blackwell (FlashInfer kernel, its own activation quantizer); on
   Hopper and older its Marlin kernel runs weight-only and ignores ``input_activations``.
   ``--no-act-quant`` evaluates that weight-only computation.
4. Reports WikiText-2 perplexity with torchao_mx_ext's protocol (``eval/perplexity.py``, reimplemented
   here): the raw test rows joined with ``"\\n\\n"``, tokenised once, non-overlapping windows of
   ``--seq-len`` tokens (default: min(2048, max_position_embeddings): 512 for stories260k), ``exp`` of the
   mean over windows of each window's mean next-token NLL.

Prints ``{"ppl": ...}`` (and more fields) and writes it to ``--json``.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path


def _data_dir(given):
    if given:
        return Path(given)
    env = os.environ.get("TORCHAO_MX_SHARED")
    if env:
        return Path(env) / "data"
    for base in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for folder in (base, *base.parents):
            if (folder / "shared" / "data").is_dir():
                return folder / "shared" / "data"
    raise SystemExit("load_like_vllm: cannot find shared/data (WikiText-2); pass --data-dir or set TORCHAO_MX_SHARED")


def _hadamard(n, inverse):
    import torch
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    h = deterministic_hadamard_matrix(n, torch.float64, torch.device("cpu")) / math.sqrt(n)
    return (h.T if inverse else h).to(torch.float32)


def _blockwise(value, h):
    """``value @ diag(h, ..., h)`` along the last dimension, in float32, back in ``value``'s dtype."""
    n = h.shape[0]
    if value.shape[-1] % n:
        raise ValueError(f"transform of size {n} does not divide the width {value.shape[-1]}")
    out = value.to(h.dtype).unflatten(-1, (-1, n)) @ h
    return out.flatten(-2, -1).to(value.dtype)


def install_transforms(model, transform_config):
    """Hooks for the online transforms; returns the number of modules transformed."""
    from compressed_tensors.transform import TransformLocation
    from compressed_tensors.utils import match_named_modules

    count = 0
    seen_input = set()
    for scheme_name, scheme in transform_config.config_groups.items():
        for args in scheme.apply:
            location = TransformLocation(args.location)
            if not location.is_online():
                continue  # fused into the stored weights offline (vLLM skips these too)
            if location not in (TransformLocation.INPUT, TransformLocation.OUTPUT):
                raise NotImplementedError(f"{scheme_name}: online transform at {location.value} (attention) is not emulated")
            if scheme.type != "hadamard":
                raise NotImplementedError(
                    f"{scheme_name}: vLLM applies {scheme.type!r} transforms with weights loaded from the checkpoint; "
                    "this script emulates the deterministic 'hadamard' type only"
                )
            for name, module in match_named_modules(model, args.targets, args.ignore):
                if location == TransformLocation.INPUT:
                    if name in seen_input:
                        raise ValueError(f"{name}: more than one input transform (vLLM allows one)")
                    seen_input.add(name)
                    n = scheme.head_dim or module.in_features
                    h = _hadamard(n, args.inverse)
                    module.register_forward_pre_hook(lambda _m, a, h=h: (_blockwise(a[0], h), *a[1:]))
                else:
                    n = scheme.head_dim or module.out_features
                    h = _hadamard(n, args.inverse)
                    module.register_forward_hook(lambda _m, _a, y, h=h: _blockwise(y, h))
                count += 1
    return count


def install_activation_quantization(model, quantization_config):
    """Dynamic input quantization with compressed-tensors' own functions; returns the module count."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
    from compressed_tensors.utils import match_named_modules

    def hook(module, a, args):
        x = a[0]
        scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=module)
        return (fake_quantize(x=x, scale=scale, zero_point=zero_point, args=args), *a[1:])

    count = 0
    for scheme in quantization_config.config_groups.values():
        args = scheme.input_activations
        if args is None:
            continue
        if not args.dynamic:
            raise NotImplementedError("static input activation scales are not emulated")
        for _, module in match_named_modules(model, scheme.targets, quantization_config.ignore):
            module.register_forward_pre_hook(lambda m, a, args=args: hook(m, a, args))
            count += 1
    return count


def perplexity(model, input_ids, seq_len, max_windows):
    import torch
    import torch.nn.functional as F

    n_windows = input_ids.shape[1] // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise SystemExit(f"load_like_vllm: the text has {input_ids.shape[1]} tokens, fewer than one window of {seq_len}")
    nlls = []
    with torch.inference_mode():
        for i in range(n_windows):
            window = input_ids[:, i * seq_len : (i + 1) * seq_len]
            logits = model(window).logits[0, :-1].float()
            nlls.append(F.cross_entropy(logits, window[0, 1:], reduction="mean").item())
    mean_nll = sum(nlls) / len(nlls)
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "windows": n_windows, "seq_len": seq_len}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--eval-windows", type=int, default=None, help="windows to evaluate (default: all)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--data-dir", default=None, help="the shared data folder (holding wikitext2/)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-act-quant", action="store_true", help="weight-only, as vLLM's Marlin kernel (Hopper)")
    args = parser.parse_args(argv)
    if args.eval_windows is not None and args.eval_windows < 1:
        raise SystemExit("load_like_vllm: --eval-windows must be at least 1")

    folder = Path(args.folder)
    raw = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if raw.get("quant_method") != "compressed-tensors":
        raise SystemExit(f"load_like_vllm: {folder} is not a compressed-tensors checkpoint")
    rows_path = _data_dir(args.data_dir) / "wikitext2" / "wikitext2_raw_test_rows.json"

    import torch
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    torch.manual_seed(0)
    qconfig = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k in QuantizationConfig.model_fields})
    tconfig = TransformConfig.model_validate(raw["transform_config"]) if raw.get("transform_config") else None
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    transformed = install_transforms(model, tconfig) if tconfig is not None else 0
    act_quantized = 0 if args.no_act_quant else install_activation_quantization(model, qconfig)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "\n\n".join(json.loads(rows_path.read_text()))
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    seq_len = args.seq_len or min(2048, getattr(model.config, "max_position_embeddings", 2048) or 2048)
    result = perplexity(model, input_ids, seq_len, args.eval_windows)
    result.update(
        folder=str(folder),
        dtype=args.dtype,
        transformed_linears=transformed,
        act_quantized_linears=act_quantized,
        imported_torchao_mx_ext=any(m == "torchao_mx_ext" or m.startswith("torchao_mx_ext.") for m in sys.modules),
    )
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
