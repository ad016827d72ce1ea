"""The CPU MXFP4 decode (torchao_mx_ext/kernels/cpu_mxfp4_dequantize.py): every code under every scale
byte against a float64 reference written here, on both code paths; its errors, opcheck and fallback;
and the linear route it opens (decode + library GEMM for many rows), eager and compiled.
"""

import re

import pytest
import torch
from kernel_paths import kernel_path_fixtures
from torchao.quantization import quantize_

from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config
from torchao_mx_ext.kernels import cpu_mxfp4_dequantize, cpu_mxfp4_gemv, cpu_mxfp4_mm

# E2M1 code -> value, OCP MX v1.0 section 5.3.3: sign bit 3, magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}

kernel, isa = kernel_path_fixtures(cpu_mxfp4_dequantize.set_isa, ISA_NAMES)


def reference(qdata, scale, block_size, dtype):
    """float64 value (the literal table times 2^(byte - 127), NaN for 255), rounded to float32 and then
    to dtype: the MX definition, in the roundings a float32 decode makes."""
    codes = torch.stack((qdata & 15, qdata >> 4), dim=-1).reshape(*qdata.shape[:-1], -1).long()
    values = torch.tensor(E2M1, dtype=torch.float64)[codes]
    block = torch.where(scale == 255, float("nan"), 2.0 ** (scale.to(torch.float64) - 127))
    return (values * block.repeat_interleave(block_size, dim=-1)).to(torch.float32).to(dtype)


def assert_same_bits(y, ref):
    """Equal bit for bit, NaN payloads aside (NaN where the reference is NaN)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    nan = ref.isnan()
    assert torch.equal(y.isnan(), nan)
    as_int = torch.int32 if y.dtype == torch.float32 else torch.int16
    assert torch.equal(y.view(as_int)[~nan], ref.view(as_int)[~nan])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [32, 64])
def test_every_code_under_every_scale_byte(isa, dtype, block_size):
    """Rows of all 256 byte values (every code pair) under each scale byte 0..255: the vectorised
    blocks (bytes 2..252), the ones it leaves to the scalar path (subnormal, overflow, NaN), and
    -0.0 staying -0.0."""
    qdata = torch.arange(256, dtype=torch.uint8).repeat(256, 1)  # row r: every byte; K = 512
    scale = torch.arange(256, dtype=torch.uint8).unsqueeze(1).repeat(1, 512 // block_size)  # row r: scale byte r
    y = cpu_mxfp4_dequantize.mxfp4_dequantize(qdata, scale, block_size, dtype)
    assert_same_bits(y, reference(qdata, scale, block_size, dtype))
    negative_zero = y[200, 2 * 0x80 + 1]  # byte 0x80's high nibble is code 8
    assert negative_zero == 0 and bool(negative_zero.view(torch.int32 if dtype == torch.float32 else torch.int16) < 0)


def test_random_shapes_and_ranks(isa):
    gen = torch.Generator().manual_seed(0)
    for shape, block_size in [((3, 16), 32), ((2, 5, 48), 32), ((7, 64), 64), ((16,), 32)]:
        qdata = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        scale = torch.randint(0, 256, (*shape[:-1], shape[-1] * 2 // block_size), dtype=torch.uint8, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            assert_same_bits(cpu_mxfp4_dequantize.mxfp4_dequantize(qdata, scale, block_size, dtype), reference(qdata, scale, block_size, dtype))
    empty = cpu_mxfp4_dequantize.mxfp4_dequantize(torch.empty(0, 16, dtype=torch.uint8), torch.empty(0, 1, dtype=torch.uint8), 32, torch.float32)
    assert empty.shape == (0, 32)


def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(1)
    qdata = torch.randint(0, 256, (16, 8), dtype=torch.uint8, generator=gen).t()  # [8, 16], strided
    scale = torch.randint(100, 150, (8, 1), dtype=torch.uint8, generator=gen)
    assert_same_bits(cpu_mxfp4_dequantize.mxfp4_dequantize(qdata, scale, 32, torch.bfloat16), reference(qdata, scale, 32, torch.bfloat16))


def test_errors():
    q, s = torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="must be uint8"):
        cpu_mxfp4_dequantize.mxfp4_dequantize(q.to(torch.int8), s, 32, torch.float32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_mxfp4_dequantize.mxfp4_dequantize(q, s, 16, torch.float32)
    with pytest.raises(RuntimeError, match="does not match codes"):
        cpu_mxfp4_dequantize.mxfp4_dequantize(q, torch.zeros(2, 2, dtype=torch.uint8), 32, torch.float32)
    with pytest.raises(RuntimeError, match="does not match codes"):
        cpu_mxfp4_dequantize.mxfp4_dequantize(q, torch.zeros(3, 1, dtype=torch.uint8), 32, torch.float32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_mxfp4_dequantize.mxfp4_dequantize(q, s, 32, torch.float16)


def test_opcheck_and_fallback():
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 256, (4, 32), dtype=torch.uint8, generator=gen)
    s = torch.randint(110, 140, (4, 2), dtype=torch.uint8, generator=gen)
    torch.library.opcheck(torch.ops.torchao_mx_ext.mxfp4_dequantize.default, (q, s, 32, torch.bfloat16))
    kernel = cpu_mxfp4_dequantize.mxfp4_dequantize(q, s, 32, torch.bfloat16)
    assert_same_bits(cpu_mxfp4_dequantize.reference_mxfp4_dequantize(q, s, 32, "floor", torch.bfloat16), kernel)


def test_applies():
    q = torch.zeros(2, 16, dtype=torch.uint8)
    assert cpu_mxfp4_dequantize.applies(q, 32, "mse", torch.bfloat16)
    assert not cpu_mxfp4_dequantize.applies(q, 32, "fp_quant", torch.float32)  # its 4/3 factor is not exact
    assert not cpu_mxfp4_dequantize.applies(q, 32, "floor", torch.float16)
    assert not cpu_mxfp4_dequantize.applies(q.to("meta"), 32, "floor", torch.float32)


# -- the linear route: decode + library GEMM for many rows where the decode is vectorised -------------


@pytest.fixture
def dense_route(monkeypatch):
    """The route as on AVX-512 CPUs without the GEMV's panels (AMX; the scalar decode gives the same
    bits elsewhere); the compile caches are off because the route is chosen after their keys are taken."""
    monkeypatch.setattr(cpu_mxfp4_dequantize, "VECTORIZED", True)
    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", True)
    monkeypatch.setattr(cpu_mxfp4_gemv, "PANELS", False)
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        yield


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("config", [MXFP4BlockRotConfig(), MXFP4Config(act_quant=False), MXFP4BlockRotConfig(scale_rule="even")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_take_the_dense_route_with_the_emulations_numbers(dense_route, monkeypatch, config, dtype):
    """Same decoded weight, same GEMM call as the ``emulated`` preference: bit-equal outputs."""
    lin = torch.nn.Linear(96, 40).to(dtype)
    ref_lin = torch.nn.Linear(96, 40).to(dtype)
    ref_lin.load_state_dict(lin.state_dict())
    quantize_(lin, config)
    quantize_(ref_lin, type(config)(**{**config.__dict__, "kernel_preference": "emulated"}))
    decodes = _spy(monkeypatch, cpu_mxfp4_dequantize, "mxfp4_dequantize")
    int_calls = _spy(monkeypatch, cpu_mxfp4_mm, "mxfp4_mm")
    gemv_calls = _spy(monkeypatch, cpu_mxfp4_gemv, "mxfp4_gemv")
    rows = cpu_mxfp4_dequantize.FUSED_ROWS
    with torch.no_grad():
        x = torch.randn(rows + 1, 96).to(dtype)
        assert torch.equal(lin(x), ref_lin(x))
        assert len(decodes) == 1 and not int_calls and not gemv_calls
        lin(torch.randn(rows, 96).to(dtype))  # few rows: a fused kernel
        assert len(decodes) == 1 and len(int_calls) + len(gemv_calls) == 1


def test_compiled_dense_route_calls_the_op_and_matches_eager(dense_route):
    from torch._inductor.utils import run_and_get_code

    model = torch.nn.Sequential(torch.nn.Linear(100, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    quantize_(model, MXFP4BlockRotConfig())
    x = torch.randn(12, 100).bfloat16()
    torch._dynamo.reset()
    # emulate_precision_casts, as tme.compile_model sets it: where the GEMM runs in float32 (CPUs
    # without bf16 GEMMs), Inductor would otherwise drop the bf16 rounding between the two layers
    with torch.no_grad(), torch._inductor.config.patch(emulate_precision_casts=True):
        eager = model(x)
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    source = "\n".join(code)
    assert len(re.findall(r"torch\.ops\.torchao_mx_ext\.mxfp4_dequantize\.default\(", source)) == 2
    assert "mxfp4_mm" not in source
