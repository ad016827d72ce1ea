"""The CPU activation quantizer (torchao_mx_ext/kernels/cpu_mxfp4_quantize.py) against a float64
reference written here (the OCP MX definition with each scale rule), on both code paths; bit for bit
against the pure-torch quantizer for floor / even / rceil; its errors, opcheck, fallback, and the
linears that use it, eager and compiled.
"""

import math
import re

import pytest
import torch
from kernel_paths import kernel_path_fixtures
from torchao.quantization import quantize_

from torchao_mx_ext import MXFP4BlockRotConfig
from torchao_mx_ext.kernels import cpu_mxfp4_dequantize, cpu_mxfp4_quantize
from torchao_mx_ext.mx import mxfp4_fake_quantize

ISA_NAMES = {0: "scalar", 2: "avx512"}
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
    monkeypatch.setattr(cpu_mxfp4_dequantize, "VECTORIZED", True)
    x = torch.randn(4, 64)
    assert cpu_mxfp4_quantize.applies(x, 32, "mse")
    assert not cpu_mxfp4_quantize.applies(x, 32, "fp_quant")
    assert not cpu_mxfp4_quantize.applies(x.bfloat16(), 32, "mse")
    assert not cpu_mxfp4_quantize.applies(x.requires_grad_(), 32, "mse")  # no backward
    x = x.detach()
    assert torch.equal(cpu_mxfp4_quantize.fake_quantize(x, 32, "rceil", "emulated"), mxfp4_fake_quantize(x, 32, "rceil"))
    monkeypatch.setattr(cpu_mxfp4_dequantize, "VECTORIZED", False)
    assert not cpu_mxfp4_quantize.applies(x, 32, "mse")  # Inductor's kernel stays where it was measured faster
    assert torch.equal(cpu_mxfp4_quantize._fallback_mxfp4_fake_quantize(x, 32, "even"), mxfp4_fake_quantize(x, 32, "even"))


def test_linears_use_it_eager_and_compiled(monkeypatch):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(cpu_mxfp4_dequantize, "VECTORIZED", True)
    calls = []
    real = cpu_mxfp4_quantize.mxfp4_fake_quantize
    monkeypatch.setattr(cpu_mxfp4_quantize, "mxfp4_fake_quantize", lambda *a: calls.append(a[0].shape) or real(*a))
    model = torch.nn.Sequential(torch.nn.Linear(100, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    quantize_(model, MXFP4BlockRotConfig(scale_rule="even"))
    x = torch.randn(12, 100).bfloat16()
    with torch.no_grad():
        eager = model(x)
        assert len(calls) == 2
        with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
            torch._dynamo.reset()
            compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    assert len(re.findall(r"torch\.ops\.torchao_mx_ext\.mxfp4_fake_quantize\.default\(", "\n".join(code))) == 2
