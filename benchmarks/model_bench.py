"""Whole-model speed and memory: prefill and decode tokens/s, peak memory and model size, side by side.

    python benchmarks/model_bench.py [--model smollm2-135m] [--prompt-len 512] [--new-tokens 32]
        [--variants LIST] [--compile layers|model] [--rounds 3] [--decode-batches 8,32]
        [--json benchmarks/results/model_bench.json]
    python benchmarks/model_bench.py --fast      # stories260k, 32-token prompt, 4 new tokens: a smoke run

Rows (``--variants``, default all): dense ``fp32``, ``bf16`` and ``bf16_compiled``; torchao's emulated
MXFP4 (``MXDynamicActivationMXWeightConfig``, FP4 weights and activations, ``KernelPreference.EMULATED``,
bf16 only, eager: it does not compile on CPU); ours (``MXFP4BlockRotConfig``, block Hadamard, bf16
model) W4A4 (``ours_w4a4*``) and weight-only (``ours_wo*``), eager, compiled, and compiled with
``cache_dequantized_weights``. Every linear but ``lm_head`` is quantized; the ``*_int8_head`` and
``*_mxfp4_head`` rows also quantize ``lm_head`` (``tme.quantize_output_head``: untied from the embedding,
weight-only int8 with per-row scales, or RTN MXFP4). Compiled rows take their batch-1 decode steps as
one C++ call (``torchao_mx_ext/decoder_step.py``, on by default in both compile entry points); the
``*_graph`` rows are their namesakes with those steps in the compiled graph instead. Ours runs with
``share_input_quantization`` (q/k/v and gate/up rotate and quantize their common input once; exact,
see ``torchao_mx_ext/shared_quant.py``); ``--no-share`` turns it off.

llama.cpp rows (``llama.cpp_bf16``, ``llama.cpp_q4_0``, ``llama.cpp_mxfp4``): the same model in llama.cpp,
timed by ``llama-bench`` in the same interleaved rounds with the same thread count: bf16 (llama.cpp's
converter), Q4_0 (its ``llama-quantize``) and ours (``torchao-mx export --format gguf``, RTN weight-only
MXFP4, ggml's MXFP4 type), each GGUF built once by ``benchmarks/llama_cpp_bench.py`` into the cache.
Prefill: ``-p <prompt-len> -n 0``; decode: ``-n <new-tokens> -d <prompt-len>`` (generation at the depth a
prompt leaves). Skipped with a message where llama.cpp is not built (``bash scripts/build_llama_cpp.sh``).

Batch serving (``--decode-batches``, default ``8,32``): per row and batch size B, B streams with prompts of
``--batch-prompt-len`` tokens (default 64) decode ``--new-tokens`` steps together (one ``[B, 1]`` call a
step, static cache for B); the ``b<B> tok/s`` columns are B * steps over the decode time, timed in the
same rounds right after the row's single-stream generation. For llama.cpp rows they come from
``llama-batched-bench -npp <batch-prompt-len> -ntg <new-tokens> -npl <B>`` (its ``t_tg``), where it is built.

Each row runs in a subprocess of its own. They are started one after the other (builds and compiles
never overlap): load, quantize, warm up (this compiles), then wait. Then the timing runs in
``--rounds`` interleaved rounds: in each, every row in turn runs one greedy generation with a static KV
cache (``torchao_mx_ext.eval.generation``: one ``[1, L]`` prefill, then ``--new-tokens`` one-token
steps), the order rotating between rounds, while the other rows' processes sleep; so a drift of the
machine's speed (measured: bf16 decode 17.6 to 23.8 tok/s between runs an hour apart) hits all rows
alike. A row slower than ``--slow-s`` per generation (torchao's emulation) runs in the first round
only. The fastest prefill and the fastest decode of each row are kept (all are in the JSON).
Memory is read from ``/proc/self/status``:
the resident peak is reset (``clear_refs``) after the warm-up, so ``peak_rss_mb`` is the peak while
generating one stream (weights resident + activations + KV cache + the runtime; read before the batch
generations of the first round) and ``gen_delta_mb`` its rise over
the RSS before it; ``rss_runtime_mb`` is the RSS once torch, transformers, torchao and ours are imported
(no model yet); ``process_peak_mb`` is the whole subprocess's peak (loading, quantizing, compiling).
Model size is the bytes of parameters and buffers (each storage once; quantized weights as codes +
scales + rotation block), the dequantized-weight cache counted apart (``cache_mb``).

``--compile layers`` (default) compiles each decoder layer with ``tme.compile_decoder_layers``
(``torch.compile(fullgraph=True, dynamic=False)`` per layer, each layer in its own Dynamo cache with
module guards skipped, and GQA-packed decode attention: see ``torchao_mx_ext/regional_compile.py``);
all layers have the same code, so Inductor's FX-graph cache makes layers 2..N cheap (embedding, mask
and ``lm_head`` run eager). The same for ``bf16_compiled`` and ours. ``--compile model`` compiles the whole model as one graph
per input shape with ``tme.compile_model`` (the same options: own Dynamo cache, module guards skipped,
GQA-packed decode attention, ``emulate_precision_casts``): no Python between layers, the faster decode,
at 1.5-3 minutes of compile per row on this 2-core CPU (``compile_s``), hence not the default.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MARK = "MODEL_BENCH_ROW "
VARIANTS = (
    "fp32",
    "bf16",
    "bf16_compiled",
    "torchao_mxfp4_emulated",
    "ours_w4a4",
    "ours_w4a4_compiled",
    "ours_w4a4_compiled_cached",
    "ours_wo",
    "ours_wo_compiled",
    "ours_wo_compiled_cached",
    "ours_w4a4_compiled_int8_head",
    "ours_wo_compiled_int8_head",
    "ours_w4a4_compiled_int8_head_graph",
    "ours_wo_compiled_int8_head_graph",
    "ours_wo_compiled_mxfp4_head",
    "llama.cpp_bf16",
    "llama.cpp_q4_0",
    "llama.cpp_mxfp4",
)
BASELINE = "bf16"
# llama.cpp rows: the GGUF each runs (benchmarks/llama_cpp_bench.py builds them once into the cache).
LLAMA_CPP_ROWS = {"llama.cpp_bf16": "bf16", "llama.cpp_q4_0": "q4_0", "llama.cpp_mxfp4": "ours_rtn_mxfp4"}


# -- measurement helpers (worker side) -----------------------------------------------------------------

def batch_sizes(args) -> list:
    return [int(b) for b in str(args.decode_batches).split(",") if b.strip()]


def batch_columns(batch_decode: dict, new_tokens: int) -> dict:
    """A row's batch-serving entries from ``{B: [decode seconds per round]}``: tokens/s over all B streams
    (B * ``new_tokens`` per generation, best of the rounds) and every time."""
    return {
        "batch_decode_tokens_per_s": {str(b): b * new_tokens / min(t) for b, t in batch_decode.items()},
        "batch_decode_s_all": {str(b): t for b, t in batch_decode.items()},
    }


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_memory() -> None:
    gc.collect()
    try:  # return freed heap pages to the OS, so RSS is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _storages(tensors):
    """``{(data_ptr, nbytes): in_cache}`` of the storages behind ``tensors``, each once; tensor
    subclasses by their inner tensors (``in_cache``: under a ``dequantized`` cache)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    found = {}

    def visit(t, in_cache):
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            for n in names:
                visit(getattr(t, n), in_cache or n == "dequantized")
            return
        storage = t.untyped_storage()
        found.setdefault((storage.data_ptr(), storage.nbytes()), in_cache)

    for t in tensors:
        visit(t, False)
    return found


def model_bytes(model) -> dict:
    """Bytes of the model's parameters and buffers, each storage once; tensor subclasses are counted by
    their inner tensors (our MXFP4 weights: codes + E8M0 scales + rotation block), the dequantized-weight
    cache apart."""
    storages = _storages(list(model.parameters()) + list(model.buffers()))
    total = sum(nbytes for (_, nbytes), in_cache in storages.items() if not in_cache)
    cache = sum(nbytes for (_, nbytes), in_cache in storages.items() if in_cache)
    return {"model_mb": total / 2**20, "cache_mb": cache / 2**20, "linear_weight_bits": linear_weight_bits(model)}


def linear_weight_bits(model) -> float:
    """Stored bits per weight of the linears ``build`` quantizes (all but ``lm_head``), without a
    dequantized cache: 16 for bf16, 4.25 for MXFP4 (codes + one E8M0 scale per 32) plus the rotation
    block, shared by all (counted once here)."""
    linears = [m for fqn, m in model.named_modules() if _quantizable(m, fqn)]
    storages = _storages([m.weight for m in linears])
    nbytes = sum(n for (_, n), in_cache in storages.items() if not in_cache)
    return 8 * nbytes / max(sum(m.in_features * m.out_features for m in linears), 1)


def _quantizable(module, fqn) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and fqn.split(".")[-1] != "lm_head"


def build(variant: str, args):
    """(model ready to call, notes) for one row."""
    graph_decode = variant.endswith("_graph")  # compiled rows: decode steps in the graph, not the fused C++ step
    variant = variant.removesuffix("_graph")
    import torch
    from torchao.quantization import quantize_

    import torchao_mx_ext as tme
    from torchao_mx_ext.recipes import quantize_linears
    from torchao_mx_ext.zoo import load_model

    model, _ = load_model(args.model, torch.float32 if variant == "fp32" else torch.bfloat16)
    if args.layers:  # smoke tests: the first N decoder layers only
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = len(model.model.layers)
    notes = {"dtype": "float32" if variant == "fp32" else "bfloat16"}
    if variant == "torchao_mxfp4_emulated":
        from torchao.prototype.mx_formats.inference_workflow import MXDynamicActivationMXWeightConfig
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

        config = MXDynamicActivationMXWeightConfig(
            activation_dtype=torch.float4_e2m1fn_x2, weight_dtype=torch.float4_e2m1fn_x2,
            kernel_preference=KernelPreference.EMULATED,
        )
        # torchao's MX needs widths divisible by 32 (stories260k's MLP is 172 wide): others stay bf16.
        skipped = [f for f, m in model.named_modules() if _quantizable(m, f) and m.in_features % 32]
        quantize_(model, config, filter_fn=lambda m, f: _quantizable(m, f) and m.in_features % 32 == 0)
        notes["config"] = "MXDynamicActivationMXWeightConfig(fp4 e2m1, EMULATED)"
        notes["left_in_bf16"] = skipped
    elif variant.startswith("ours_"):
        config = tme.MXFP4BlockRotConfig(act_quant=not variant.startswith("ours_wo"))
        quantize_linears(model, config)
        notes["config"] = f"MXFP4BlockRotConfig(act_quant={config.act_quant})"
        notes["shared_input_quant"] = (not args.no_share) and tme.share_input_quantization(model) > 0
        if variant.endswith("_cached"):
            tme.cache_dequantized_weights(model)
            notes["cache_dequantized_weights"] = True
        if variant.endswith("_int8_head"):
            tme.quantize_output_head(model, "int8")  # lm_head untied from the embedding, int8 weight-only
            notes["lm_head"] = "int8 weight-only"
        elif variant.endswith("_mxfp4_head"):
            tme.quantize_output_head(model, tme.MXFP4Config(act_quant=False))
            notes["lm_head"] = "MXFP4 weight-only (RTN)"
    if "_compiled" in variant:
        notes["compile"] = args.compile
        if args.compile == "model":
            # One graph per shape, its own Dynamo cache, module guards skipped, GQA-packed decode attention.
            tme.compile_model(model, backend=args.backend, fused_decode=not graph_decode)
            notes["attn_implementation"] = model.config._attn_implementation
        else:
            # Each layer in its own Dynamo cache, module guards skipped, GQA-packed decode attention.
            tme.compile_decoder_layers(model, backend=args.backend, fused_decode=not graph_decode)
            notes["attn_implementation"] = model.config._attn_implementation
        notes["decode_step"] = "fused C++ step" if hasattr(model, "_tme_decode_step") else "compiled graph"
    return model, notes


class Row:
    """One row's model, built and warmed up (compiled rows compile here), ready for timed generations."""

    def __init__(self, variant: str, args):
        import torch

        from torchao_mx_ext.eval.generation import greedy_generate, static_cache

        import transformers  # noqa: F401  (imported before the baseline RSS below)
        import torchao_mx_ext  # noqa: F401

        if args.threads:
            torch.set_num_threads(args.threads)
        self.variant, self.args, self._generate = variant, args, greedy_generate
        self.rss_runtime = _status_mb("VmRSS")  # torch, transformers, torchao and ours imported, no model yet
        t0 = time.perf_counter()
        self.model, self.notes = build(variant, args)
        self.build_s = time.perf_counter() - t0
        self.sizes = model_bytes(self.model)
        vocab = self.model.config.vocab_size
        self.prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
        self.cache = static_cache(self.model, args.prompt_len + args.new_tokens)
        # Batch serving: B streams decoding together (prompt [B, --batch-prompt-len]), each its own cache.
        self.batches = {}
        for b in batch_sizes(args):
            prompt = torch.randint(0, vocab, (b, args.batch_prompt_len), generator=torch.Generator().manual_seed(b))
            self.batches[b] = (prompt, static_cache(self.model, args.batch_prompt_len + args.new_tokens, b))
        self.batch_decode = {b: [] for b in self.batches}
        with torch.inference_mode():
            # Warm-up: compiles the prompt graph and the decode-step graph of compiled rows (per batch size).
            self.warm = greedy_generate(self.model, self.prompt, min(2, args.new_tokens), cache=self.cache)
            for prompt, cache in self.batches.values():
                greedy_generate(self.model, prompt, min(2, args.new_tokens), cache=cache)
        _release_memory()
        self.rss_before = _status_mb("VmRSS")
        self.reset = _reset_peak()
        self.prefill, self.decode, self.tokens, self.runs = [], [], None, 0
        self.peak_single = None

    def run(self) -> dict:
        """One timed generation, then one per batch size: ``{"prefill_s", "decode_s", "batch_decode_s"}``."""
        import torch

        with torch.inference_mode():
            r = self._generate(self.model, self.prompt, self.args.new_tokens, cache=self.cache)
            if self.peak_single is None:  # the single-stream peak, before the batches raise it
                self.peak_single = _status_mb("VmHWM")
            batch_s = {b: self._generate(self.model, prompt, self.args.new_tokens, cache=cache)["decode_s"]
                       for b, (prompt, cache) in self.batches.items()}
        self.prefill.append(r["prefill_s"])
        self.decode.append(r["decode_s"])
        for b, t in batch_s.items():
            self.batch_decode[b].append(t)
        self.tokens, self.runs = r["tokens"], self.runs + 1
        return {"prefill_s": r["prefill_s"], "decode_s": r["decode_s"], "batch_decode_s": batch_s}

    def result(self) -> dict:
        from torch._dynamo.utils import counters

        args, variant = self.args, self.variant
        prefill, decode = min(self.prefill), min(self.decode)
        peak = self.peak_single if self.peak_single is not None else _status_mb("VmHWM")
        compiled = "_compiled" in variant
        warm = self.warm
        return {
            "variant": variant,
            **self.notes,
            "prefill_tokens_per_s": args.prompt_len / prefill,
            "decode_tokens_per_s": args.new_tokens / decode,
            "prefill_s": prefill,
            "decode_ms_per_token": 1e3 * decode / args.new_tokens,
            **batch_columns(self.batch_decode, args.new_tokens),
            "timed_runs": self.runs,
            "prefill_s_all": self.prefill,
            "decode_s_all": self.decode,
            "warmup_prefill_s": warm["prefill_s"],
            "warmup_decode_s": warm["decode_s"],
            # compile time: the warm-up (prefill graph, decode-step graph) minus the same calls once compiled
            "compile_s": (
                max(0.0, warm["prefill_s"] - prefill) + max(0.0, warm["decode_s"] - decode * len(warm["step_logits"]) / args.new_tokens)
                if compiled else None
            ),
            **self.sizes,
            "rss_runtime_mb": self.rss_runtime,
            "rss_before_gen_mb": self.rss_before,
            "peak_rss_mb": peak if self.reset else float("nan"),
            "gen_delta_mb": peak - self.rss_before if self.reset else float("nan"),
            "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "build_s": self.build_s,
            "first_tokens": self.tokens[0, :8].tolist(),
            "fxgraph_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
        }


def serve(variant: str, args) -> None:
    """Worker process: build and warm up one row, then one timed generation per ``run`` line on stdin
    (answered with a ``MARK`` line), and the row's result on ``done``."""
    row = Row(variant, args)
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            print(MARK + json.dumps(row.run()), flush=True)
        elif command == "done":
            print(MARK + json.dumps(row.result()), flush=True)
            return


# -- driver --------------------------------------------------------------------------------------------

class Worker:
    """The driver's handle on one row's subprocess (``serve``)."""

    def __init__(self, variant: str, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--model", args.model,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--compile", args.compile, "--backend", args.backend, "--threads", str(args.threads),
               "--layers", str(args.layers), "--decode-batches", args.decode_batches,
               "--batch-prompt-len", str(args.batch_prompt_len)]
        if args.no_share:
            cmd.append("--no-share")
        self.variant, self.t0 = variant, time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.error = None
        self.reply()  # built and warmed up

    def reply(self):
        if self.error:
            return None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        tail = "\n".join(self.proc.stderr.read().strip().splitlines()[-15:])
        self.error = f"exit {self.proc.returncode}: {tail}"
        return None

    def ask(self, command: str):
        if self.error:
            return None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def finish(self) -> dict:
        row = self.ask("done")
        self.proc.wait()
        if row is None:
            return {"variant": self.variant, "error": self.error}
        row["subprocess_s"] = time.perf_counter() - self.t0
        return row


class LlamaCppWorker:
    """A llama.cpp row, with the interface of :class:`Worker`: each ``run`` is one ``llama-bench``
    measurement of the prefill of ``--prompt-len`` tokens and of ``--new-tokens`` decode steps at that
    context depth, on the same thread count (``--threads``, or all cores). Where llama.cpp is not built,
    the row is skipped with a message (no error)."""

    def __init__(self, variant: str, args):
        import llama_cpp_bench as lcb

        self.variant, self.args, self.lcb, self.t0 = variant, args, lcb, time.perf_counter()
        self.threads = args.threads or os.cpu_count()
        self.error = self.skipped = None
        self.prefill, self.decode, self.batch_decode = [], [], {}
        missing = lcb.missing_tools()
        if missing:
            self.skipped = lcb.skip_message(missing)
            return
        settings = argparse.Namespace(scale_rule=None, calib_samples=0, calib_seq_len=0)
        try:
            self.path = lcb.row_file(LLAMA_CPP_ROWS[variant], args.model, self.threads, settings, {})
        except (RuntimeError, OSError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}"

    def ask(self, command: str):
        if self.error or self.skipped or command != "run":
            return None
        try:
            t = self.lcb.generation_times(self.path, self.args.prompt_len, self.args.new_tokens, self.threads)
        except (RuntimeError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}"
            return None
        self.prefill.append(t["prefill_s"])
        self.decode.append(t["decode_s"])
        try:
            batch = self.lcb.batched_decode_times(self.path, self.args.batch_prompt_len, self.args.new_tokens,
                                                  batch_sizes(self.args), self.threads)
        except (RuntimeError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}"
            return None
        for b, s in batch.items():
            self.batch_decode.setdefault(b, []).append(s)
        return {**t, "batch_decode_s": batch}

    def finish(self) -> dict:
        if self.skipped:
            return {"variant": self.variant, "skipped": self.skipped}
        if self.error or not self.prefill:
            return {"variant": self.variant, "error": self.error or "no timed run"}
        args = self.args
        bits = self.lcb.linear_bits(self.path)
        return {
            "variant": self.variant,
            "engine": "llama.cpp (llama-bench)",
            "gguf": str(self.path),
            "linear_types": bits["linear_types"],
            "threads": self.threads,
            "prefill_tokens_per_s": args.prompt_len / min(self.prefill),
            "decode_tokens_per_s": args.new_tokens / min(self.decode),
            "prefill_s": min(self.prefill),
            "decode_ms_per_token": 1e3 * min(self.decode) / args.new_tokens,
            **batch_columns(self.batch_decode, args.new_tokens),
            "timed_runs": len(self.prefill),
            "prefill_s_all": self.prefill,
            "decode_s_all": self.decode,
            "compile_s": None,
            # The whole file (all tensors, metadata) against our rows' parameters + buffers.
            "model_mb": self.path.stat().st_size / 2**20,
            "cache_mb": 0.0,
            "linear_weight_bits": bits["linear_bits_per_weight"],
            "peak_rss_mb": float("nan"),  # llama-bench reports no memory
            "gen_delta_mb": float("nan"),
            "subprocess_s": time.perf_counter() - self.t0,
        }


def start_row(variant: str, args):
    return LlamaCppWorker(variant, args) if variant in LLAMA_CPP_ROWS else Worker(variant, args)


def run_in_process(variant: str, args) -> dict:
    import torch

    if variant in LLAMA_CPP_ROWS:  # a subprocess of llama.cpp's anyway
        worker = LlamaCppWorker(variant, args)
        for _ in range(args.rounds):
            worker.ask("run")
        return worker.finish()
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        row = Row(variant, args)
        for _ in range(args.rounds):
            row.run()
        result = row.result()
    except Exception as e:  # noqa: BLE001 - reported as the row's error
        return {"variant": variant, "error": f"{type(e).__name__}: {e}"}
    result["subprocess_s"] = time.perf_counter() - t0
    return result


def run_interleaved(variants, args, log) -> list:
    """Start every row's process one after the other (builds and compiles do not overlap), then time
    them in rounds, one generation per row per round, the row order rotating each round: drift of the
    machine's speed hits every row alike. Slow rows (a generation over ``--slow-s``) run in the first
    round only."""
    workers = []
    for v in variants:
        workers.append(start_row(v, args))
        w = workers[-1]
        log(f"{v}: " + (f"skipped: {w.skipped}" if getattr(w, "skipped", None)
                        else f"ready (ERROR {w.error.splitlines()[-1]})" if w.error else "ready"))
    slow = set()
    for r in range(args.rounds):
        order = workers[r % len(workers):] + workers[: r % len(workers)]
        for w in order:
            if w.variant in slow or getattr(w, "skipped", None):
                continue
            t = w.ask("run")
            if t is not None and t["prefill_s"] + t["decode_s"] > args.slow_s:
                slow.add(w.variant)
        log(f"round {r + 1}/{args.rounds} done")
    return [w.finish() for w in workers]


def add_ratios(rows):
    base = next((r for r in rows if r["variant"] == BASELINE and "error" not in r), None)
    for r in rows:
        if base is None or "error" in r or "skipped" in r:
            continue
        r["vs_bf16"] = {
            "prefill_speed": r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
            "decode_speed": r["decode_tokens_per_s"] / base["decode_tokens_per_s"],
            "model_size": r["model_mb"] / base["model_mb"],
            "peak_rss": r["peak_rss_mb"] / base["peak_rss_mb"],
        }


def print_table(rows, args):
    print(f"{args.model}: prompt [1, {args.prompt_len}], {args.new_tokens} greedy decode steps (static KV cache), "
          f"{args.threads or 'default'} threads, best of {args.rounds} interleaved rounds; compiled = {args.compile}; x = ratio to bf16 eager")
    batches = batch_sizes(args)
    head = (f"{'variant':<26} {'prefill tok/s':>13} {'x':>6} {'decode tok/s':>12} {'x':>6} {'model MB':>9} {'x':>5}"
            f" {'lin bits':>8} {'cache MB':>8} {'peak MB':>8} {'gen +MB':>7} {'compile s':>9}"
            + "".join(f" {f'b{b} tok/s':>9}" for b in batches))
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<26} ERROR {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        if "skipped" in r:
            print(f"{r['variant']:<26} skipped: {r['skipped']}")
            continue
        v = r.get("vs_bf16", {})
        print(f"{r['variant']:<26} {r['prefill_tokens_per_s']:>13.1f} {v.get('prefill_speed', float('nan')):>6.2f}"
              f" {r['decode_tokens_per_s']:>12.2f} {v.get('decode_speed', float('nan')):>6.2f}"
              f" {r['model_mb']:>9.1f} {v.get('model_size', float('nan')):>5.2f} {r['linear_weight_bits']:>8.2f} {r['cache_mb']:>8.1f}"
              f" {r['peak_rss_mb']:>8.0f} {r['gen_delta_mb']:>7.0f} {'' if r['compile_s'] is None else format(r['compile_s'], '.1f'):>9}"
              + "".join(f" {r.get('batch_decode_tokens_per_s', {}).get(str(b), float('nan')):>9.1f}" for b in batches))
    if any(r["variant"] in LLAMA_CPP_ROWS and "error" not in r and "skipped" not in r for r in rows):
        print("llama.cpp rows: llama-bench on the GGUF (llama.cpp_mxfp4: ours, torchao-mx export --format gguf, rtn);"
              " decode = generation at context depth --prompt-len; model MB = the GGUF file; no memory reading;"
              " batch columns from llama-batched-bench (t_tg)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="zoo alias or HF checkpoint folder")
    p.add_argument("--fast", action="store_true", help="smoke run: stories260k, 32-token prompt, 4 new tokens")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds: one generation per row each (the fastest counts)")
    p.add_argument("--slow-s", type=float, default=30.0, help="a row whose generation takes longer runs in the first round only")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--compile", choices=("layers", "model"), default="layers")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (smoke tests; 0: all)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (smoke tests: aot_eager)")
    p.add_argument("--in-process", action="store_true", help="run the rows in this process (smoke tests; memory then not per row)")
    p.add_argument("--no-share", action="store_true", help="ours without share_input_quantization")
    p.add_argument("--decode-batches", default="8,32", help="batch sizes of the batch-serving decode columns ('' for none)")
    p.add_argument("--batch-prompt-len", type=int, default=64, help="prompt length of each stream in the batch rows")
    p.add_argument("--threads", type=int, default=0, help="torch threads per row (0: torch's default)")
    p.add_argument("--json", default="benchmarks/results/model_bench.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    if p.parse_known_args(argv)[0].fast:  # smoke-run defaults; explicit options still win
        p.set_defaults(model="stories260k", prompt_len=32, new_tokens=4)
    args = p.parse_args(argv)
    if args.worker:
        serve(args.worker, args)
        return
    try:
        if any(b < 1 for b in batch_sizes(args)) or args.batch_prompt_len < 1:
            raise ValueError
    except ValueError:
        p.error(f"--decode-batches takes comma-separated positive integers (or ''), got {args.decode_batches!r}, "
                "and --batch-prompt-len a positive one")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    t0 = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - t0:6.0f} s] {message}", flush=True)

    if args.in_process:
        rows = [run_in_process(v, args) for v in variants]
    else:
        rows = run_interleaved(variants, args, log)
    add_ratios(rows)
    print_table(rows, args)
    import torch

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "settings": {k: getattr(args, k) for k in ("model", "prompt_len", "new_tokens", "rounds", "slow_s", "compile", "backend", "no_share", "threads", "in_process", "layers", "decode_batches", "batch_prompt_len")},
        "baseline": BASELINE,
        "total_s": time.perf_counter() - t0,
        "rows": rows,
    }, indent=2))
    print(f"wrote {out}")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
