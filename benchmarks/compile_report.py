"""What Inductor makes of one quantized decoder layer: the kernels in the generated code, by kind.

    python benchmarks/compile_report.py [--model smollm2-135m] [--prompt-len 128] [--dtype bf16]
        [--variants bf16,w4a4,w4a4_shared,wo,wo_shared,w4a4_shared_cached] [--json benchmarks/results/compile_report.json]

For each variant the decoder is cut to its first layer and to its first two layers, each compiled whole
(``torch.compile(fullgraph=True, dynamic=False)``, Inductor, CPU) for the prefill of a ``[1, L]``
prompt into a static KV cache, and the calls in the generated ``call`` function are listed: Inductor's
fused C++ kernels (``cpp_fused_*``), external GEMMs (``extern_kernels.mm``) and ATen fallbacks
(``torch.ops.aten.*``). One decoder layer = the two-layer list minus the one-layer list (kernel names
without their numeric suffix): the steady-state layer, whose leading residual add is fused with its
RMSNorm. Each call is put in a category by the ATen ops Inductor names it after (see ``classify``);
``benchmarks/README.md`` explains the result.

Variants: ``bf16`` dense; ``w4a4`` / ``wo`` ours (``MXFP4BlockRotConfig``, W4A4 / weight-only), each
linear rotating (and quantizing) its own input; ``*_shared`` with ``share_input_quantization`` (q/k/v
and gate/up share one); ``*_cached`` with ``cache_dequantized_weights``.
"""

import argparse
import collections
import copy
import itertools
import json
import platform
import re
import time
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

import torchao_mx_ext as tme
from torchao_mx_ext.eval.generation import static_cache
from torchao_mx_ext.recipes import quantize_linears
from torchao_mx_ext.zoo import load_model

VARIANTS = ("bf16", "w4a4", "w4a4_shared", "wo", "wo_shared", "w4a4_shared_cached")
ROTATION_SIZE = 32

CALL = re.compile(
    r"^\s*(?:\w+\s*=\s*)?(?P<what>"
    r"(?P<cpp>cpp_fused\w*)\("
    r"|(?P<triton>triton_\w+)\.run\("
    r"|extern_kernels\.(?P<extern>\w+)\((?P<extern_args>.*)"
    r"|torch\.ops\.(?P<ns>\w+)\.(?P<op>\w+)(?:\.\w+)?\("
    r")"
)


def calls(code: str):
    """Ordered ``(kind, name, detail)`` of the kernel calls in the generated ``call`` function."""
    body = code.split("def call(", 1)[1]
    out = []
    for line in body.splitlines():
        m = CALL.match(line)
        if not m:
            continue
        if m["cpp"] or m["triton"]:
            out.append(("inductor", re.sub(r"_\d+$", "", m["cpp"] or m["triton"]), ""))
        elif m["extern"]:
            # The first operand's inner size tells the block rotation's small GEMM (x.reshape(-1, 32) @ H)
            # from a linear's GEMM.
            shape = re.match(r"\s*reinterpret_tensor\(\w+, \((?P<dims>[^)]*)\)", m["extern_args"])
            inner = int(shape["dims"].split(",")[-1]) if shape and shape["dims"].strip() else None
            out.append(("extern", m["extern"], "rotation" if inner == ROTATION_SIZE else "gemm"))
        else:
            out.append(("fallback", f"{m['ns']}.{m['op']}", ""))
    return out


def classify(kind: str, name: str, detail: str) -> str:
    """The part of the layer a call implements, from the ops it is named after."""
    if kind == "extern":
        return "block rotation x@H (extern mm)" if detail == "rotation" else "linear GEMM (extern mm)"
    if kind == "fallback":
        if "scaled_dot_product" in name:
            return "attention (SDPA, ATen fallback)"
        if name.endswith(".cat"):
            return "weight decode: nibble interleave (ATen cat fallback)"
        if "index_copy" in name or "index_put" in name:
            return "KV-cache write (ATen fallback)"
        if "cumsum" in name:
            return "attention mask: packed-sequence check (ATen fallback)"
        if "mxfp4_gemv" in name:
            return "linear: fused MXFP4 dequant-GEMV (custom op)"
        if "mxfp4_rotate_fake_quantize" in name:
            return "block rotation + activation quantize (C++ op; the rotation alone for weight-only)"
        if "mxfp4_fake_quantize" in name:
            return "activation quantize (C++ op)"
        if "mxfp4_dequantize" in name:
            return "weight decode (C++ op)"
        if "mxfp4_mm" in name:
            return "linear: integer MXFP4 GEMM (custom op)"
        return f"other ATen fallback ({name})"
    ops = set(name.split("_"))
    if "amax" in name:
        return "activation rotate+quantize (fused)"
    if "rsqrt" in ops and "mean" in ops:
        return "residual add + RMSNorm (fused)" if "add" in ops else "RMSNorm (fused)"
    if "silu" in ops:
        return "SiLU * up (fused)"
    if "cumsum" in ops:
        return "attention mask: packed-sequence check (fused)"
    if "cos" in ops or "sin" in ops or ({"cat", "neg", "slice"} <= ops):
        return "RoPE / attention mask (fused)"
    if "rshift" in name or "lshift" in name or "bitwise" in name:
        return "weight decode: FP4 codes x E8M0 scales (fused)"
    if "index" in ops and "copy" in name:
        return "KV-cache write (fused)"
    if ops <= {"", "cpp", "fused", "to", "copy", "unsafe", "view", "transpose", "clone", "mxfp4", "gemv"}:
        return "layout / dtype copy (fused)"
    return "other (fused)"


def truncated(base, n: int):
    layers = base.model.layers
    try:
        base.model.layers = layers[:n]
        model = copy.deepcopy(base)
    finally:
        base.model.layers = layers
    model.config.num_hidden_layers = n
    return model


def prepare(model, variant: str):
    if variant == "bf16":
        return model
    quantize_linears(model, tme.MXFP4BlockRotConfig(act_quant=variant.startswith("w4a4")))
    if "_shared" in variant:
        tme.share_input_quantization(model)
    if variant.endswith("_cached"):
        tme.cache_dequantized_weights(model)
    return model


def compiled_code(model, prompt, phase: str):
    """Generated code of the prefill graph (``[1, L]`` ids) or of the decode-step graph (``[1, 1]`` ids;
    its shapes do not depend on how full the ``L``-long static cache is)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    cache = static_cache(model, prompt.shape[1])
    ids = prompt if phase == "prefill" else prompt[:, :1]
    t0 = time.perf_counter()
    with torch.inference_mode():
        _, code = run_and_get_code(lambda: compiled(ids, cache=cache, use_cache=True, logits_to_keep=1))
    return "\n".join(code), time.perf_counter() - t0


def report(base, variant: str, prompt, phase: str) -> dict:
    lists, seconds = {}, {}
    for n in (1, 2):
        code, seconds[n] = compiled_code(prepare(truncated(base, n), variant), prompt, phase)
        lists[n] = calls(code)
    one, two = collections.Counter(lists[1]), collections.Counter(lists[2])
    layer = two - one
    gone = one - two  # kernels of the 1-layer graph that the 2-layer graph fuses differently
    by_category = collections.Counter()
    for call, count in layer.items():
        by_category[classify(*call)] += count
    for call, count in gone.items():
        by_category[classify(*call)] -= count
    return {
        "variant": variant,
        "phase": phase,
        "calls_per_layer": sum(two.values()) - sum(one.values()),
        "inductor_kernels_per_layer": sum(c for (k, *_), c in two.items() if k == "inductor") - sum(c for (k, *_), c in one.items() if k == "inductor"),
        "by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "layer_calls": [{"kind": k, "name": n, "detail": d, "count": c, "category": classify(k, n, d)} for (k, n, d), c in sorted(layer.items())],
        "one_layer_only": [{"kind": k, "name": n, "detail": d, "count": c} for (k, n, d), c in sorted(gone.items())],
        "two_layer_sequence": [f"{k}:{n}{':' + d if d else ''}" for k, n, d in lists[2]],
        "compile_s": {"1_layer": seconds[1], "2_layers": seconds[2]},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--phases", default="prefill,decode")
    p.add_argument("--json", default="benchmarks/results/compile_report.json")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base, _ = load_model(args.model, dtype)
    prompt = torch.randint(0, base.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    rows = []
    variants = [v for v in args.variants.split(",") if v]
    phases = [v for v in args.phases.split(",") if v]
    for bad in sorted(set(variants) - set(VARIANTS)) + sorted(set(phases) - {"prefill", "decode"}):
        p.error(f"unknown variant or phase {bad!r}; variants: {', '.join(VARIANTS)}; phases: prefill, decode")
    for phase, variant in itertools.product(phases, variants):
        rows.append(report(base, variant, prompt, phase))
        r = rows[-1]
        print(f"\n== {variant}, {phase}: {r['calls_per_layer']} calls per decoder layer ({r['inductor_kernels_per_layer']} Inductor kernels); "
              f"compile {r['compile_s']['1_layer']:.0f} s (1 layer), {r['compile_s']['2_layers']:.0f} s (2 layers)")
        for cat, count in r["by_category"].items():
            print(f"   {count:>3}  {cat}")
        for c in r["layer_calls"]:
            print(f"        {c['count']:>2} x {c['kind']:<8} {c['name'][:110]}{' (' + c['detail'] + ')' if c['detail'] else ''}")
        for c in r["one_layer_only"]:
            print(f"       -{c['count']:>2} x {c['kind']:<8} {c['name'][:110]} (only in the 1-layer graph)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "settings": {"model": args.model, "prompt_len": args.prompt_len, "dtype": args.dtype, "cache": "static KV cache of prompt_len"},
        "rows": rows,
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
