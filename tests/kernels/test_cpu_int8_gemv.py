"""The CPU int8 weight-only GEMV (the int8 output head's product): against a float64 reference written
here, on every code path, under torch.compile, and torch.library.opcheck."""

import re

import pytest
import torch

from torchao_mx_ext.inference import Int8WeightOnlyLinear
from torchao_mx_ext.kernels import cpu_extension, cpu_int8_gemv

from kernel_paths import kernel_path_fixtures

kernel, isa = kernel_path_fixtures(cpu_int8_gemv.set_isa, {0: "scalar", 1: "avx2"})


def reference(x, qweight, scales, bias=None):
    y = (x.to(torch.float64) @ qweight.to(torch.float64).T) * scales.to(torch.float32).to(torch.float64)
    magnitude = (x.to(torch.float64).abs() @ qweight.to(torch.float64).abs().T) * scales.to(torch.float32).abs().to(torch.float64)
    return (y if bias is None else y + bias.to(torch.float64)), magnitude


def check(y, ref, magnitude, out_dtype, k):
    """Exact products, float32 sums in any order (k roundings), one scale product, one bias addition,
    one rounding to out_dtype."""
    bound = (k + 3) * torch.finfo(torch.float32).eps * magnitude + torch.finfo(out_dtype).eps * ref.abs() + 1e-30
    err = (y.to(torch.float64) - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()].item():.3g}"


def test_kernel_matches_float64_reference(isa):
    gen = torch.Generator().manual_seed(0)
    # K with a tail below 8, a multiple of 8; N with a tail below 4 rows; 1..5 rows of x.
    for k, n in [(61, 7), (576, 33), (8, 4)]:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        s = torch.rand(n, generator=gen) / 100
        bias = torch.randn(n, generator=gen)
        for m in (1, 2, 3, 4, 5):
            x32 = torch.randn(m, k, generator=gen)
            for x, scales, out_dtype in [(x32, s, None), (x32.bfloat16(), s.bfloat16(), None), (x32.half(), s, torch.float32)]:
                for b in (None, bias):
                    y = cpu_int8_gemv.int8_gemv(x, q, scales, b, out_dtype)
                    assert y.shape == (m, n) and y.dtype == (out_dtype or x.dtype)
                    ref, magnitude = reference(x, q, scales, b)
                    check(y, ref, magnitude, y.dtype, k)


def test_kernel_paths_agree_and_extreme_codes(isa):
    """Codes -128 and 127, zeros, and a NaN input row (its outputs are NaN, the other row's not)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, (9, 40), dtype=torch.int8, generator=gen)
    q[0] = -128
    q[1] = 127
    q[2] = 0
    x = torch.randn(2, 40, generator=gen)
    x[1, 5] = float("nan")
    s = torch.rand(9, generator=gen)
    y = cpu_int8_gemv.int8_gemv(x, q, s)
    ref, magnitude = reference(x[:1], q, s)
    check(y[:1], ref, magnitude, torch.float32, 40)
    assert bool(y[1].isnan().all())


def test_shapes_and_errors():
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (6, 32), dtype=torch.int8, generator=gen)
    s = torch.rand(6, generator=gen)
    x = torch.randn(2, 3, 32, generator=gen)
    y = cpu_int8_gemv.int8_gemv(x, q, s)
    assert y.shape == (2, 3, 6)
    torch.testing.assert_close(y, cpu_int8_gemv.int8_gemv(x.reshape(6, 32), q, s).reshape(2, 3, 6))
    assert cpu_int8_gemv.int8_gemv(torch.randn(0, 32), q, s).shape == (0, 6)
    xt = torch.randn(32, 2, generator=gen).T  # non-contiguous
    torch.testing.assert_close(cpu_int8_gemv.int8_gemv(xt, q, s), cpu_int8_gemv.int8_gemv(xt.contiguous(), q, s))
    with pytest.raises(RuntimeError, match="features"):
        cpu_int8_gemv.int8_gemv(torch.randn(1, 16), q, s)
    with pytest.raises(RuntimeError, match="int8"):
        cpu_int8_gemv.int8_gemv(x, q.to(torch.uint8), s)
    with pytest.raises(RuntimeError, match="scales"):
        cpu_int8_gemv.int8_gemv(x, q, torch.rand(5))


def test_pure_torch_fallback_matches_kernel():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (24, 160), dtype=torch.int8, generator=gen)
    s = torch.rand(24, generator=gen)
    bias = torch.randn(24, generator=gen)
    for x in (torch.randn(3, 160, generator=gen), torch.randn(1, 160, generator=gen).bfloat16()):
        kernel_out = cpu_int8_gemv.int8_gemv(x, q, s, bias, torch.float32)
        fallback = cpu_int8_gemv.reference_int8_gemv(x, q, s, bias, torch.float32)
        torch.testing.assert_close(kernel_out, fallback, atol=1e-5 * fallback.abs().max().item(), rtol=0)


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-127, 128, (8, 96), dtype=torch.int8, generator=gen)
    op = torch.ops.torchao_mx_ext.int8_gemv.default
    for args in [
        (torch.randn(1, 96, generator=gen), q, torch.rand(8, generator=gen), None, None),
        (torch.randn(3, 96, generator=gen).bfloat16(), q, torch.rand(8, generator=gen).bfloat16(), torch.randn(8, generator=gen), torch.float32),
    ]:
        torch.library.opcheck(op, args)


def test_int8_head_uses_the_kernel_where_it_is_vectorised(monkeypatch):
    """Int8WeightOnlyLinear calls the kernel on AVX2 and AVX-512 CPUs (eager and compiled, the same
    numbers), ATen's _weight_int8pack_mm elsewhere."""
    from torch._inductor.utils import run_and_get_code

    head = Int8WeightOnlyLinear.from_linear(torch.nn.Linear(64, 40, bias=False).to(torch.bfloat16))
    x = torch.randn(1, 64).bfloat16()
    monkeypatch.setattr(cpu_extension, "VECTORIZED", True)
    assert cpu_int8_gemv.applies(x, head.qweight)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = head(x)
        compiled, code = run_and_get_code(torch.compile(head, fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    assert len(re.findall(r"torch\.ops\.torchao_mx_ext\.int8_gemv\.default\(", "\n".join(code))) == 1
    ref, magnitude = reference(x, head.qweight, head.scales)
    check(eager, ref, magnitude, torch.bfloat16, 64)
    monkeypatch.setattr(cpu_extension, "VECTORIZED", False)
    assert not cpu_int8_gemv.applies(x, head.qweight)
    torch.testing.assert_close(head(x).float(), eager.float(), rtol=2**-7, atol=1e-3)
