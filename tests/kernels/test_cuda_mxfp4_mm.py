"""The Blackwell MXFP4 GEMM path: off unless opted in on capable hardware; where such a GPU exists, equal
to the emulation up to accumulation order and bfloat16 output rounding.

On a CPU the tests check what the hardware path is built from, against references written from the
specs (float64 math, not the package's own code): the packed codes and E8M0 scales it hands to
``F.scaled_mm`` decode, by the OCP E2M1/E8M0 bit layouts, to the float64 reference quantization; the
scale swizzle is cuBLAS's documented 128 x 4 tile layout; and ``mxfp4_scaled_mm`` itself, with
``F.scaled_mm`` replaced by a float64 model of cuBLAS's block-scaled GEMM, computes ``Q_a(x R) Q(W R)^T + b``.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import quantize_

from reference import ref_hadamard, ref_quantize
from torchao_mx_ext import MXFP4BlockRotConfig
from torchao_mx_ext.kernels import cuda_mxfp4_mm

ON_BLACKWELL = torch.cuda.is_available() and cuda_mxfp4_mm.hardware_available(torch.device("cuda"))


# -- references from the specs -------------------------------------------------------------------

def spec_e2m1(nibble: int) -> float:
    """OCP MX v1.0 E2M1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 is subnormal."""
    sign = -1.0 if nibble & 0b1000 else 1.0
    exp, man = (nibble >> 1) & 0b11, nibble & 1
    return sign * (0.5 * man if exp == 0 else 2.0 ** (exp - 1) * (1.0 + 0.5 * man))


SPEC_E2M1 = torch.tensor([spec_e2m1(n) for n in range(16)], dtype=torch.float64)


def decode_fp4_bytes(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bytes of ``float4_e2m1fn_x2`` (element 2i in the low nibble) -> float64 ``[..., 2n]``."""
    b = packed.to(torch.int64)
    return torch.stack((SPEC_E2M1[b & 0xF], SPEC_E2M1[b >> 4]), -1).reshape(*packed.shape[:-1], -1)


def cublas_swizzle_offset(row: int, col: int, n_col_tiles: int) -> int:
    """Offset of scale ``[row, col]`` in cuBLAS's block-scaling-factor layout (cuBLAS docs, "1D block
    scaling factors layout"): 128 x 4 tiles stored row-tile-major, 512 bytes each; inside a tile,
    row ``r`` and column ``c`` sit at ``(r % 32) * 16 + (r // 32) * 4 + c``."""
    r, c = row % 128, col % 4
    tile = (row // 128) * n_col_tiles + col // 4
    return tile * 512 + (r % 32) * 16 + (r // 32) * 4 + c


def ref_swizzle(scale: torch.Tensor) -> torch.Tensor:
    rows, cols = scale.shape
    n_row_tiles, n_col_tiles = -(-rows // 128), -(-cols // 4)
    out = torch.zeros(n_row_tiles * n_col_tiles * 512, dtype=scale.dtype)
    for i in range(rows):
        for j in range(cols):
            out[cublas_swizzle_offset(i, j, n_col_tiles)] = scale[i, j]
    return out


def ref_unswizzle(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    n_col_tiles = -(-cols // 4)
    idx = torch.tensor([[cublas_swizzle_offset(i, j, n_col_tiles) for j in range(cols)] for i in range(rows)])
    return flat[idx]


def ref_linear(x_rot: torch.Tensor, w_rot: torch.Tensor, w_rule: str, a_rule, bias=None) -> torch.Tensor:
    """float64 ``Q_a(x R) Q(W R)^T + b`` from the rotated operands (``a_rule=None``: weight-only)."""
    w_q = ref_quantize(w_rot, w_rule)[2]
    a = x_rot.double() if a_rule is None else ref_quantize(x_rot, a_rule)[2]
    y = a @ w_q.T
    return y if bias is None else y + bias.double()


def rotated_weight_reference(weight: torch.Tensor, rotation_block: torch.Tensor) -> torch.Tensor:
    """``fl32(W R)``: the stored weight's domain, with ``R`` block-diagonal, computed in float64."""
    blocks = weight.shape[-1] // rotation_block.shape[0]
    r = torch.block_diag(*[rotation_block.double()] * blocks)
    return (weight.double() @ r).float()


# -- the decision ----------------------------------------------------------------------------------

def test_cpu_never_takes_the_hardware_path_and_cpu_results_are_the_emulation(monkeypatch):
    monkeypatch.setenv(cuda_mxfp4_mm.ENV_FLAG, "1")
    lin = torch.nn.Linear(64, 32)
    w_fp = lin.weight.detach().clone()
    quantize_(lin, MXFP4BlockRotConfig(scale_rule="floor"))
    x = torch.randn(4, 64)
    assert not cuda_mxfp4_mm.hardware_available(torch.device("cpu"))
    assert not cuda_mxfp4_mm.applies(lin.weight, x)

    def no_hardware(*args, **kwargs):
        raise AssertionError("a CPU linear reached the hardware MXFP4 GEMM")

    monkeypatch.setattr(cuda_mxfp4_mm, "mxfp4_scaled_mm", no_hardware)
    with torch.no_grad():
        y = lin(x)
    # the emulated W4A4 product, against the float64 reference: 32-wide Hadamard blocks, floor scales
    w = lin.weight
    torch.testing.assert_close(w.rotation.double(), ref_hadamard(32), rtol=0, atol=1e-7)
    expected = ref_linear(w.rotate_input(x), rotated_weight_reference(w_fp, w.rotation), "floor", "floor", lin.bias)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_hardware_available_needs_cuda_compute_capability_10(monkeypatch):
    assert not cuda_mxfp4_mm.hardware_available(torch.device("cpu"))
    assert not cuda_mxfp4_mm.hardware_available("cpu")
    if not torch.cuda.is_available():
        assert not cuda_mxfp4_mm.hardware_available(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((8, 0), False), ((9, 0), False), ((10, 0), True), ((12, 1), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert cuda_mxfp4_mm.hardware_available(torch.device("cuda")) is expected, capability
    assert not cuda_mxfp4_mm.hardware_available(torch.device("cpu"))  # never for a CPU device


def test_applies_needs_every_structural_condition(monkeypatch):
    """W4A4, 32-element blocks, a 2-D weight, a CUDA input and capable hardware are each needed (with
    the opt-in flag set, so whichever layer reads it, only the condition under test changes)."""
    monkeypatch.setenv(cuda_mxfp4_mm.ENV_FLAG, "1")
    monkeypatch.setattr(cuda_mxfp4_mm, "hardware_available", lambda device: torch.device(device).type == "cuda")
    on_gpu = SimpleNamespace(device=torch.device("cuda"))
    on_cpu = SimpleNamespace(device=torch.device("cpu"))
    good = SimpleNamespace(act_scale_rule="floor", block_size=32, qdata=torch.zeros(4, 16, dtype=torch.uint8),
                           kernel_preference="hw_mxfp4")
    assert cuda_mxfp4_mm.applies(good, on_gpu)
    assert not cuda_mxfp4_mm.applies(good, on_cpu)
    for change in (dict(act_scale_rule=None), dict(block_size=16), dict(qdata=torch.zeros(2, 4, 16, dtype=torch.uint8))):
        assert not cuda_mxfp4_mm.applies(SimpleNamespace(**{**vars(good), **change}), on_gpu), change
    monkeypatch.setattr(cuda_mxfp4_mm, "hardware_available", lambda device: False)
    assert not cuda_mxfp4_mm.applies(good, on_gpu)  # a CUDA GPU without MXFP4 tensor cores (Hopper)


# -- the operands ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["floor", "even", "rceil", "fp_quant", "mse"])
def test_weight_and_activation_operands_decode_to_the_reference(rule):
    """Codes read as ``float4_e2m1fn_x2`` bytes (low nibble first, OCP E2M1 bits) and scales read as E8M0
    (``2^(byte - 127)``) give the float64 reference's elements and exponents, for both GEMM operands."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=False)
    w_fp = lin.weight.detach().clone()
    quantize_(lin, MXFP4BlockRotConfig(scale_rule=rule, act_scale_rule=rule))
    w = lin.weight
    x = torch.randn(7, 96) * torch.logspace(-2, 2, 96)  # blocks of very different ranges
    act = w.quantize_input(x)
    for codes, scale, source in (
        (w.qdata, w.scale, rotated_weight_reference(w_fp, w.rotation)),  # Q(W R)
        (act.qdata, act.scale, w.rotate_input(x)),  # Q_a(x R)
    ):
        q_ref, e_ref, deq_ref = ref_quantize(source, rule)
        assert codes.dtype == torch.uint8 and codes.shape == (source.shape[0], 48)
        assert scale.dtype == torch.uint8 and scale.shape == (source.shape[0], 3)
        assert codes.view(torch.float4_e2m1fn_x2).shape == codes.shape  # one byte holds two elements
        assert torch.equal(decode_fp4_bytes(codes), q_ref)
        assert torch.equal(scale.to(torch.int64) - 127, e_ref)
        mult = 4.0 / 3.0 if rule == "fp_quant" else 1.0  # the GEMM's alpha, per operand
        assert cuda_mxfp4_mm.element_multiplier(rule) == mult
        deq = decode_fp4_bytes(codes).reshape(-1, 3, 32) * torch.exp2(scale.double() - 127).unsqueeze(-1) * mult
        assert torch.equal(deq.reshape(deq_ref.shape), deq_ref)


@pytest.mark.parametrize("shape", [(1, 1), (128, 4), (130, 5), (300, 16)])
def test_scale_swizzle_is_cublas_tile_layout(shape):
    from torchao.prototype.mx_formats.utils import to_blocked

    scale = torch.randint(0, 255, shape, dtype=torch.uint8)
    blocked = to_blocked(scale.view(torch.float8_e8m0fnu))
    assert blocked.dtype == torch.float8_e8m0fnu
    expected = ref_swizzle(scale)
    assert torch.equal(blocked.view(torch.uint8), expected)
    assert torch.equal(ref_unswizzle(expected, *shape), scale)


def fake_cublas_scaled_mm(calls):
    """A float64 model of ``F.scaled_mm`` with FP4 operands and swizzled 1x32 E8M0 block scales:
    ``a [M, K/2]`` row-major, ``b [K/2, N]`` column-major (cuBLAS's TN layout), output in ``output_dtype``."""

    def scaled_mm(mat_a, mat_b, scale_a, scale_recipe_a, scale_b, scale_recipe_b, swizzle_a=None, swizzle_b=None,
                  bias=None, output_dtype=torch.bfloat16, **kwargs):
        assert mat_a.dtype == mat_b.dtype == torch.float4_e2m1fn_x2
        assert scale_a.dtype == scale_b.dtype == torch.float8_e8m0fnu
        assert scale_recipe_a == scale_recipe_b == F.ScalingType.BlockWise1x32
        assert swizzle_a == swizzle_b == F.SwizzleType.SWIZZLE_32_4_4
        m, half_k = mat_a.shape
        half_k_b, n = mat_b.shape
        assert half_k == half_k_b and mat_a.stride() == (half_k, 1) and mat_b.stride() == (1, half_k)
        k = 2 * half_k
        for scale, rows in ((scale_a, m), (scale_b, n)):  # padded to whole 128 x 4 tiles, flat
            assert scale.shape == (-(-rows // 128) * 128 * -(-k // 32 // 4) * 4,)
        a = decode_fp4_bytes(mat_a.view(torch.uint8))
        b = decode_fp4_bytes(mat_b.t().view(torch.uint8))  # [N, K]
        sa = ref_unswizzle(scale_a.view(torch.uint8), m, k // 32).double() - 127
        sb = ref_unswizzle(scale_b.view(torch.uint8), n, k // 32).double() - 127
        a = a * torch.exp2(sa).repeat_interleave(32, -1)
        b = b * torch.exp2(sb).repeat_interleave(32, -1)
        y = a @ b.T
        if bias is not None:
            y = y + bias.double()
        calls.append((m, n, k, output_dtype))
        return y.to(output_dtype)

    return scaled_mm


@pytest.mark.parametrize(
    "w_rule,a_rule,bias,out_dtype",
    [("floor", "floor", True, torch.float32), ("fp_quant", "fp_quant", False, torch.float32),
     ("mse", "rceil", True, torch.bfloat16), ("even", "floor", False, torch.bfloat16)],
)
def test_hardware_gemm_operands_and_epilogue_on_cpu(monkeypatch, w_rule, a_rule, bias, out_dtype):
    """``mxfp4_scaled_mm`` on a quantized linear's operands (codes + scales of ``Q(W R)`` and of
    ``Q_a(x R)``), with ``F.scaled_mm`` modelled in float64: its views, transposes, swizzles, 4/3 alphas,
    bias and output dtype give ``Q_a(x R) Q(W R)^T + b``, and agree with the CPU emulation."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 136, bias=bias)
    w_fp = lin.weight.detach().clone()
    quantize_(lin, MXFP4BlockRotConfig(scale_rule=w_rule, act_scale_rule=a_rule))
    w = lin.weight
    x = torch.randn(130, 256)  # not a multiple of the 128-row scale tiles
    with torch.no_grad():
        emulated = lin(x)
    calls = []
    monkeypatch.setattr(F, "scaled_mm", fake_cublas_scaled_mm(calls))
    act = w.quantize_input(x)
    b = None if lin.bias is None else lin.bias.detach()
    with torch.no_grad():
        hardware = cuda_mxfp4_mm.mxfp4_scaled_mm(act.qdata, act.scale, a_rule, w.qdata, w.scale, w_rule, b, out_dtype)
    assert calls == [(130, 136, 256, torch.bfloat16)]  # one GEMM, bfloat16 output as in torchao's MX path
    assert hardware.shape == (130, 136) and hardware.dtype == out_dtype
    expected = ref_linear(w.rotate_input(x), rotated_weight_reference(w_fp, w.rotation), w_rule, a_rule, b)
    scale = expected.abs().max().item()
    # the GEMM output is rounded to bfloat16 (8 significant bits), then alpha and bias in float32
    torch.testing.assert_close(hardware.double(), expected, rtol=2**-7, atol=2**-7 * scale)
    torch.testing.assert_close(emulated.double(), expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_linear_takes_the_hardware_path_only_where_available(monkeypatch):
    """On any CUDA GPU: the decision follows the hardware, and the result is the float64 reference (the
    emulation on Hopper and older; Blackwell's GEMM up to bfloat16 rounding)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=True)
    w_fp = lin.weight.detach().clone()
    lin = lin.cuda()
    quantize_(lin, MXFP4BlockRotConfig(scale_rule="floor"))
    x = torch.randn(64, 256, device="cuda")
    monkeypatch.setenv(cuda_mxfp4_mm.ENV_FLAG, "1")
    xr = lin.weight.rotate_input(x)
    assert cuda_mxfp4_mm.applies(lin.weight, xr) == cuda_mxfp4_mm.hardware_available(x.device)
    with torch.no_grad():
        y = lin(x).cpu().double()
    w_cpu_rotation = lin.weight.rotation.cpu()
    expected = ref_linear(xr.cpu(), rotated_weight_reference(w_fp, w_cpu_rotation), "floor", "floor", lin.bias.cpu())
    tol = 2**-7 if cuda_mxfp4_mm.applies(lin.weight, xr) else 1e-5
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.skipif(not ON_BLACKWELL, reason="needs a GPU with MXFP4 tensor cores (sm_100+)")
@pytest.mark.parametrize("scale_rule", ["floor", "fp_quant"])
def test_hardware_gemm_matches_emulation(monkeypatch, scale_rule):
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256, bias=True).cuda().to(torch.bfloat16)
    quantize_(lin, MXFP4BlockRotConfig(scale_rule=scale_rule, act_scale_rule=scale_rule))
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv(cuda_mxfp4_mm.ENV_FLAG, "0")
    emulated = lin(x).float()
    monkeypatch.setenv(cuda_mxfp4_mm.ENV_FLAG, "1")
    assert cuda_mxfp4_mm.applies(lin.weight, x)
    hardware = lin(x).float()
    torch.testing.assert_close(hardware, emulated, atol=2e-2 * emulated.abs().max().item(), rtol=2e-2)
