"""Smoke test of benchmarks/model_bench.py: every row runs and reports positive numbers (stories260k cut
to one layer, in one process, Dynamo's ``eager`` backend: the plumbing, not the speed)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import model_bench  # noqa: E402


TORCH_ROWS = [v for v in model_bench.VARIANTS if v not in model_bench.LLAMA_CPP_ROWS]


def test_model_bench_smoke(tmp_path):
    out = tmp_path / "model_bench.json"
    model_bench.main([
        "--fast", "--layers", "1", "--new-tokens", "2", "--in-process", "--backend", "eager", "--threads", "1",
        "--variants", ",".join(TORCH_ROWS), "--json", str(out),
    ])
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == TORCH_ROWS
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "model_mb", "process_peak_mb", "rss_before_gen_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["peak_rss_mb"] >= r["rss_before_gen_mb"] or math.isnan(r["peak_rss_mb"]), name
        assert set(r["vs_bf16"]) == {"prefill_speed", "decode_speed", "model_size", "peak_rss"}
        assert (r["compile_s"] is not None) == ("_compiled" in name)
        # batch serving: 8 and 32 streams by default
        assert set(r["batch_decode_tokens_per_s"]) == {"8", "32"}, name
        assert all(v > 0 for v in r["batch_decode_tokens_per_s"].values()), name
    # Four-bit weights: the quantized rows are smaller than bf16 (stories260k's embedding stays dense).
    for name in ("torchao_mxfp4_emulated", "ours_w4a4", "ours_wo_compiled_cached"):
        assert rows[name]["model_mb"] < rows["bf16"]["model_mb"]
    assert rows["ours_w4a4_compiled_cached"]["cache_mb"] > 0 and rows["ours_w4a4"]["cache_mb"] == 0
    assert rows["bf16"]["linear_weight_bits"] == 16 and rows["fp32"]["linear_weight_bits"] == 32
    # 4.25 bits over the padded width (stories260k's 172-wide MLP input is padded to 192) + one rotation block
    for name in ("ours_w4a4", "ours_wo_compiled_cached"):
        assert 4.25 < rows[name]["linear_weight_bits"] < 4.25 * 192 / 172 + 0.5
    assert rows["ours_w4a4"]["shared_input_quant"] is True
    # *_graph rows keep decode steps in the graph. (stories260k's 172-wide MLP input is padded, which the
    # fused C++ step refuses, so its fused rows say "compiled graph" too; tests/test_decoder_step.py covers it.)
    assert rows["ours_w4a4_compiled_int8_head_graph"]["decode_step"] == "compiled graph"
    assert rows["ours_w4a4_compiled_int8_head"]["decode_step"] in ("fused C++ step", "compiled graph")


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The GPU script's plumbing on CPU (one linear shape, a one-layer decoder): every section reports,
    compiled equals eager, and asking for CUDA without one is refused."""
    import gpu_check  # noqa: E402  (benchmarks/ is on sys.path above)
    import torch

    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--quick", "--layers", "1", "--prompt-len", "16", "--new-tokens", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    for row in report["linear"]:
        assert row["compiled_vs_eager_max_abs"] == 0 and row["gpu_bf16_vs_cpu_fp32_max_rel"] < 0.05
        assert row["kernel_count"] > 0 or row["extern_ops"]  # Inductor's kernels, or the whole linear as one op of ours
    assert report["hardware_mxfp4_gemm"] == {"available": False, "capability": None}
    rows = {r["variant"]: r for r in report["model"]}
    assert set(rows) == {"bf16", "bf16_compiled", "ours_w4a4_compiled", "ours_wo_compiled", "ours_w4a4_cached_compiled"}
    for name, r in rows.items():
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        if name.startswith("ours"):
            assert r["compiled_vs_eager_max_rel"] == 0, name
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            gpu_check.main([])


def test_model_bench_interleaves_rows_in_subprocesses(tmp_path):
    out = tmp_path / "model_bench.json"
    model_bench.main([
        "--fast", "--layers", "1", "--new-tokens", "2", "--rounds", "2", "--backend", "eager", "--threads", "1",
        "--variants", "bf16,ours_wo_compiled", "--json", str(out),
    ])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["bf16", "ours_wo_compiled"]
    for r in rows.values():
        assert "error" not in r and r["timed_runs"] == 2 and len(r["decode_s_all"]) == 2
        assert r["decode_tokens_per_s"] == 2 / min(r["decode_s_all"])
    assert rows["ours_wo_compiled"]["attn_implementation"] == "torchao_mx_ext_sdpa_packed_gqa"


def test_model_bench_llama_cpp_rows_skip_without_llama_cpp(tmp_path, monkeypatch, capsys):
    """Where llama.cpp is not built (CI), its rows are skipped with the command that builds it, and the
    run still succeeds (exit 0) with the other rows measured."""
    import llama_cpp_bench

    monkeypatch.setattr(llama_cpp_bench, "BIN", tmp_path / "no-llama.cpp")
    out = tmp_path / "model_bench.json"
    model_bench.main([
        "--fast", "--layers", "1", "--new-tokens", "2", "--rounds", "1", "--in-process", "--backend", "eager",
        "--threads", "1", "--variants", "bf16," + ",".join(model_bench.LLAMA_CPP_ROWS), "--json", str(out),
    ])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["bf16"]["prefill_tokens_per_s"] > 0
    for name in model_bench.LLAMA_CPP_ROWS:
        assert "build_llama_cpp.sh" in rows[name]["skipped"] and "llama-bench" in rows[name]["skipped"]
    assert "skipped: llama.cpp is not built here" in capsys.readouterr().out


def test_model_bench_llama_cpp_rows_run_where_built(tmp_path):
    """With llama.cpp built (``bash scripts/build_llama_cpp.sh``), its rows time stories260k's GGUFs. Our
    MXFP4 GGUF cannot hold stories260k (its 172-wide MLP input is no whole number of 32-blocks and
    llama.cpp does not zero-pad): that row is an error naming the reason, and the run exits 1."""
    import llama_cpp_bench

    if llama_cpp_bench.missing_tools():
        pytest.skip("llama.cpp is not built here (bash scripts/build_llama_cpp.sh)")
    out = tmp_path / "model_bench.json"
    with pytest.raises(SystemExit) as exit_info:
        model_bench.main([
            "--fast", "--new-tokens", "4", "--rounds", "1", "--threads", "1", "--variants",
            ",".join(model_bench.LLAMA_CPP_ROWS), "--json", str(out),
        ])
    assert exit_info.value.code == 1
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("llama.cpp_bf16", "llama.cpp_q4_0"):
        assert rows[name]["prefill_tokens_per_s"] > 0 and rows[name]["decode_tokens_per_s"] > 0, name
        assert rows[name]["timed_runs"] == 1
    assert rows["llama.cpp_bf16"]["linear_weight_bits"] == 16
    if (llama_cpp_bench.BIN / "llama-batched-bench").exists():  # built by the script since it was added there
        assert set(rows["llama.cpp_q4_0"]["batch_decode_tokens_per_s"]) == {"8", "32"}
        assert all(v > 0 for v in rows["llama.cpp_q4_0"]["batch_decode_tokens_per_s"].values())
    assert "Q4_0" in rows["llama.cpp_q4_0"]["linear_types"]
    assert "not a multiple of 32" in rows["llama.cpp_mxfp4"]["error"]


def test_error_breakdown_activation_side_against_float64_and_smoke(tmp_path):
    """The activation-only quantizer is ``Q(x H) H^T`` (float64 reference quantizer and Hadamard, a
    width padded from 40 to 64); the benchmark runs on stories260k and orders its rows as asked."""
    import torch

    import error_breakdown
    from reference import ref_fake_quantize, ref_hadamard
    from torchao_mx_ext.rotation.rotations import rotation_block

    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3
    h = rotation_block("hadamard", 32)
    got = error_breakdown.fake_quantize_input(x, h, "floor")
    xp = torch.nn.functional.pad(x.double(), (0, 24))
    hd = torch.block_diag(ref_hadamard(32), ref_hadamard(32))
    ref = (ref_fake_quantize((xp @ hd).float(), "floor").double() @ hd.T)[:, :40]
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(error_breakdown.fake_quantize_input(x, None, "floor").double(),
                               ref_fake_quantize(torch.nn.functional.pad(x, (0, 24)), "floor").double()[:, :40])

    out = tmp_path / "breakdown.json"
    report = error_breakdown.main(["--model", "stories260k", "--eval-windows", "1", "--seq-len", "128",
                                   "--groups", "mlp_out,all", "--threads", "1", "--json", str(out)])
    assert [r["group"] for r in report["rows"]] == ["mlp_out", "all"]
    for r in report["rows"]:
        for mode in error_breakdown.MODES:
            assert math.isfinite(r[mode]) and r[mode] > 1
    # quantizing more layers costs more on both sides together
    assert report["rows"][1]["both"] > report["rows"][0]["both"]
    assert json.loads(out.read_text())["fp_ppl"] == report["fp_ppl"]


def test_w4a4_gemm_bench_smoke(tmp_path):
    """The integer-GEMM benchmark's plumbing: every variant timed, and the integer GEMM equal to the
    emulation within float32 summation rounding."""
    import w4a4_gemm_bench

    out = tmp_path / "w4a4_gemm_bench.json"
    w4a4_gemm_bench.main(["--threads", "1", "--rows", "1,80", "--reps", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert len(rows) == 2 * len(w4a4_gemm_bench.SHAPES)
    on_vnni = report["machine"]["integer_path"] == "avx512_vnni"
    for r in rows:
        skipped = ({"gemv"} if r["rows"] > 64 else set()) | (set() if on_vnni else {"int_mm_avx2"})
        assert set(r["ms"]) == set(w4a4_gemm_bench.VARIANTS) - skipped
        assert (r["int_mm_speedup_vs_avx2"] is not None) == on_vnni
        assert all(v > 0 for v in r["ms"].values())
        assert r["int_mm_max_rel_diff"] < 1e-5


def test_attention_bench_smoke(tmp_path):
    """The attention benchmark's plumbing: ATen's SDPA timed for every case, ours where its kernel
    applies, and both within bf16 rounding of each other."""
    import attention_bench

    from torchao_mx_ext.kernels import cpu_decode_attention, cpu_extension, cpu_prompt_attention

    out = tmp_path / "attention_bench.json"
    attention_bench.main(["--prompt-lens", "40", "--reps", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["query_rows"]) for r in rows] == [("prompt", 40), ("decode", 3)]
    for r, ours in zip(rows, (cpu_prompt_attention.AVX512_WITHOUT_AMX, cpu_extension.VECTORIZED)):
        assert set(r["ms"]) == ({"aten_sdpa", "ours"} if ours else {"aten_sdpa"}) and all(v > 0 for v in r["ms"].values())
        if ours:
            assert r["max_abs_diff"] < 0.05 and r["ours_speedup"] > 0
    with pytest.raises(SystemExit):
        attention_bench.main(["--prompt-lens", "8"])


def test_activation_quant_bench_smoke(tmp_path):
    """The input-side benchmark's plumbing: every variant timed per shape, the JSON written."""
    import activation_quant_bench

    out = tmp_path / "activation_quant_bench.json"
    activation_quant_bench.main(["--shapes", "1x64,4x96", "--rounds", "1", "--threads", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["rows"], r["width"]) for r in rows] == [(1, 64), (4, 96)]
    for r in rows:
        assert set(r["us"]) == {"matmul+quantizer", "fused", "fused rotation only", "matmul"}
        assert all(v > 0 for v in r["us"].values()) and r["speedup"] > 0


def test_decode_profile_smoke_whole_model_compiled(tmp_path):
    """decode_profile on a ``--compile model`` row (tme.compile_model, Dynamo's ``eager`` backend): a
    positive step time, the int8 head's kernel among the per-step operators, the JSON written."""
    import decode_profile

    out = tmp_path / "profile.json"
    report = decode_profile.main([
        "--model", "stories260k", "--variant", "ours_w4a4_compiled_int8_head", "--compile", "model", "--backend", "eager",
        "--layers", "1", "--prompt-len", "8", "--steps", "3", "--top", "1000", "--threads", "1", "--json", str(out),
    ])
    assert json.loads(out.read_text()) == report
    assert report["step_ms"] > 0 and report["notes"]["compile"] == "model"
    ops = {r["op"]: r for r in report["ops"]}
    # the head, once per step (our int8 GEMV on AVX2 / AVX-512 CPUs, ATen's elsewhere): the prefill runs
    # before the profiler starts
    from torchao_mx_ext.kernels import cpu_extension

    head_op = "torchao_mx_ext::int8_gemv" if cpu_extension.VECTORIZED else "aten::_weight_int8pack_mm"
    assert ops[head_op]["calls_per_step"] == 1
    assert all(r["self_ms_per_step"] >= 0 for r in report["ops"])
