"""The exact integer MXFP4 x MXFP4 GEMM for CPUs (torchao_mx_ext/kernels/cpu_mxfp4_mm.py): against a
float64 reference written here (bit for bit where every partial sum is representable, within float32
summation rounding elsewhere), against the float emulation of W4A4 linears on random and real
(stories260k) shapes, under torch.compile and torch.export, opcheck, and its fallbacks.

The C++ library is shared with the GEMV kernel; the first test to need it builds it (20-60 s once).
"""

import logging
import re

import pytest
import torch
from torchao.quantization import quantize_

from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config, RotatedMXFP4Tensor
from torchao_mx_ext.kernels import CPU_NATIVE_BF16_GEMM, cpu_extension, cpu_mxfp4_dequantize, cpu_mxfp4_gemv, cpu_mxfp4_mm
from torchao_mx_ext.mx import mxfp4_quantize

# E2M1 code -> value, OCP MX v1.0 section 5.3.3: sign bit 3, magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512_vnni"}


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not cpu_extension.is_available():
        pytest.fail("the CPU MXFP4 kernels did not build (see the logged warning): they need g++ and ninja")
    best = cpu_mxfp4_mm.set_isa(None)
    yield best
    cpu_mxfp4_mm.set_isa(None)


@pytest.fixture(params=list(ISA_NAMES), ids=ISA_NAMES.get)
def isa(request):
    best = cpu_mxfp4_mm.set_isa(None)
    if request.param > best:
        pytest.skip(f"this CPU (or ATEN_CPU_CAPABILITY) has no {ISA_NAMES[request.param]} path")
    assert cpu_mxfp4_mm.set_isa(request.param) == request.param
    yield request.param
    cpu_mxfp4_mm.set_isa(None)


def decode64(qdata, scale, block_size):
    """float64 values of MXFP4 codes: the literal table times 2^(byte - 127); byte 255 is NaN."""
    codes = torch.stack((qdata & 15, qdata >> 4), dim=-1).reshape(*qdata.shape[:-1], -1).long()
    values = torch.tensor(E2M1, dtype=torch.float64)[codes]
    block = torch.where(scale == 255, float("nan"), 2.0 ** (scale.to(torch.float64) - 127))
    return values * block.repeat_interleave(block_size, dim=-1)


def reference(a_q, a_s, w_q, w_s, block_size, bias=None):
    """float64 product (exact here: at most 2^-254 * 36 * K in range, far from float64's limits) and
    sum |a| |w| for error bounds."""
    a, w = decode64(a_q, a_s, block_size), decode64(w_q, w_s, block_size)
    y = a @ w.T
    return (y if bias is None else y + bias.to(torch.float64)), a.abs() @ w.abs().T


def random_codes(rows, k, block_size, gen, scale_range=(112, 136)):
    qdata = torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, generator=gen)
    scale = torch.randint(*scale_range, (rows, k // block_size), dtype=torch.uint8, generator=gen)
    return qdata, scale


def check(y, ref, magnitude, out_dtype, k):
    """float32 sums of exact terms in any order (at most K/32 chunks x 16 lanes of them): |error| <=
    (K/32 + 16) * eps32 * sum |a w|; plus one rounding to out_dtype (relative, or at most the spacing of
    its subnormals)."""
    info = torch.finfo(out_dtype)
    bound = (k // 32 + 16) * torch.finfo(torch.float32).eps * magnitude + info.eps * ref.abs() + info.tiny * info.eps
    err = (y.to(torch.float64) - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()].item():.3g}"


def test_one_chunk_is_bit_exact(isa):
    """K = 32: the whole dot product is one exact integer times one exact power of two, so the result
    is the float64 value rounded once (to float32, or straight to bfloat16)."""
    gen = torch.Generator().manual_seed(0)
    a_q, a_s = random_codes(9, 32, 32, gen, (90, 160))
    w_q, w_s = random_codes(13, 32, 32, gen, (90, 160))
    ref, _ = reference(a_q, a_s, w_q, w_s, 32)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = cpu_mxfp4_mm.mxfp4_mm(a_q, a_s, w_q, w_s, 32, out_dtype=out_dtype)
        assert y.dtype == out_dtype and y.shape == (9, 13)
        assert torch.equal(y, ref.to(out_dtype)), out_dtype


def test_equal_scales_are_bit_exact_at_any_width(isa):
    """With one scale per operand row, every partial sum is an integer (below 2^24) times one power
    of two: exactly representable, so any summation order gives the exact result."""
    gen = torch.Generator().manual_seed(1)
    k = 1536
    a_q, _ = random_codes(5, k, 32, gen)
    w_q, _ = random_codes(37, k, 32, gen)
    a_s = torch.full((5, k // 32), 120, dtype=torch.uint8)
    w_s = torch.full((37, k // 32), 131, dtype=torch.uint8)
    ref, _ = reference(a_q, a_s, w_q, w_s, 32)
    y = cpu_mxfp4_mm.mxfp4_mm(a_q, a_s, w_q, w_s, 32)
    assert torch.equal(y.double(), ref)


@pytest.mark.parametrize("block_size", [32, 64])
def test_random_shapes_match_float64_reference(isa, block_size):
    gen = torch.Generator().manual_seed(2)
    for m, n, k in [(1, 1, 64), (3, 7, 128), (5, 33, 320), (17, 16, 576), (4, 2, 64 * 9)]:
        a_q, a_s = random_codes(m, k, block_size, gen)
        w_q, w_s = random_codes(n, k, block_size, gen)
        bias = torch.randn(n, generator=gen)
        for b in (None, bias):
            for out_dtype in (torch.float32, torch.bfloat16):
                y = cpu_mxfp4_mm.mxfp4_mm(a_q, a_s, w_q, w_s, block_size, b, out_dtype)
                assert y.dtype == out_dtype and y.shape == (m, n)
                ref, magnitude = reference(a_q, a_s, w_q, w_s, block_size, b)
                check(y, ref, magnitude, out_dtype, k)


def test_odd_chunk_counts_on_both_weight_paths(isa):
    """The AVX-512 path takes two 32-element chunks per register: a last, odd chunk runs with a zero
    upper half. Both weight paths (decoded in registers for <= 4 rows, from a buffer above)."""
    gen = torch.Generator().manual_seed(4)
    for m in (2, 9):
        for k in (32, 96, 224):
            a_q, a_s = random_codes(m, k, 32, gen)
            w_q, w_s = random_codes(7, k, 32, gen)
            y = cpu_mxfp4_mm.mxfp4_mm(a_q, a_s, w_q, w_s, 32)
            ref, magnitude = reference(a_q, a_s, w_q, w_s, 32)
            check(y, ref, magnitude, torch.float32, k)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paths_agree_and_special_scales(isa, out_dtype):
    """E8M0 byte 255 is NaN: the rows and columns it touches are NaN (also once rounded to a 16-bit
    dtype) and nothing else is."""
    gen = torch.Generator().manual_seed(3)
    a_q, a_s = random_codes(6, 96, 32, gen, (112, 127))  # results within float16's range
    w_q, w_s = random_codes(5, 96, 32, gen, (112, 127))
    a_s[2, 1] = 255
    w_s[4, 0] = 255
    y = cpu_mxfp4_mm.mxfp4_mm(a_q, a_s, w_q, w_s, 32, out_dtype=out_dtype)
    nan = torch.zeros(6, 5, dtype=torch.bool)
    nan[2, :] = True
    nan[:, 4] = True
    assert torch.equal(y.isnan(), nan)
    ref, magnitude = reference(a_q, a_s, w_q, w_s, 32)
    check(y[~nan], ref[~nan], magnitude[~nan], out_dtype, 96)


@pytest.mark.parametrize("block_size", [32, 64])
def test_many_rows_at_every_tile_edge(isa, block_size):
    """More than 4 rows (the AVX-512 VNNI path's panel GEMM: tiles of 4 rows x 48 columns, panels of
    16): row counts that leave 1-3 rows, column counts that leave part of a panel or of a tile, in
    every output dtype, with and without bias, against float64."""
    gen = torch.Generator().manual_seed(8)
    for m, n, k in [(5, 1, 64), (8, 16, 128), (13, 47, 192), (6, 50, 64), (9, 97, 320), (14, 48, 128)]:
        a_q, a_s = random_codes(m, k, block_size, gen, (112, 127))  # results within float16's range
        w_q, w_s = random_codes(n, k, block_size, gen, (112, 127))
        bias = torch.randn(n, generator=gen)
        for b, out_dtype in [(None, torch.float32), (bias, torch.float32), (bias, torch.bfloat16), (None, torch.float16)]:
            y = cpu_mxfp4_mm.mxfp4_mm(a_q, a_s, w_q, w_s, block_size, b, out_dtype)
            assert y.dtype == out_dtype and y.shape == (m, n)
            ref, magnitude = reference(a_q, a_s, w_q, w_s, block_size, b)
            check(y, ref, magnitude, out_dtype, k)


def test_shapes_and_errors():
    gen = torch.Generator().manual_seed(4)
    w_q, w_s = random_codes(4, 64, 32, gen)
    a_q, a_s = random_codes(6, 64, 32, gen)
    y = cpu_mxfp4_mm.mxfp4_mm(a_q.reshape(2, 3, 32), a_s.reshape(2, 3, 2), w_q, w_s, 32)
    assert y.shape == (2, 3, 4) and y.dtype == torch.float32
    assert torch.equal(y.reshape(6, 4), cpu_mxfp4_mm.mxfp4_mm(a_q, a_s, w_q, w_s, 32))
    assert cpu_mxfp4_mm.mxfp4_mm(a_q[:0], a_s[:0], w_q, w_s, 32).shape == (0, 4)
    # non-contiguous operands are read correctly
    a_t = torch.cat([a_q, a_q], dim=1)[:, ::2]
    assert torch.equal(cpu_mxfp4_mm.mxfp4_mm(a_t, a_s, w_q, w_s, 32), cpu_mxfp4_mm.mxfp4_mm(a_t.contiguous(), a_s, w_q, w_s, 32))
    with pytest.raises(RuntimeError, match="features"):
        cpu_mxfp4_mm.mxfp4_mm(a_q[:, :16], a_s[:, :1], w_q, w_s, 32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_mxfp4_mm.mxfp4_mm(a_q, torch.zeros(6, 4, dtype=torch.uint8), w_q, torch.zeros(4, 4, dtype=torch.uint8), 16)
    with pytest.raises(RuntimeError, match="scale shape"):
        cpu_mxfp4_mm.mxfp4_mm(a_q, a_s[:, :1], w_q, w_s, 32)
    with pytest.raises(RuntimeError, match="uint8"):
        cpu_mxfp4_mm.mxfp4_mm(a_q.to(torch.int8), a_s, w_q, w_s, 32)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_mxfp4_mm.mxfp4_mm(a_q, a_s, w_q, w_s, 32, torch.zeros(5))


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    w_q, w_s = random_codes(8, 96, 32, gen)
    a_q, a_s = random_codes(6, 96, 32, gen)
    samples = [
        (a_q[:1], a_s[:1], w_q, w_s, 32, None, None),
        (a_q, a_s, w_q, w_s, 32, torch.randn(8, generator=gen), torch.bfloat16),
        (a_q.reshape(2, 3, 48), a_s.reshape(2, 3, 3), w_q, w_s, 32, torch.randn(8, generator=gen).bfloat16(), torch.float32),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.torchao_mx_ext.mxfp4_mm.default, args)


def test_pure_torch_fallback_matches_kernel():
    gen = torch.Generator().manual_seed(6)
    w_q, w_s = random_codes(24, 160, 32, gen)
    a_q, a_s = random_codes(3, 160, 32, gen)
    bias = torch.randn(24, generator=gen)
    kernel = cpu_mxfp4_mm.mxfp4_mm(a_q, a_s, w_q, w_s, 32, bias)
    fallback = cpu_mxfp4_mm.reference_mxfp4_mm(a_q, a_s, w_q, w_s, 32, bias)
    ref, magnitude = reference(a_q, a_s, w_q, w_s, 32, bias)
    check(kernel, ref, magnitude, torch.float32, 160)
    check(fallback, ref, magnitude, torch.float32, 160)


# -- RotatedMXFP4Tensor.linear: the integer GEMM against the float emulation ---------------------------


@pytest.fixture
def integer_gemm_route(monkeypatch):
    """On AVX-512 CPUs many-row linears take the vectorised decode + library GEMM instead
    (tests/kernels/test_cpu_mxfp4_dequantize.py): these tests pin the integer GEMM's route. The route is
    chosen while AOTAutograd traces the subclass, after the compile caches' keys were taken (from the
    Dynamo graph, the same for both routes), so those caches are off here."""
    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", False)
    monkeypatch.setattr(cpu_mxfp4_gemv, "PANELS", False)
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        yield

LINEAR_CASES = [
    # (in, out, config): W4A4 with the scale rules the integer path takes, a rotation, padding
    (96, 40, MXFP4Config(scale_rule="floor")),
    (64, 24, MXFP4BlockRotConfig(scale_rule="even")),
    (160, 24, MXFP4BlockRotConfig(scale_rule="rceil")),
    (100, 24, MXFP4BlockRotConfig(scale_rule="mse")),
]


def _emulated(monkeypatch, lin, x):
    with monkeypatch.context() as mp:
        mp.setattr(cpu_mxfp4_mm, "applies", lambda weight, x: False)
        mp.setattr(cpu_mxfp4_gemv, "applies", lambda weight, x, fused_input=False: False)
        return lin(x)


def _count_calls(monkeypatch):
    calls = []
    real = cpu_mxfp4_mm.mxfp4_mm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_mxfp4_mm, "mxfp4_mm", spy)
    return calls


def _assert_summation_close(y, ref, dtype):
    """Same exact products; only the float32 summation order differs, then one rounding to dtype."""
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=2e-6 * scale, rtol=0)
    else:
        torch.testing.assert_close(y.float(), ref.float(), atol=2e-6 * scale, rtol=2.0**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,config", LINEAR_CASES)
def test_linear_uses_integer_gemm_and_matches_emulation(integer_gemm_route, monkeypatch, k, n, config, dtype):
    lin = torch.nn.Linear(k, n).to(dtype)
    quantize_(lin, config)
    assert isinstance(lin.weight, RotatedMXFP4Tensor)
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        for shape in [(9, k), (2, 5, k), (70, k), (1, k)]:  # the last: few rows go to the GEMV
            x = torch.randn(*shape).to(dtype)
            y = lin(x)
            ref = _emulated(monkeypatch, lin, x)
            assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
            _assert_summation_close(y, ref, dtype)
    assert len(calls) == 3


def test_dispatch_conditions(integer_gemm_route, monkeypatch, caplog):
    calls = _count_calls(monkeypatch)
    x = torch.randn(cpu_mxfp4_mm.GEMV_ROWS + 1, 64)
    for config in (MXFP4Config(act_quant=False), MXFP4Config(scale_rule="fp_quant"), MXFP4Config(kernel_preference="emulated")):
        lin = torch.nn.Linear(64, 16)
        quantize_(lin, config)
        with torch.no_grad():
            lin(x)
    assert not calls  # weight-only, fp_quant's 4/3 factor, and the emulation preference keep other paths
    lin = torch.nn.Linear(64, 16)
    quantize_(lin, MXFP4Config())
    with torch.no_grad():  # few rows: the GEMV on the fake-quantized input
        lin(torch.randn(cpu_mxfp4_mm.GEMV_ROWS, 64))
    assert not calls
    xg = torch.randn(cpu_mxfp4_mm.GEMV_ROWS + 1, 64, requires_grad=True)  # no backward in the kernel: autograd keeps the emulation
    lin(xg).sum().backward()
    assert not calls and xg.grad is not None
    # A CPU without AVX2: the emulation, and one log line however many calls.
    monkeypatch.setattr(cpu_mxfp4_mm, "_said_no_simd", False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with caplog.at_level(logging.INFO, logger=cpu_mxfp4_mm.__name__), torch.no_grad():
        y = lin(x)
        lin(x)
    assert not calls
    assert [r.getMessage() for r in caplog.records if r.name == cpu_mxfp4_mm.__name__ and "no AVX2" in r.getMessage()].__len__() == 1
    monkeypatch.undo()
    with torch.no_grad():
        _assert_summation_close(lin(x), y, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_beyond_max_rows_decode_the_weight_for_the_float_gemm(integer_gemm_route, monkeypatch, dtype):
    """Beyond MAX_ROWS the weight decode + float32 library GEMM is faster on AVX2: no integer GEMM, one
    weight decode, and the emulation's numbers bit for bit (the same fake-quantized input and decoded
    weight in one float32 GEMM; no rotation, whose fused kernel sums in another order)."""
    monkeypatch.setattr(cpu_mxfp4_dequantize, "VECTORIZED", True)  # the C++ decode (its scalar path gives the same bits)
    calls = _count_calls(monkeypatch)
    decodes = []
    real_decode = cpu_mxfp4_dequantize.mxfp4_dequantize
    monkeypatch.setattr(cpu_mxfp4_dequantize, "mxfp4_dequantize", lambda *a: decodes.append(a[0].shape) or real_decode(*a))
    lin, ref_lin = torch.nn.Linear(96, 40).to(dtype), torch.nn.Linear(96, 40).to(dtype)
    ref_lin.load_state_dict(lin.state_dict())
    quantize_(lin, MXFP4Config(scale_rule="even"))
    quantize_(ref_lin, MXFP4Config(scale_rule="even", kernel_preference="emulated"))
    with torch.no_grad():
        lin(torch.randn(cpu_mxfp4_mm.MAX_ROWS, 96).to(dtype))
        assert len(calls) == 1 and not decodes  # at the limit: still the integer GEMM
        x = torch.randn(2, cpu_mxfp4_mm.MAX_ROWS // 2 + 1, 96).to(dtype)
        y = lin(x)
    assert len(calls) == 1 and decodes == [(40, 48)]
    with torch.no_grad():  # without bf16 GEMM instructions (AVX2) bf16 inputs run a float32 GEMM
        ref = ref_lin(x.float() if dtype == torch.bfloat16 and not CPU_NATIVE_BF16_GEMM else x)
    assert torch.equal(y, ref.to(dtype))


def test_build_failure_keeps_the_emulation(integer_gemm_route, monkeypatch):
    def fail():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_extension, "_load_extension", fail)
    monkeypatch.setattr(cpu_extension, "_state", None)
    assert not cpu_extension.is_available()
    lin = torch.nn.Linear(64, 16)
    quantize_(lin, MXFP4Config())
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        lin(torch.randn(cpu_mxfp4_mm.GEMV_ROWS + 1, 64))
    assert not calls
    # the operator's own fallback (what a graph traced elsewhere runs here) computes the same numbers
    gen = torch.Generator().manual_seed(7)
    w_q, w_s = random_codes(8, 64, 32, gen)
    a_q, a_s = random_codes(2, 64, 32, gen)
    ref, magnitude = reference(a_q, a_s, w_q, w_s, 32)
    check(cpu_mxfp4_mm._fallback_mxfp4_mm(a_q, a_s, w_q, w_s, 32), ref, magnitude, torch.float32, 64)


def test_real_model_logits_match_emulation(integer_gemm_route, monkeypatch):
    """stories260k (its real weights and activations, every linear W4A4 with block rotations):
    logits through the integer GEMM against the same model on the float emulation."""
    import copy

    from torchao_mx_ext.recipes import quantize_linears
    from torchao_mx_ext.zoo import load_model

    base, _ = load_model("stories260k")
    fast = quantize_linears(copy.deepcopy(base), MXFP4BlockRotConfig())
    emulated = quantize_linears(base, MXFP4BlockRotConfig(kernel_preference="emulated"))
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, base.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = fast(ids).logits
        assert len(calls) == 7 * base.config.num_hidden_layers
        ref = emulated(ids).logits
    assert len(calls) == 7 * base.config.num_hidden_layers
    # Reordered float32 sums in one layer move the next layer's activation quantization only where a
    # value sits on a rounding boundary, so the logits agree to float32 rounding almost everywhere.
    torch.testing.assert_close(y, ref, atol=1e-3 * ref.abs().max().item(), rtol=0)
    assert (y.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.98


def test_compile_and_export_keep_one_call_per_linear(integer_gemm_route):
    from torch._inductor.utils import run_and_get_code

    model = torch.nn.Sequential(torch.nn.Linear(100, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    quantize_(model, MXFP4BlockRotConfig())
    x = torch.randn(12, 100).bfloat16()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    assert len(re.findall(r"torch\.ops\.torchao_mx_ext\.mxfp4_mm\.default\(", "\n".join(code))) == 2
    with torch.no_grad():  # with autograd on, the biases' gradients keep the later linears on the emulation
        exported = torch.export.export(model, (x,))
    ops = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.torchao_mx_ext.mxfp4_mm.default) == 2
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), eager, atol=0, rtol=0)
