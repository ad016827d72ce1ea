"""Tutorial 4: fast MXFP4 inference on a CPU: shared activation quantization, the dense-weight cache,
per-layer compilation, static-cache generation.

    python tutorials/04_fast_inference.py           # SmolLM2-135M (compiles for 2-3 minutes)
    python tutorials/04_fast_inference.py --fast    # stories260k (CI)

The steps, each optional, in the order they must be applied:

1. ``quantize_`` with ``MXFP4BlockRotConfig()`` (W4A4) or ``act_quant=False`` (weight-only).
2. ``tme.share_input_quantization(model)``: q/k/v and gate/up rotate and quantize their common input
   once instead of three and two times (same logits bit for bit).
3. ``tme.cache_dequantized_weights(model)``: keep a dense copy of each decoded weight for large batches
   (prefill: plain GEMMs); decode steps keep reading the 4.25-bit codes through our CPU kernel.
4. ``tme.compile_decoder_layers(model)``: each decoder layer compiled on its own (a minute or two, not
   the whole graph's many), in its own Dynamo cache, with GQA-packed decode attention. Module changes
   after this are not noticed (module guards are skipped): do 1-3 first. ``tme.compile_model(model)``
   instead compiles the whole model as one graph per shape, with the same options: slower to compile,
   faster to decode (no Python between layers; ``docs/results.md``).
5. Generate with a static KV cache (``eval.generation.greedy_generate``): one graph for the prompt,
   one for every decode step, no recompiles. On CPU both compile entry points run each batch-1 decode
   step of a Llama-family model as one C++ call instead (``torchao_mx_ext/decoder_step.py``; its
   ``why_not(model)`` says why a model is left on the graph).

A checkpoint saved in this state holds the plain per-linear weights (the cache and the sharing are
inference modes); it reloads with plain transformers.
"""

import argparse
import copy
import time
from pathlib import Path

import torch
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM

import torchao_mx_ext as tme
from torchao_mx_ext.eval.generation import greedy_generate, static_cache
from torchao_mx_ext.hf import save_pretrained
from torchao_mx_ext.regional_compile import register_packed_gqa_sdpa
from torchao_mx_ext.configs import quantizable_filter
from torchao_mx_ext.zoo import load_model


def speed(model, prompt, new_tokens):
    """(prefill tokens/s, decode tokens/s, last run), best of two generations after a warm-up (which
    compiles)."""
    cache = static_cache(model, prompt.shape[1] + new_tokens)
    greedy_generate(model, prompt, 2, cache=cache)
    runs = [greedy_generate(model, prompt, new_tokens, cache=cache) for _ in range(2)]
    prefill = min(r["prefill_s"] for r in runs)
    decode = min(r["decode_s"] for r in runs)
    return prompt.shape[1] / prefill, new_tokens / decode, runs[-1]


def use_packed_gqa_attention(model):
    register_packed_gqa_sdpa()
    model.set_attn_implementation(tme.PACKED_GQA_SDPA)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="stories260k, short prompt (CI)")
    p.add_argument("--weight-only", action="store_true", help="MXFP4 weights, bf16 activations")
    p.add_argument("--out", default="tutorials/output/fast_inference", help="where the quantized checkpoint goes")
    args = p.parse_args()
    name, prompt_len, new_tokens = ("stories260k", 32, 8) if args.fast else ("smollm2-135m", 512, 32)
    torch.manual_seed(0)
    base, tok = load_model(name, torch.bfloat16)
    prompt = torch.randint(0, base.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    bf16_prefill, bf16_decode, _ = speed(base, prompt, new_tokens)
    print(f"bf16 eager:  prefill {bf16_prefill:8.1f} tokens/s, decode {bf16_decode:6.2f} tokens/s")

    model = copy.deepcopy(base)
    config = tme.MXFP4BlockRotConfig(act_quant=not args.weight_only)
    quantize_(model, config, filter_fn=quantizable_filter(model))  # 1.
    # The attention compile_decoder_layers switches to (4.), here for the eager reference too: on CPUs
    # below AVX-512 its one-token steps run our decode-attention kernel, whose softmax weights stay
    # float32 where ATen's bf16 sdpa rounds them, a difference W4A4 can turn into other tokens.
    use_packed_gqa_attention(model)
    eager = greedy_generate(model, prompt, new_tokens)
    eager_tokens = eager["tokens"]
    groups = tme.share_input_quantization(model)  # 2.
    tme.cache_dequantized_weights(model)  # 3.
    t0 = time.perf_counter()
    tme.compile_decoder_layers(model)  # 4.
    q_prefill, q_decode, run = speed(model, prompt, new_tokens)  # 5. (the warm-up compiles)
    print(f"MXFP4 {'weight-only' if args.weight_only else 'W4A4'} compiled ({groups} shared input groups; "
          f"built and compiled in {time.perf_counter() - t0:.0f} s with the timing runs):")
    print(f"             prefill {q_prefill:8.1f} tokens/s ({q_prefill / bf16_prefill:.2f}x bf16), "
          f"decode {q_decode:6.2f} tokens/s ({q_decode / bf16_decode:.2f}x bf16)")
    # compile_decoder_layers makes Inductor round fused bfloat16 intermediates as eager does; without
    # that, activation quantization turns the rounding differences into whole FP4 steps.
    diff = (run["prefill_logits"].float() - eager["prefill_logits"].float()).abs().max().item()
    scale = eager["prefill_logits"].float().abs().max().item()
    same = (run["tokens"] == eager_tokens).float().mean().item()
    print(f"vs the eager quantized model: prompt logits max |diff| {diff:.3f} (logits up to {scale:.1f}); "
          f"{100 * same:.0f}% of the greedy tokens equal")

    out = Path(args.out)
    save_pretrained(model, out, tokenizer=tok)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    use_packed_gqa_attention(reloaded)
    same = torch.equal(greedy_generate(reloaded, prompt, new_tokens)["tokens"], eager_tokens)
    print(f"reloaded checkpoint (plain per-linear weights) generates the same tokens: {same}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
