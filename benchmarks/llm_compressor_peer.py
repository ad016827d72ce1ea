"""llm-compressor "peer rows" for the ``torchao-mx compare`` perplexity table.

    python benchmarks/llm_compressor_peer.py --methods fp,rtn             # 16 windows, results/full/
    python benchmarks/llm_compressor_peer.py --methods gptq --calib-samples 32 --time-limit-min 60
    python benchmarks/llm_compressor_peer.py --setup                      # (re)create the venv only

SmolLM2-135M quantized W4A4 MXFP4 by llm-compressor (what vLLM users quantize with), measured on the
very same WikiText-2 test windows as ``torchao-mx compare``:

- ``fp``: no quantization, the consistency check (our fp row: 20.7135 on 16 x 2048 tokens);
- ``rtn``: ``oneshot`` with ``QuantizationModifier(targets="Linear", scheme="MXFP4", ignore=["lm_head"])``;
- ``gptq``: ``oneshot`` with ``GPTQModifier`` (same scheme; llm-compressor's defaults otherwise) on the
  calibration windows our GPTQ rows use (WikiText-2 validation, ``--calib-samples`` x 2048, seed 0).

compressed-tensors 0.19's preset ``MXFP4`` is W4A4 (``MXFP4A16`` is its weight-only preset): FP4 E2M1
weights in groups of 32 along the input dimension with static E8M0 scales (``memoryless_minmax``
observer), and input activations quantized dynamically, per token and group of 32, with the same
scale rule. That rule (``quantization/utils/mxfp_utils.py``: ``round_to_power_2`` then
``generate_mx_scales``) rounds the group's ``amax`` to E2M1's one mantissa bit (a carry when
``amax / 2^k >= 1.75``, ``k = floor(log2 amax)``) and takes ``e = floor(log2) - 2``, i.e. our ``even``
rule (``torchao_mx_ext/mx/e8m0.py``). Elements round to nearest, ties to even (``cast_to_fp4``).
GPTQ takes its scales from the observer on the original weights before the GPTQ updates.

llm-compressor pins its own transformers, so it runs in a separate venv (``.cache/llmcompressor-venv``,
created by ``--setup``, or automatically when it is missing unless ``--no-setup``). This script runs
twice: the parent in our venv tokenizes exactly as ``torchao-mx compare`` does (``cli.run_compare``:
``tokenize_for_perplexity`` of ``wikitext2_test_text``; ``calibration_ids(tokenizer, "wikitext2", N,
2048, seed=0)``) and writes the ids to a temporary file under ``.cache/``; the child (``--child SPEC``,
the venv's python, importing nothing of ours) loads the HF folder in float32, quantizes, checks that the
quantized forward really goes through compressed-tensors' fake quantization (logits differ from fp;
every quantized Linear calls ``forward_quantize`` for its input and its weight; one Linear's output
equals an independent MXFP4 reference), then fake-quantizes the weights once with compressed-tensors'
own ``forward_quantize`` and marks the Linears DECOMPRESSED (probe logits bit-identical; ``--frozen-forward``
skips this and evaluates in the FROZEN state, re-quantizing every weight on every window), and computes
perplexity with the formula of ``torchao_mx_ext/eval/perplexity.py``. One JSON per method, in the schema ``torchao-mx merge`` reads:
``results/full/compare_smollm2_llmcompressor-<method>.json``.

``settings`` holds the keys of our compare reports with the values of a default ``compare`` run of the
same protocol (``merge`` refuses reports whose settings differ), so ``scale_rules`` is our default rule
list; the row's own rule, the tool and its versions are in the method entry (``scale_rule``,
``scale_rule_detail``, ``tool``, ``versions``). ``wall_s`` = quantization + evaluation, ``peak_mem_mb`` =
the child's peak RSS over both (the fp32 model is loaded once, where ``compare`` holds a base model and
a copy). ``--time-limit-min`` bounds the whole GPTQ child run: when it runs out, the child is stopped
and the JSON records the time given, how far llm-compressor got (its per-layer progress) and no ppl,
with ``"complete": false`` so ``merge`` refuses it.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".cache" / "llmcompressor-venv"
WORK = ROOT / ".cache" / "llmcompressor-peer"  # temporary ids, specs, child logs and its working folder
OUT_DIR = ROOT / "results" / "full"
PROG = "llm_compressor_peer"
TOOL = "llmcompressor 0.14.0.1"
# Exact pins. llmcompressor 0.14.0.1 needs torch>=2.10,<=2.14, transformers>=5.15,<=5.17,
# compressed-tensors==0.19.0, auto-round>=0.14.1,<=0.15.1. torch is installed first and pinned again
# with the rest, so pip keeps this machine's CPU wheel instead of pulling a CUDA build.
TORCH_PIN = "torch==2.13.0"
PINS = ("llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "transformers==5.17.0", "auto-round==0.15.1")
MARKER = "peer-venv.json"  # written last by the setup: a venv without it (or with other pins) is unfinished
VERSION_PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "auto-round", "accelerate", "datasets")

MODEL = "smollm2-135m"
SEQ_LEN = 2048  # zoo.DEFAULT_SEQ_LEN["smollm2-135m"]
METHODS = ("fp", "rtn", "gptq")
SCHEME = "MXFP4"
RECIPES = {
    "rtn": f'QuantizationModifier(targets="Linear", scheme="{SCHEME}", ignore=["lm_head"])',
    "gptq": f'GPTQModifier(targets="Linear", scheme="{SCHEME}", ignore=["lm_head"])',
}
SCALE_RULE = "even"
SCALE_RULE_DETAIL = (
    "compressed-tensors 0.19 generate_mx_scales (weights: memoryless_minmax observer per group of 32; "
    "activations: dynamic, per token and group of 32, same rule): amax rounded to E2M1's mantissa "
    "(round_to_power_2 adds half an E2M1 ulp to the float bits and masks the mantissa), e = floor(log2) - 2, "
    "i.e. e = floor(log2 amax) - 2 + [amax / 2^floor(log2 amax) >= 1.75]; elements round to nearest, ties to even"
)
PROBE_TOKENS = 128
PROGRESS_PREFIX = "PEER "


def default_json_path(method: str, out_dir: Path = OUT_DIR) -> Path:
    return Path(out_dir) / f"compare_smollm2_llmcompressor-{method}.json"


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=None, help=f"comma list of: {', '.join(METHODS)} (default: fp,rtn)")
    p.add_argument("--eval-windows", type=int, default=16, help="perplexity windows of 2048 tokens")
    p.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration windows of 2048 tokens")
    p.add_argument("--time-limit-min", type=float, default=60.0, help="limit of the whole GPTQ child run")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: torch's)")
    p.add_argument("--out-dir", default=str(OUT_DIR), help="where compare_smollm2_llmcompressor-<method>.json go")
    p.add_argument("--venv", default=str(VENV), help="the llm-compressor virtualenv")
    p.add_argument("--setup", action="store_true", help="(re)create the venv; alone, only that")
    p.add_argument("--no-setup", action="store_true", help="refuse to run instead of creating a missing venv")
    p.add_argument("--frozen-forward", action="store_true",
                   help="evaluate in the FROZEN state oneshot leaves (weights fake-quantized again on every forward: "
                        "same logits, several times slower on CPU) instead of quantizing the weights once")
    p.add_argument("--quiet", action="store_true", help="do not echo the child's output")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every flag (nothing heavy imported); a bad one exits with a one-line message."""
    args = build_parser().parse_args(argv)
    if args.child:
        return args
    text = args.methods if args.methods is not None else "fp,rtn"
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise SystemExit(f"{PROG}: --methods must be distinct names from {', '.join(METHODS)}, got {text!r}")
    args.method_list = methods
    for flag, low in (("eval_windows", 1), ("calib_samples", 1), ("threads", 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise SystemExit(f"{PROG}: --{flag.replace('_', '-')} must be >= {low}, got {value}")
    if not args.time_limit_min > 0:
        raise SystemExit(f"{PROG}: --time-limit-min must be > 0, got {args.time_limit_min}")
    if args.setup and args.no_setup:
        raise SystemExit(f"{PROG}: --setup and --no-setup contradict each other")
    from torchao_mx_ext.cli import check_output_path

    for m in methods:
        check_output_path(str(default_json_path(m, Path(args.out_dir))), flag="--out-dir", prefix=PROG)
    return args


# ---------------------------------------------------------------------------------------------
# the llm-compressor venv
# ---------------------------------------------------------------------------------------------
def venv_problem(venv: Path) -> Optional[str]:
    """Why ``venv`` cannot be used (missing, unfinished, other pins), or None when it is ready."""
    venv = Path(venv)
    if not (venv / "bin" / "python").exists():
        return f"the llm-compressor venv {venv} is missing"
    marker = venv / MARKER
    if not marker.is_file():
        return f"the llm-compressor venv {venv} is unfinished (no {MARKER}: its setup did not complete)"
    try:
        pins = json.loads(marker.read_text())["pins"]
    except (OSError, ValueError, KeyError):
        return f"the llm-compressor venv {venv} has an unreadable {MARKER}"
    if pins != [TORCH_PIN, *PINS]:
        return f"the llm-compressor venv {venv} was built with other pins ({', '.join(pins)})"
    return None


def setup_hint(venv: Path) -> str:
    return (
        f"create it with: python benchmarks/llm_compressor_peer.py --setup{'' if Path(venv) == VENV else f' --venv {venv}'} "
        f"(pip install {TORCH_PIN}, then {TORCH_PIN} {' '.join(PINS)}; about 1 GB, a few minutes)"
    )


def require_venv(venv: Path, setup_allowed: bool) -> dict:
    """The venv's recorded versions; creates it when missing (if allowed), else exits saying how to."""
    problem = venv_problem(venv)
    if problem:
        if not setup_allowed:
            raise SystemExit(f"{PROG}: {problem}; {setup_hint(venv)}")
        print(f"{PROG}: {problem}: creating it now", file=sys.stderr, flush=True)
        setup_venv(venv)
    return json.loads((Path(venv) / MARKER).read_text())["versions"]


def _pip(venv: Path, *packages: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", *packages]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def setup_venv(venv: Path = VENV) -> dict:
    """(Re)create ``venv`` with the pinned packages; returns the installed versions."""
    venv = Path(venv)
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, TORCH_PIN)
    _pip(venv, TORCH_PIN, *PINS)
    code = (
        "import json, importlib.metadata as m; "
        f"print(json.dumps({{p: m.version(p) for p in {VERSION_PACKAGES!r}}}))"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True)
    versions = json.loads(out.stdout)
    (venv / MARKER).write_text(json.dumps({"pins": [TORCH_PIN, *PINS], "versions": versions}, indent=2))
    print(f"{PROG}: {venv} ready: {versions}", file=sys.stderr)
    return versions


# ---------------------------------------------------------------------------------------------
# reports (parent side)
# ---------------------------------------------------------------------------------------------
def compare_settings(eval_windows: int, calibration: Optional[dict], threads: int, torch_version: str) -> dict:
    """The ``settings`` of a ``torchao-mx compare`` report of this protocol (W4A4, default rule list,
    16 windows...), so that ``merge`` accepts the peer rows beside ours."""
    from torchao_mx_ext.configs import DEFAULT_SCALE_RULE

    return {
        "seq_len": SEQ_LEN,
        "eval_windows": eval_windows,
        "scale_rules": [DEFAULT_SCALE_RULE],
        "seeds": [0],
        "calibration": calibration,
        "weight_only": False,
        "act_scale_rule": "same as weights",
        "block_size": 32,
        "lm_head": "not quantized",
        "activations": "MXFP4, quantized online",
        "threads": threads,
        "torch": torch_version,
    }


def calibration_setting(method: str, calib_samples: int) -> Optional[dict]:
    if method != "gptq":
        return None
    return {"source": "wikitext2", "samples": calib_samples, "seq_len": SEQ_LEN, "seed": 0}


def method_key(method: str) -> str:
    return f"llmcompressor-{method}"


def build_report(method: str, result: dict, eval_windows: int, calib_samples: int, versions: dict,
                 timeout: Optional[dict] = None) -> dict:
    """A compare-style report for one method from the child's ``result`` (or, with ``timeout``, from
    how far a run stopped by ``--time-limit-min`` got: no ppl, ``"complete": false``)."""
    key = method_key(method)
    entry = {
        "ppl": None if timeout else result["ppl"],
        "wall_s": None if timeout else result["wall_s"],
        "quantize_s": None if timeout else result["quantize_s"],
        "peak_mem_mb": None if timeout else result["peak_mem_mb"],
        "method": key,
        "scale_rule": None if method == "fp" else SCALE_RULE,
        "windows": None if timeout else result["windows"],
    }
    if method != "fp":
        entry["scale_rule_detail"] = SCALE_RULE_DETAIL
        entry["scheme"] = f"{SCHEME} (compressed-tensors preset: W4A4, weights static, activations dynamic)"
        entry["recipe"] = RECIPES[method]
    entry["tool"] = TOOL
    entry["versions"] = versions
    if timeout:
        entry["timed_out"] = timeout
    else:
        entry["nll"] = result["nll"]
        entry["eval_s"] = result["eval_s"]
        if "checks" in result:
            entry["checks"] = result["checks"]
        if "gptq" in result:
            entry["gptq"] = result["gptq"]
        if "eval_forward" in result:
            entry["eval_forward"] = result["eval_forward"]
    report = {
        "model": MODEL,
        "settings": compare_settings(
            eval_windows, calibration_setting(method, calib_samples), result.get("threads"), versions.get("torch")
        ),
        "methods": {key: entry},
    }
    if timeout:
        report["complete"] = False
    return report


def write_report(path: Path, report: dict) -> None:
    from torchao_mx_ext.cli import write_json_atomic

    write_json_atomic(Path(path), report)


# ---------------------------------------------------------------------------------------------
# running the child (parent side)
# ---------------------------------------------------------------------------------------------
def prepare_ids(methods, calib_samples: int, work: Path) -> Path:
    """Token ids exactly as ``torchao-mx compare`` builds them, saved for the child: the WikiText-2
    test ids and, for GPTQ, the calibration windows. Returns the (temporary) file."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from torchao_mx_ext.calibration.data import calibration_ids
    from torchao_mx_ext.eval.perplexity import tokenize_for_perplexity, wikitext2_test_text
    from torchao_mx_ext.zoo import data_dir, model_path

    path = model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)  # as zoo.load_model
    data = {"model_path": str(path), "test_ids": tokenize_for_perplexity(tokenizer, wikitext2_test_text(data_dir()))}
    if "gptq" in methods:
        max_positions = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        data["calib_ids"] = calibration_ids(tokenizer, "wikitext2", calib_samples, SEQ_LEN, seed=0, max_positions=max_positions)
    work.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="ids-", suffix=".pt", dir=work)
    os.close(fd)
    torch.save(data, tmp)
    return Path(tmp)


class Progress:
    """What the child's output says about how far it got: its own ``PEER {...}`` lines and
    llm-compressor's sequential-pipeline bars (``(k/n): Calibrating|Propagating``) and GPTQ log lines
    (``Quantizing m module(s): names``)."""

    _BAR = re.compile(r"\((\d+)/(\d+)\): (Calibrating|Propagating)(?::\s*(\d+)%)?")
    _GPTQ = re.compile(r"Quantizing (\d+) module\(s\): (.*)")

    def __init__(self):
        self.phase = "starting"
        self.subgraphs_total = None
        self.last_bar = None
        self.propagated = set()
        self.modules_quantized = 0
        self.last_modules = []
        self.windows_done = 0
        self.windows_total = None

    def feed(self, line: str) -> None:
        line = line.strip()
        if line.startswith(PROGRESS_PREFIX):
            try:
                event = json.loads(line[len(PROGRESS_PREFIX):])
            except ValueError:
                return
            self.phase = event.get("phase", self.phase)
            if "window" in event:
                self.windows_done, self.windows_total = event["window"], event["windows"]
            return
        for m in self._BAR.finditer(line):
            k, n, what, pct = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            self.subgraphs_total = n
            self.last_bar = f"({k}/{n}): {what}"
            if what == "Propagating" and pct == "100":
                self.propagated.add(k)
        m = self._GPTQ.search(line)
        if m:
            self.modules_quantized += int(m.group(1))
            names = m.group(2).strip().strip("[]")  # logged as a Python list of names
            self.last_modules = [n.strip().strip("'\"") for n in names.split(",") if n.strip()]

    def summary(self) -> dict:
        return {
            "phase": self.phase,
            "subgraphs_total": self.subgraphs_total,
            "subgraphs_done": len(self.propagated),
            "last_progress": self.last_bar,
            "modules_gptq_quantized": self.modules_quantized,
            "last_modules": self.last_modules,
            "eval_windows_done": self.windows_done,
        }


def run_child(venv: Path, spec: dict, log_path: Path, time_limit_s: Optional[float], quiet: bool):
    """Run the child on ``spec``; returns (result dict or None if stopped at the limit, Progress, elapsed s)."""
    WORK.mkdir(parents=True, exist_ok=True)
    spec_path = Path(spec["result_path"]).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(Path(venv) / "bin" / "python"), str(Path(__file__).resolve()), "--child", str(spec_path)]
    progress = Progress()
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=WORK, env=env,
                                start_new_session=True)

        def pump():
            pending = ""
            while True:
                chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
                if not chunk:
                    break
                text = chunk.decode(errors="replace")
                log.write(text)
                log.flush()
                if not quiet:
                    sys.stderr.write(text)
                    sys.stderr.flush()
                pending += text
                *lines, pending = re.split(r"[\r\n]", pending)
                for line in lines:
                    progress.feed(line)
            progress.feed(pending)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        reader.join(timeout=10)
    elapsed = time.monotonic() - t0
    spec_path.unlink(missing_ok=True)
    if timed_out:
        return None, progress, elapsed
    result_path = Path(spec["result_path"])
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-15:]
        raise SystemExit(
            f"{PROG}: the {spec['method']} child failed (exit {proc.returncode}); last lines of {log_path}:\n"
            + "\n".join(tail)
        )
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return result, progress, elapsed


def run(args) -> dict:
    from torchao_mx_ext.cli import quiet_known_noise

    quiet_known_noise()
    venv = Path(args.venv)
    if args.setup:
        setup_venv(venv)
        if args.methods is None:
            return {}
    versions = require_venv(venv, setup_allowed=not args.no_setup)
    ids_path = prepare_ids(args.method_list, args.calib_samples, WORK)
    reports = {}
    try:
        for method in args.method_list:
            result_path = WORK / f"result-{method}-{os.getpid()}.json"
            spec = {
                "method": method, "ids_path": str(ids_path), "eval_windows": args.eval_windows,
                "calib_samples": args.calib_samples, "threads": args.threads, "result_path": str(result_path),
                "frozen_forward": args.frozen_forward,
            }
            log_path = WORK / f"{method}.log"
            limit = args.time_limit_min * 60 if method == "gptq" else None
            print(f"{PROG}: {method_key(method)} (log: {log_path})", file=sys.stderr, flush=True)
            result, progress, elapsed = run_child(venv, spec, log_path, limit, args.quiet)
            if result is None:
                timeout = {"time_limit_s": limit, "elapsed_s": elapsed, "progress": progress.summary(), "log": str(log_path)}
                report = build_report(method, {"threads": args.threads}, args.eval_windows, args.calib_samples, versions,
                                      timeout=timeout)
                line = f"stopped at the {args.time_limit_min:g} min limit: {json.dumps(progress.summary())}"
            else:
                report = build_report(method, result, args.eval_windows, args.calib_samples, versions)
                line = (f"ppl {result['ppl']:.4f} on {result['windows']} windows (quantize {result['quantize_s']:.1f} s, "
                        f"wall {result['wall_s']:.1f} s, peak {result['peak_mem_mb']:.0f} MB)")
            path = default_json_path(method, Path(args.out_dir))
            write_report(path, report)
            print(f"{PROG}: {method_key(method)}: {line}; wrote {path}", file=sys.stderr, flush=True)
            reports[method] = report
    finally:
        ids_path.unlink(missing_ok=True)
    return reports


# ---------------------------------------------------------------------------------------------
# the child (runs in the llm-compressor venv: imports nothing of ours)
# ---------------------------------------------------------------------------------------------
def _emit(**event) -> None:
    print(PROGRESS_PREFIX + json.dumps(event), flush=True)


class _PeakRSS:
    """Peak resident memory while inside (polls /proc every 5 ms, as torchao_mx_ext.eval.Measure)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.peak_mb = self.peak / 2**20
        return False


def _perplexity(model, input_ids, seq_len: int, max_windows: int) -> dict:
    """torchao_mx_ext/eval/perplexity.py::perplexity, line for line (plus progress lines)."""
    import math

    import torch
    import torch.nn.functional as F

    n_windows = min(input_ids.shape[1] // seq_len, max_windows)
    if n_windows == 0:
        raise ValueError(f"text has {input_ids.shape[1]} tokens, fewer than one window of {seq_len}")
    nlls = []
    with torch.inference_mode():
        for i in range(n_windows):
            window = input_ids[:, i * seq_len : (i + 1) * seq_len]
            logits = model(window).logits[0, :-1].float()
            nlls.append(F.cross_entropy(logits, window[0, 1:], reduction="mean").item())
            _emit(phase="eval", window=i + 1, windows=n_windows, nll=nlls[-1])
    mean_nll = sum(nlls) / len(nlls)
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "windows": n_windows}


def _reference_mxfp4(x, scale=None):
    """Independent MXFP4 fake quantization along the last dim in groups of 32 (not compressed-tensors'
    code): E8M0 exponent by the ``even`` rule unless ``scale`` ([..., groups]) is given, E2M1 elements
    rounded to nearest, ties to even. Returns (dequantized x, per-group scales)."""
    import torch

    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    if scale is None:
        amax = g.abs().amax(-1)
        k = torch.floor(torch.log2(amax))
        e = torch.where(amax > 0, k - 2 + (amax / torch.exp2(k) >= 1.75).float(), torch.full_like(amax, -127.0))
        scale = torch.exp2(e.clamp(-127, 127))
    a = (g / scale.unsqueeze(-1)).abs().clamp(max=6.0)
    # E2M1: steps 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; torch.round is half to even
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return (torch.sign(g) * q * scale.unsqueeze(-1)).reshape(x.shape), scale


def _forward_chain(module) -> list:
    """Code names of the functions a module's forward goes through: compressed-tensors' wrapper
    (``quantized_forward``), under its offloading wrapper (``forward``, which ``oneshot`` adds: it keeps
    the parameters in an ``OffloadCache``, here CPU to CPU) when there is one."""
    names = [module.forward.__func__.__code__.co_name]
    inner = getattr(module, "_original_forward_func", None)
    if inner is not None:
        names.append(inner.__code__.co_name)
    return names


def _counting_forward(model, probe):
    """(logits, calls of compressed-tensors' ``forward_quantize`` per tensor kind) of one forward.
    ``quantized_forward`` looks ``forward_quantize`` up in its module at call time, so patching the
    module attribute sees every call."""
    import torch
    from compressed_tensors.quantization.lifecycle import forward as ct_forward

    calls = {"input": 0, "weight": 0}
    original = ct_forward.forward_quantize

    def counting(module, value, base_name, args):
        calls[base_name] = calls.get(base_name, 0) + 1
        return original(module, value, base_name, args)

    ct_forward.forward_quantize = counting
    try:
        with torch.inference_mode():
            logits = model(probe).logits
    finally:
        ct_forward.forward_quantize = original
    return logits, calls


def _quantize_weights_once(model, probe, frozen_logits) -> dict:
    """Store each quantized Linear's fake-quantized weight (compressed-tensors' own ``forward_quantize``
    with its stored scales) and mark it DECOMPRESSED, the state compressed-tensors gives a decompressed
    checkpoint: its forward then skips the weight's fake quantization, which in the FROZEN state
    ``oneshot`` leaves is redone on every forward (the bulk of an evaluation's time on CPU: eager
    ``cast_to_fp4`` over all weights per window). Activations are still quantized on every forward.
    Fake quantization with power-of-two scales is idempotent, so the logits must stay bit-identical:
    checked on the probe."""
    import torch
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    n = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        with torch.no_grad():
            qdq = forward_quantize(module, module.weight.data, "weight", scheme.weights)
        update_offload_parameter(module, "weight", qdq)
        module.quantization_status = QuantizationStatus.DECOMPRESSED
        n += 1
    logits, calls = _counting_forward(model, probe)
    if not torch.equal(logits, frozen_logits) or calls != {"input": n, "weight": 0}:
        raise RuntimeError(
            f"weights quantized once: probe logits differ from the FROZEN forward by "
            f"{(logits - frozen_logits).abs().max().item():.3g}, forward_quantize calls {calls}"
        )
    return {"weights_quantized_once": n, "status": QuantizationStatus.DECOMPRESSED.value,
            "forward_quantize_calls_per_forward": calls, "probe_logits_bit_identical_to_frozen": True}


def _check_quantized(model, probe, fp_logits, method: str):
    """Evidence that the quantized forward fake-quantizes weights and activations (raises if not):
    (checks dict, the probe's logits in the FROZEN state ``oneshot`` leaves)."""
    import torch
    import torch.nn.functional as F
    from compressed_tensors.quantization import QuantizationStatus

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n: m for n, m in linears.items() if getattr(m, "quantization_scheme", None) is not None}
    problems = []
    if "lm_head" in quantized or set(linears) - set(quantized) != {"lm_head"}:
        problems.append(f"quantized Linears: all but {sorted(set(linears) - set(quantized))}, expected all but lm_head")
    for n, m in quantized.items():
        s = m.quantization_scheme
        w, a = s.weights, s.input_activations
        ok = (
            w is not None and a is not None and w.num_bits == 4 and a.num_bits == 4 and w.type == "float" and a.type == "float"
            and w.group_size == 32 and a.group_size == 32 and not w.dynamic and a.dynamic is True
            and m.quantization_status == QuantizationStatus.FROZEN
            and "quantized_forward" in _forward_chain(m)
        )
        if not ok:
            problems.append(f"{n}: scheme {s}, status {m.quantization_status}, forward chain {_forward_chain(m)}")
            break
    logits, calls = _counting_forward(model, probe)
    if calls["input"] != len(quantized) or calls["weight"] != len(quantized):
        problems.append(f"forward_quantize calls {calls} in one forward, expected {len(quantized)} each")
    diff = (logits - fp_logits).abs()
    if not diff.max() > 0:
        problems.append("the quantized logits equal the fp logits")
    # One Linear against the independent reference: activations with the even rule, weights with the
    # stored scales (RTN: which must be the even rule's scales of the weight).
    name = next(n for n in quantized if n.endswith("layers.0.self_attn.q_proj"))
    lin = quantized[name]
    gen = torch.Generator().manual_seed(0)
    groups = lin.in_features // 32  # inputs with group maxima spread over several octaves
    x = torch.randn(4, 16, groups, 32, generator=gen) * torch.exp(torch.randn(4, 16, groups, 1, generator=gen))
    x = x.reshape(4, 16, lin.in_features)
    xq, _ = _reference_mxfp4(x)
    wq, _ = _reference_mxfp4(lin.weight.detach(), lin.weight_scale.detach().float())
    with torch.inference_mode():
        out = lin(x)
    ref = F.linear(xq, wq)
    linear_vs_reference = ((out - ref).abs().max() / ref.abs().max()).item()
    if linear_vs_reference > 1e-6:
        problems.append(f"{name}: output differs from the reference MXFP4 linear by {linear_vs_reference:.3g} (relative)")
    scales_match_even_rule = None
    if method == "rtn":
        _, even_scale = _reference_mxfp4(lin.weight.detach())
        scales_match_even_rule = bool(torch.equal(even_scale, lin.weight_scale.detach().float()))
        if not scales_match_even_rule:
            problems.append(f"{name}: weight_scale is not the even rule's scale of the weight")
    if problems:
        raise RuntimeError("the quantized model does not fake-quantize as expected: " + "; ".join(problems))
    return {
        "quantized_linears": len(quantized),
        "status": str(QuantizationStatus.FROZEN.value),
        "forward_chain": _forward_chain(quantized[name]),
        "forward_quantize_calls_per_forward": calls,
        "probe_tokens": probe.shape[1],
        "probe_logits_max_abs_diff_vs_fp": diff.max().item(),
        "probe_logits_mean_abs_diff_vs_fp": diff.mean().item(),
        "reference_linear": name,
        "reference_linear_max_rel_diff": linear_vs_reference,
        "rtn_weight_scales_equal_even_rule": scales_match_even_rule,
    }, logits


def child_main(spec_path: str) -> int:
    import importlib.metadata

    import torch
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    method = spec["method"]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    data = torch.load(spec["ids_path"])
    test_ids = data["test_ids"]
    _emit(phase="load")
    model = AutoModelForCausalLM.from_pretrained(data["model_path"], dtype=torch.float32)
    model.eval()
    probe = test_ids[:, :PROBE_TOKENS]
    with torch.inference_mode():
        fp_logits = model(probe).logits
    result = {"threads": torch.get_num_threads(),
              "versions": {p: importlib.metadata.version(p) for p in VERSION_PACKAGES}}
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        if method != "fp":
            from llmcompressor import oneshot
            from llmcompressor.modifiers.gptq import GPTQModifier
            from llmcompressor.modifiers.quantization import QuantizationModifier

            _emit(phase="quantize")
            if method == "rtn":
                oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=SCHEME, ignore=["lm_head"]))
            else:
                from datasets import Dataset

                calib = data["calib_ids"]
                modifier = GPTQModifier(targets="Linear", scheme=SCHEME, ignore=["lm_head"])
                result["gptq"] = {"block_size": modifier.block_size, "dampening_frac": modifier.dampening_frac,
                                  "actorder": str(modifier.actorder), "samples": calib.shape[0], "seq_len": calib.shape[1]}
                oneshot(
                    model=model, tokenizer=data["model_path"], recipe=modifier,
                    dataset=Dataset.from_dict({"input_ids": calib.tolist()}),
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                    shuffle_calibration_samples=False,
                )
        quantize_s = time.perf_counter() - t0
        if method != "fp":
            _emit(phase="check")
            result["checks"], frozen_logits = _check_quantized(model, probe, fp_logits, method)
            if spec["frozen_forward"]:
                result["eval_forward"] = "FROZEN (as oneshot leaves it: weights and activations fake-quantized every forward)"
            else:
                result["checks"]["eval_forward"] = _quantize_weights_once(model, probe, frozen_logits)
                result["eval_forward"] = (
                    "weights fake-quantized once, DECOMPRESSED state (activations fake-quantized every forward); "
                    "probe logits bit-identical to the FROZEN forward"
                )
        _emit(phase="eval")
        t1 = time.perf_counter()
        result.update(_perplexity(model, test_ids, SEQ_LEN, spec["eval_windows"]))
        eval_s = time.perf_counter() - t1
    result.update(quantize_s=quantize_s, eval_s=eval_s, wall_s=quantize_s + eval_s, peak_mem_mb=mem.peak_mb)
    out = Path(spec["result_path"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    _emit(phase="done", ppl=result["ppl"])
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
