"""All GPU checks and timings in one short script (a few minutes), for the moments a GPU is lent.

    python benchmarks/gpu_check.py [--layers 30] [--prompt-len 512] [--new-tokens 32] [--json PATH]
    python benchmarks/gpu_check.py --device cpu --layers 1 --prompt-len 16 --new-tokens 2   # plumbing only

CPU CI runs only the plumbing (``--device cpu``, ``tests/test_benchmarks.py``). What it does, on ``cuda:0``:

1. Linear level, bfloat16, ``MXFP4BlockRotConfig`` W4A4 and weight-only on SmolLM2-135M's shapes:
   compiled (``fullgraph=True``) equals eager; the same quantized layer on CPU in float32 agrees (same
   codes, different accumulation); the compiled code's Triton kernels are listed (activation
   rotate+quantize, weight decode) and counted.
2. The Blackwell MXFP4 tensor-core GEMM (``kernels/cuda_mxfp4_mm.py``) where the GPU has it: against
   the emulation, and timed against a bf16 GEMM and the emulation at prefill sizes. Elsewhere reported
   as unavailable.
3. A random-weight decoder with SmolLM2-135M's configuration (nothing to download; speed does not depend
   on the values): prefill and static-cache decode tokens/s for bf16 eager, bf16 compiled, ours W4A4 and
   weight-only compiled (``compile_decoder_layers``, shared input quantization), W4A4 with
   ``cache_dequantized_weights``; compiled logits against eager.

Prints a summary and writes JSON (``$OUT/gpu_check.json`` when ``$OUT`` is set, else
``benchmarks/results/gpu_check.json``).
"""

import argparse
import copy
import json
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torchao.quantization import quantize_

import torchao_mx_ext as tme
from torchao_mx_ext.eval.generation import greedy_generate, static_cache
from torchao_mx_ext.kernels import cuda_mxfp4_mm
from torchao_mx_ext.recipes import quantize_linears
from torchao_mx_ext.regional_compile import register_packed_gqa_sdpa

SHAPES = ((576, 576), (576, 1536), (1536, 576))  # (in, out) of SmolLM2-135M's linears


DEVICE = torch.device("cuda")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn, repeats: int = 20) -> float:
    """Median seconds per call (CUDA events, after 3 warm-up calls; wall clock on CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if DEVICE.type != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def generated_kernels(code: str):
    """Inductor's kernels in generated code: Triton (GPU) or C++ (CPU)."""
    return sorted(set(re.findall(r"\b(triton_\w+)\.run\(", code)) | set(re.findall(r"\b(cpp_fused\w*)\(", code)))


def linear_checks(shapes=SHAPES) -> list:
    rows = []
    for k, n in shapes:
        for name, config in (("w4a4", tme.MXFP4BlockRotConfig()), ("weight_only", tme.MXFP4BlockRotConfig(act_quant=False))):
            torch.manual_seed(0)
            cpu = torch.nn.Linear(k, n, bias=False)
            quantize_(cpu, config)
            gpu = copy.deepcopy(cpu).to(DEVICE).to(torch.bfloat16)
            x = torch.randn(256, k)
            xg = x.to(DEVICE).to(torch.bfloat16)
            with torch.inference_mode():
                eager = gpu(xg)
                # emulate_precision_casts: keeps eager's bf16 roundings (README), e.g. of the input a
                # float32 GEMM reads on CPUs without bf16 GEMM instructions.
                compiled_fn = torch.compile(gpu, fullgraph=True, options={"emulate_precision_casts": True})
                compiled, code = run_and_get_code(compiled_fn, xg)
                reference = cpu(xg.float().cpu())
            kernels = generated_kernels("\n".join(code))
            scale = reference.abs().max().item()
            rows.append({
                "shape": f"{k}x{n}", "variant": name,
                "compiled_vs_eager_max_abs": (compiled.float() - eager.float()).abs().max().item(),
                "gpu_bf16_vs_cpu_fp32_max_rel": (eager.float().cpu() - reference).abs().max().item() / scale,
                "kernels": kernels,
                "kernel_count": len(kernels),
                # our operators called from the graph (on AVX-512 VNNI CPUs a W4A4 linear is one GEMV call)
                "extern_ops": sorted(set(re.findall(r"torch\.ops\.torchao_mx_ext\.(\w+)\.default\(", "\n".join(code)))),
                "eager_ms": 1e3 * cuda_time(lambda: gpu(xg)),
                "compiled_ms": 1e3 * cuda_time(lambda: compiled_fn(xg)),
                "bf16_linear_ms": 1e3 * cuda_time(lambda w=torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16): F.linear(xg, w)),
            })
    return rows


def hardware_gemm_checks() -> dict:
    device = DEVICE
    if not cuda_mxfp4_mm.hardware_available(device):
        capability = list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
        return {"available": False, "capability": capability}
    out = {"available": True, "rows": []}
    for m, k, n in ((2048, 576, 1536), (8192, 1536, 576), (8192, 4096, 4096)):
        lin = torch.nn.Linear(k, n, bias=False).cuda().to(torch.bfloat16)
        quantize_(lin, tme.MXFP4BlockRotConfig())
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            os.environ[cuda_mxfp4_mm.ENV_FLAG] = "0"
            emulated_fn = torch.compile(lambda t: lin(t))
            emulated = emulated_fn(x).float()
            t_emulated = cuda_time(lambda: emulated_fn(x))
            os.environ[cuda_mxfp4_mm.ENV_FLAG] = "1"
            hardware = lin(x).float()
            t_hardware = cuda_time(lambda: lin(x))
            os.environ[cuda_mxfp4_mm.ENV_FLAG] = "0"
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = cuda_time(lambda: F.linear(x, w))
        out["rows"].append({
            "mkn": [m, k, n],
            "max_rel_diff_vs_emulation": ((hardware - emulated).abs().max() / emulated.abs().max()).item(),
            "hardware_ms": 1e3 * t_hardware, "emulated_compiled_ms": 1e3 * t_emulated, "bf16_ms": 1e3 * t_bf16,
        })
    return out


def smollm2_like(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def model_checks(args) -> list:
    base = smollm2_like(args.layers)
    prompt = torch.randint(0, base.config.vocab_size, (1, args.prompt_len), device=DEVICE)
    rows, eager_logits = [], {}
    variants = ("bf16", "bf16_compiled", "ours_w4a4_compiled", "ours_wo_compiled", "ours_w4a4_cached_compiled")
    for variant in variants:
        torch._dynamo.reset()
        model = copy.deepcopy(base).to(DEVICE).to(torch.bfloat16)
        if variant.startswith("ours"):
            quantize_linears(model, tme.MXFP4BlockRotConfig(act_quant="_wo" not in variant))
            tme.share_input_quantization(model)
            if "cached" in variant:
                tme.cache_dequantized_weights(model)
            # The attention the compiled model runs (compile_decoder_layers switches to it): on CPUs
            # below AVX-512 its decode step is our kernel, whose float32 softmax weights ATen's bf16
            # sdpa rounds, so an sdpa reference would differ by that, not by compilation.
            register_packed_gqa_sdpa()
            model.set_attn_implementation(tme.PACKED_GQA_SDPA)
            eager_logits[variant] = greedy_generate(model, prompt, 2)["step_logits"][-1].float()
        t0 = time.perf_counter()
        if variant.endswith("compiled"):
            tme.compile_decoder_layers(model)
        cache = static_cache(model, args.prompt_len + args.new_tokens)
        with torch.inference_mode():
            warm = greedy_generate(model, prompt, 2, cache=cache)
            sync()
            compile_s = time.perf_counter() - t0
            best_prefill, best_decode = float("inf"), float("inf")
            for _ in range(3):
                sync()
                r = greedy_generate(model, prompt, args.new_tokens, cache=cache)
                sync()
                best_prefill, best_decode = min(best_prefill, r["prefill_s"]), min(best_decode, r["decode_s"])
        row = {
            "variant": variant, "compile_s": compile_s if variant.endswith("compiled") else None,
            "prefill_tokens_per_s": args.prompt_len / best_prefill, "decode_tokens_per_s": args.new_tokens / best_decode,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None,
        }
        if variant in eager_logits:
            e = eager_logits[variant]
            row["compiled_vs_eager_max_rel"] = ((warm["step_logits"][-1].float() - e).abs().max() / e.abs().max()).item()
        rows.append(row)
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        del model, cache
    base_row = rows[0]
    for r in rows:
        r["prefill_vs_bf16"] = r["prefill_tokens_per_s"] / base_row["prefill_tokens_per_s"]
        r["decode_vs_bf16"] = r["decode_tokens_per_s"] / base_row["decode_tokens_per_s"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-model", action="store_true", help="linear and GEMM checks only")
    p.add_argument("--quick", action="store_true", help="one linear shape (dry runs)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the plumbing")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (or --device cpu for a dry run)")
    t0 = time.perf_counter()
    on_gpu = DEVICE.type == "cuda"
    report = {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "capability": list(torch.cuda.get_device_capability(0)) if on_gpu else None,
        "torch": torch.__version__,
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    sections = [("linear", lambda: linear_checks(SHAPES[:1] if args.quick else SHAPES)), ("hardware_mxfp4_gemm", hardware_gemm_checks)]
    if not args.skip_model:
        sections.append(("model", lambda: model_checks(args)))
    for name, fn in sections:
        s0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not hide the others' numbers
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{time.perf_counter() - t0:5.0f} s] {name} ({time.perf_counter() - s0:.0f} s):")
        print(json.dumps(report[name], indent=1)[:4000], flush=True)
    report["total_s"] = time.perf_counter() - t0
    out = Path(args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else "benchmarks/results/gpu_check.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
