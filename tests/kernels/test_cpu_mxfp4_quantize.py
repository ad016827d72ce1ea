"""The CPU activation quantizer (torchao_mx_ext/kernels/cpu_mxfp4_quantize.py) against a float64
reference written here (the OCP MX definition with each scale rule), on both code paths; bit for bit
against the pure-torch quantizer for floor / even / rceil; its errors, opcheck, fallback, and the
linears that use it, eager and compiled. The fused rotation + quantizer: its rotation against float64
``x R`` within the error bound of a float32 FMA chain, bit-equal between its code paths, its
quantization bit-equal to the quantizer's on its own rotated values.
"""

import math
import re

import pytest
import torch
from kernel_paths import kernel_path_fixtures
from torchao.quantization import quantize_

from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config
from torchao_mx_ext.kernels import cpu_mxfp4_dequantize, cpu_mxfp4_gemv, cpu_mxfp4_mm, cpu_mxfp4_quantize
from torchao_mx_ext.mx import mxfp4_fake_quantize
from torchao_mx_ext.rotation import pad_and_rotate, rotation_block

ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}
E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

kernel, isa = kernel_path_fixtures(cpu_mxfp4_quantize.set_isa, ISA_NAMES)


def rne_e2m1(v: float) -> float:
    """Nearest E2M1 value to v (ties to the even mantissa), saturating at 6: from the grid, in float64."""
    a = abs(v)
    best = min(E2M1_GRID, key=lambda g: (abs(g - a), E2M1_GRID.index(g) % 2))
    return math.copysign(best, v)


def exponent(amax: float, rule: str) -> int:
    """The rules from their definitions: floor(log2 amax) - 2, plus one where the block's amax rounds
    up to 2^(k+1) on E2M1's one mantissa bit (even) or exceeds 1.5 * 2^k (rceil)."""
    if amax == 0.0 or amax < 2.0**-126:
        k = -127
    else:
        k = math.floor(math.log2(amax))
    e = k - 2
    if rule == "even" and amax >= 1.75 * 2.0**k:
        e += 1
    if rule == "rceil" and amax > 1.5 * 2.0**k:
        e += 1
    return max(-127, min(127, e))


def to_float32(values):
    """The float32 result: 4 * 2^126 overflows to inf there, as in any float32 MXFP4 implementation."""
    return torch.tensor(values, dtype=torch.float64).float().tolist()


def reference_block(block, rule):
    """One block in float64, or the two mse candidates' results and their errors."""
    if not all(math.isfinite(v) for v in block):
        return [math.nan] * len(block), None
    e = exponent(max(abs(v) for v in block), rule)
    out = to_float32([rne_e2m1(v * 2.0**-e) * 2.0**e for v in block])
    if rule != "mse":
        return out, None
    e_up = min(e + 1, 127)
    up = to_float32([rne_e2m1(v * 2.0**-e_up) * 2.0**e_up for v in block])
    err = sum((v - o) ** 2 for v, o in zip(block, out))
    err_up = sum((v - o) ** 2 for v, o in zip(block, up))
    return (up if err_up < err else out), (out, up, err, err_up)


def test_every_rule_against_the_float64_definition(isa):
    """Random blocks over a wide range of magnitudes, blocks at the rules' thresholds (amax 1.5, 1.75,
    2 times a power of two), zero, subnormal and huge blocks, and blocks with NaN or Inf."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(32, generator=gen) * 2.0 ** float(s) for s in range(-30, 31, 3)]
    for top in (1.5, 1.75, 2.0, 1.5 + 2**-22, 1.75 - 2**-22):
        row = torch.rand(32, generator=gen)
        row[7] = top
        rows.append(row * 8.0)
    rows += [torch.zeros(32), torch.full((32,), 1e-40), torch.full((32,), -3e38), torch.randn(32, generator=gen) * 1e-39]
    for bad in (math.nan, math.inf):
        row = torch.randn(32, generator=gen)
        row[3] = bad
        rows.append(row)
    x = torch.stack(rows)
    for rule in cpu_mxfp4_quantize.RULES:
        y = cpu_mxfp4_quantize.mxfp4_fake_quantize(x, 32, rule)
        assert y.dtype == torch.float32 and y.shape == x.shape
        for r in range(x.shape[0]):
            want, mse = reference_block(x[r].tolist(), rule)
            got = y[r].tolist()
            if mse is not None and not math.isclose(mse[2], mse[3], rel_tol=1e-6):
                assert got == want, (rule, r)
            elif mse is not None:  # a near-tie: either candidate
                assert got in (mse[0], mse[1]), (rule, r)
            else:
                assert all((math.isnan(g) and math.isnan(w)) or g == w for g, w in zip(got, want)), (rule, r)


@pytest.mark.parametrize("rule", ["floor", "even", "rceil"])
@pytest.mark.parametrize("block_size", [32, 64])
def test_bit_equal_to_the_pure_torch_quantizer(isa, rule, block_size):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4 * block_size, generator=gen) * torch.logspace(-8, 8, 4 * block_size, base=2.0)
    x[1, 2, 5] = math.nan
    y, ref = cpu_mxfp4_quantize.mxfp4_fake_quantize(x, block_size, rule), mxfp4_fake_quantize(x, block_size, rule)
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y.nan_to_num(), ref.nan_to_num())


def test_mse_differs_from_pure_torch_only_at_near_ties(isa):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256, 576, generator=gen) * 3
    y, ref = cpu_mxfp4_quantize.mxfp4_fake_quantize(x, 32, "mse"), mxfp4_fake_quantize(x, 32, "mse")
    differ = (y != ref).reshape(256, 18, 32).any(-1)
    xb = x.reshape(256, 18, 32).double()
    err_kernel = (xb - y.reshape(256, 18, 32).double()).square().sum(-1)
    err_torch = (xb - ref.reshape(256, 18, 32).double()).square().sum(-1)
    assert int(differ.sum()) <= 0.001 * differ.numel()
    torch.testing.assert_close(err_kernel[differ], err_torch[differ], rtol=1e-5, atol=0)


def test_errors_and_opcheck():
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        cpu_mxfp4_quantize.mxfp4_fake_quantize(x.bfloat16(), 32, "floor")
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_mxfp4_quantize.mxfp4_fake_quantize(x, 16, "floor")
    with pytest.raises(RuntimeError, match="not a multiple of 64"):
        cpu_mxfp4_quantize.mxfp4_fake_quantize(torch.randn(4, 96), 64, "floor")
    with pytest.raises(RuntimeError, match="floor, even, rceil or mse"):
        cpu_mxfp4_quantize.mxfp4_fake_quantize(x, 32, "fp_quant")
    torch.library.opcheck(torch.ops.torchao_mx_ext.mxfp4_fake_quantize.default, (x, 32, "even"))
    strided = torch.randn(64, 4).t()  # not contiguous
    assert torch.equal(cpu_mxfp4_quantize.mxfp4_fake_quantize(strided, 32, "floor"), mxfp4_fake_quantize(strided, 32, "floor"))


def test_applies_and_the_fallback(monkeypatch):
    monkeypatch.setattr(cpu_mxfp4_quantize, "VECTORIZED", True)
    x = torch.randn(4, 64)
    assert cpu_mxfp4_quantize.applies(x, 32, "mse")
    assert not cpu_mxfp4_quantize.applies(x, 32, "fp_quant")
    assert not cpu_mxfp4_quantize.applies(x.bfloat16(), 32, "mse")
    assert not cpu_mxfp4_quantize.applies(x.requires_grad_(), 32, "mse")  # no backward
    x = x.detach()
    assert torch.equal(cpu_mxfp4_quantize.fake_quantize(x, 32, "rceil", "emulated"), mxfp4_fake_quantize(x, 32, "rceil"))
    # AVX2 (the integer GEMM runs W4A4 of 9 to 128 rows): there inputs stay with Inductor's quantizer,
    # which makes the GEMM's codes in the same pass; the rotation alone (weight-only) still fuses, and
    # decode steps and prompts (the dequant-GEMV, decode + float GEMM) take the kernel
    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", False)
    rows, most = cpu_mxfp4_mm.GEMV_ROWS, cpu_mxfp4_mm.MAX_ROWS
    assert cpu_mxfp4_quantize.applies(torch.randn(rows, 64), 32, "mse")
    assert not cpu_mxfp4_quantize.applies(torch.randn(rows + 1, 64), 32, "mse")
    assert not cpu_mxfp4_quantize.applies(torch.randn(2, most // 2, 64), 32, "mse")
    assert cpu_mxfp4_quantize.applies(torch.randn(most + 1, 64), 32, "mse")
    rot = rotation_block("hadamard", 32, 0, "cpu")
    assert cpu_mxfp4_quantize.rotation_applies(torch.randn(rows + 1, 64), rot, 32, None)
    assert not cpu_mxfp4_quantize.rotation_applies(torch.randn(rows + 1, 64), rot, 32, "mse")
    assert cpu_mxfp4_quantize.rotation_applies(torch.randn(most + 1, 64), rot, 32, "mse")
    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", True)  # AVX-512: any number of rows
    assert cpu_mxfp4_quantize.applies(torch.randn(rows + 1, 64), 32, "mse")
    monkeypatch.setattr(cpu_mxfp4_quantize, "VECTORIZED", False)
    assert not cpu_mxfp4_quantize.applies(x, 32, "mse")  # no SIMD path: Inductor's kernel stays
    assert torch.equal(cpu_mxfp4_quantize._fallback_mxfp4_fake_quantize(x, 32, "even"), mxfp4_fake_quantize(x, 32, "even"))


@pytest.mark.parametrize("config, op", [
    (MXFP4Config(scale_rule="even"), "mxfp4_fake_quantize"),
    (MXFP4BlockRotConfig(scale_rule="even"), "mxfp4_rotate_fake_quantize"),  # the rotation fused in
])
def test_linears_use_it_eager_and_compiled(monkeypatch, config, op):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", True)  # W4A4 takes AVX-512's route, not the integer GEMM
    monkeypatch.setattr(cpu_mxfp4_gemv, "PANELS", False)  # (nor the GEMV's panels)
    monkeypatch.setattr(cpu_mxfp4_quantize, "VECTORIZED", True)
    calls = []
    real = getattr(cpu_mxfp4_quantize, op)
    monkeypatch.setattr(cpu_mxfp4_quantize, op, lambda *a: calls.append(a[0].shape) or real(*a))
    model = torch.nn.Sequential(torch.nn.Linear(100, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    quantize_(model, config)
    x = torch.randn(12, 100).bfloat16()
    with torch.no_grad():
        eager = model(x)
        assert calls == [(12, 128), (12, 64)]  # the first input padded to the stored width
        # emulate_precision_casts, as tme.compile_model sets it: on CPUs without bf16 GEMMs the linears
        # run in float32, and Inductor would otherwise drop the bf16 rounding between the two layers
        with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(
            fx_graph_cache=False, emulate_precision_casts=True
        ):
            torch._dynamo.reset()
            compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    assert len(re.findall(rf"torch\.ops\.torchao_mx_ext\.{op}\.default\(", "\n".join(code))) == 2


def random_rotation(b: int, seed: int) -> torch.Tensor:
    """A random orthogonal float32 block (QR of a Gaussian): entries of every size, unlike a Hadamard's."""
    q, _ = torch.linalg.qr(torch.randn(b, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


@pytest.mark.parametrize("b", [16, 32, 48, 64, 128, 256])
def test_fused_rotation_within_the_float32_fma_bound(isa, b):
    """``x R`` (rule none) against float64: each output is a chain of b float32 FMAs, so its error is
    at most ``gamma_b * sum_i |x_i R_ij|`` with ``gamma_b = b u / (1 - b u)``, ``u = 2^-24``."""
    gen = torch.Generator().manual_seed(b)
    x = torch.randn(7, 3 * 256, generator=gen) * torch.logspace(-6, 6, 3 * 256, base=2.0)
    rot = random_rotation(b, b)
    y = cpu_mxfp4_quantize.mxfp4_rotate_fake_quantize(x, rot, 32, "none")
    xb, rb = x.double().reshape(7, -1, b), rot.double()
    exact = (xb @ rb).reshape(x.shape)
    u = 2.0**-24
    bound = (b * u / (1 - b * u)) * (xb.abs() @ rb.abs()).reshape(x.shape)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y.double() - exact).abs() <= bound).all()
    assert (y.double() != exact).any()  # float32 arithmetic really ran (the bound is not vacuous)


@pytest.mark.parametrize("b", [16, 32, 48, 256])
def test_fused_paths_bit_equal(b):
    """The scalar, AVX2 and AVX-512 paths make the same FMA chains: the same bits, rotation and quantizer."""
    best = cpu_mxfp4_quantize.set_isa(None)
    if best < 1:
        pytest.skip("this CPU has no SIMD path")
    gen = torch.Generator().manual_seed(3)
    x, rot = torch.randn(9, 3 * 256, generator=gen) * 4, random_rotation(b, 7)
    try:
        for rule in ("none", *cpu_mxfp4_quantize.RULES):
            cpu_mxfp4_quantize.set_isa(0)
            scalar = cpu_mxfp4_quantize.mxfp4_rotate_fake_quantize(x, rot, 32, rule)
            for level in range(1, best + 1):
                assert cpu_mxfp4_quantize.set_isa(level) == level
                assert torch.equal(cpu_mxfp4_quantize.mxfp4_rotate_fake_quantize(x, rot, 32, rule), scalar), (rule, level)
    finally:
        cpu_mxfp4_quantize.set_isa(None)


@pytest.mark.parametrize("rule", cpu_mxfp4_quantize.RULES)
def test_fused_quantizes_its_own_rotation(isa, rule):
    """Q(x R) equals the quantizer applied to the kernel's own x R, bit for bit; against torch's
    rotation matmul (another summation order) only blocks with a value on a rounding boundary differ."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 576, generator=gen) * 3
    x[5, 40] = math.inf  # the block it rotates into is NaN, as the quantizer makes it
    rot = rotation_block("hadamard", 32, 0, "cpu")
    fused = cpu_mxfp4_quantize.mxfp4_rotate_fake_quantize(x, rot, 32, rule)
    rotated = cpu_mxfp4_quantize.mxfp4_rotate_fake_quantize(x, rot, 32, "none")
    own = cpu_mxfp4_quantize.mxfp4_fake_quantize(rotated, 32, rule)
    assert torch.equal(fused.isnan(), own.isnan()) and fused[5, 32:64].isnan().all()
    assert torch.equal(fused.nan_to_num(), own.nan_to_num())
    unfused = mxfp4_fake_quantize(pad_and_rotate(x, 576, rot), 32, rule)
    differ = (fused.nan_to_num() != unfused.nan_to_num()).reshape(64, 18, 32).any(-1)
    assert int(differ.sum()) <= 0.01 * differ.numel()


def test_fused_errors_and_opcheck():
    x, rot = torch.randn(4, 64), rotation_block("hadamard", 32, 0, "cpu")
    op = cpu_mxfp4_quantize.mxfp4_rotate_fake_quantize
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        op(x.bfloat16(), rot, 32, "floor")
    with pytest.raises(RuntimeError, match="square float32 CPU matrix"):
        op(x, rot.double(), 32, "floor")
    with pytest.raises(RuntimeError, match="square float32 CPU matrix"):
        op(x, rot[:16], 32, "floor")
    with pytest.raises(RuntimeError, match="multiple of 16 up to 256"):
        op(torch.randn(4, 40), torch.eye(8), 32, "floor")
    with pytest.raises(RuntimeError, match="not a multiple of the rotation block 32"):
        op(torch.randn(4, 48), rot, 32, "none")
    with pytest.raises(RuntimeError, match="not a multiple of 64"):
        op(torch.randn(4, 96), rot, 64, "floor")
    with pytest.raises(RuntimeError, match=r"or mse \(or none\)"):
        op(x, rot, 32, "fp_quant")
    with pytest.raises(RuntimeError, match="floor, even, rceil or mse, got none"):  # the plain quantizer has no "none"
        cpu_mxfp4_quantize.mxfp4_fake_quantize(x, 32, "none")
    torch.library.opcheck(torch.ops.torchao_mx_ext.mxfp4_rotate_fake_quantize.default, (x, rot, 32, "mse"))
    torch.library.opcheck(torch.ops.torchao_mx_ext.mxfp4_rotate_fake_quantize.default, (x, rot, 32, "none"))
    strided = torch.randn(64, 4).t()
    assert torch.equal(op(strided, rot, 32, "none"), op(strided.contiguous(), rot, 32, "none"))


def test_fused_fallback_without_the_library(monkeypatch):
    """Without the C++ library the operator is torch's rotation matmul, then the reference quantizer."""
    from torchao_mx_ext.kernels import cpu_extension

    monkeypatch.setattr(cpu_extension, "is_available", lambda: False)
    x, rot = torch.randn(4, 64), rotation_block("hadamard", 32, 0, "cpu")
    fallback = cpu_mxfp4_quantize._fallback_mxfp4_rotate_fake_quantize
    assert torch.equal(fallback(x, rot, 32, "even"), mxfp4_fake_quantize(pad_and_rotate(x, 64, rot), 32, "even"))
    assert torch.equal(fallback(x, rot, 32, "none"), pad_and_rotate(x, 64, rot))


def test_rotate_and_quantize_routes(monkeypatch):
    """The fused call where it applies; the rotation matmul + quantizer for the ``emulated`` preference,
    global (too wide) rotations, and CPUs without a SIMD path; padding first either way."""
    monkeypatch.setattr(cpu_mxfp4_quantize, "VECTORIZED", True)
    calls = []
    real = cpu_mxfp4_quantize.mxfp4_rotate_fake_quantize
    monkeypatch.setattr(cpu_mxfp4_quantize, "mxfp4_rotate_fake_quantize", lambda *a: calls.append(a[3]) or real(*a))
    x, rot = torch.randn(3, 100), rotation_block("hadamard", 32, 0, "cpu")
    fused = cpu_mxfp4_quantize.rotate_and_quantize(x, 128, rot, 32, "mse")
    assert calls == ["mse"] and fused.shape == (3, 128)
    assert torch.equal(fused, real(torch.nn.functional.pad(x, (0, 28)), rot, 32, "mse"))
    assert torch.equal(cpu_mxfp4_quantize.rotate_and_quantize(x.bfloat16(), 128, rot, 32, None),
                       real(torch.nn.functional.pad(x.bfloat16().float(), (0, 28)), rot, 32, "none"))  # weight-only
    assert calls == ["mse", "none"]
    emulated = cpu_mxfp4_quantize.rotate_and_quantize(x, 128, rot, 32, "mse", "emulated")
    assert torch.equal(emulated, mxfp4_fake_quantize(pad_and_rotate(x, 128, rot), 32, "mse"))
    wide = rotation_block("hadamard", 512, 0, "cpu")  # a global rotation: the library matmul
    xw = torch.randn(2, 512)
    assert torch.equal(cpu_mxfp4_quantize.rotate_and_quantize(xw, 512, wide, 32, "floor"),
                       cpu_mxfp4_quantize.fake_quantize(pad_and_rotate(xw, 512, wide), 32, "floor"))
    assert torch.equal(cpu_mxfp4_quantize.rotate_and_quantize(xw, 512, None, 32, None), xw)  # nothing to do
    assert calls == ["mse", "none"]
    monkeypatch.setattr(cpu_mxfp4_quantize, "VECTORIZED", False)
    assert not cpu_mxfp4_quantize.rotation_applies(x, rot, 32, "mse")
    cpu_mxfp4_quantize.rotate_and_quantize(torch.randn(3, 128), 128, rot, 32, "mse")
    assert calls == ["mse", "none"]
