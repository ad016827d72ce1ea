"""The fused CPU MXFP4 GEMV kernel (torchao_mx_ext/kernels): against a float64 reference written here,
against RotatedMXFP4Tensor.linear's dequantize path, under torch.compile, and torch.library.opcheck.

The first test to run builds the C++ extension (20-60 s on 2 busy cores, once: torch's extension
cache, ~/.cache/torch_extensions, makes later runs load it in well under a second). The tests
themselves take about 20 s.
"""

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import quantize_

from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config, RotatedMXFP4Tensor
from torchao_mx_ext.kernels import cpu_extension, cpu_mxfp4_dequantize, cpu_mxfp4_gemv
from torchao_mx_ext.mx import SCALE_RULES
from torchao_mx_ext.mx.quantize import mxfp4_fake_quantize

# E2M1 code -> value, OCP MX v1.0 section 5.3.3: sign bit 3, magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx512_bf16"}


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not cpu_mxfp4_gemv.is_available():
        pytest.fail("the fused CPU MXFP4 GEMV kernel did not build (see the logged warning): it needs g++ and ninja")
    best = cpu_mxfp4_gemv.set_isa(None)
    yield best
    cpu_mxfp4_gemv.set_isa(None)


def use_isa(isa):
    """Force a code path (each narrower one through the test hook); skip those this CPU lacks."""
    best = cpu_mxfp4_gemv.set_isa(None)
    if isa > best:
        pytest.skip(f"this CPU (or ATEN_CPU_CAPABILITY) has no {ISA_NAMES[isa]} path")
    assert cpu_mxfp4_gemv.set_isa(isa) == isa


def reference(x, qdata, scale, block_size, rule, bias=None):
    """float64 x @ W^T (+ bias), W decoded from the codes with the literal table and 2^(byte - 127)."""
    codes = torch.stack((qdata & 15, qdata >> 4), dim=-1).reshape(qdata.shape[0], -1).long()
    values = torch.tensor(E2M1, dtype=torch.float64)[codes]
    exps = scale.to(torch.float64) - 127
    block = torch.where(scale == 255, float("nan"), 2.0**exps) * (4.0 / 3.0 if rule == "fp_quant" else 1.0)
    w = values * block.repeat_interleave(block_size, dim=-1)
    y = x.to(torch.float64) @ w.T
    return (y if bias is None else y + bias.to(torch.float64)), (x.to(torch.float64).abs() @ w.abs().T)


def random_weight(n, k, block_size, gen):
    qdata = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scale = torch.randint(112, 136, (n, k // block_size), dtype=torch.uint8, generator=gen)
    return qdata, scale


def check(y, ref, magnitude, out_dtype, k):
    """float32 sums in any order: |error| <= k * eps32 * sum |x w|; plus one rounding to out_dtype."""
    eps_out = torch.finfo(out_dtype).eps
    bound = (k + 2) * torch.finfo(torch.float32).eps * magnitude + eps_out * ref.abs() + 1e-30
    err = (y.to(torch.float64) - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()].item():.3g}"


@pytest.mark.parametrize("isa", list(ISA_NAMES), ids=ISA_NAMES.get)
@pytest.mark.parametrize("rule", SCALE_RULES)
def test_kernel_matches_float64_reference(isa, rule):
    gen = torch.Generator().manual_seed(1)
    use_isa(isa)
    try:
        # K an odd multiple of 32 (an unpaired last chunk), a larger one, and blocks of 64.
        for k, n, block_size in [(96, 19, 32), (224, 8, 32), (608, 33, 32), (192, 5, 64)]:
            qdata, scale = random_weight(n, k, block_size, gen)
            bias = torch.randn(n, generator=gen)
            for m in (1, 3):
                x32 = torch.randn(m, k, generator=gen)
                for x, out_dtype in [(x32, torch.float32), (x32.bfloat16(), torch.bfloat16), (x32.bfloat16(), torch.float32)]:
                    for b in (None, bias):
                        y = cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, block_size, rule, b, out_dtype)
                        assert y.dtype == out_dtype and y.shape == (m, n)
                        ref, magnitude = reference(x, qdata, scale, block_size, rule, b)
                        check(y, ref, magnitude, out_dtype, k)
    finally:
        cpu_mxfp4_gemv.set_isa(None)


@pytest.mark.parametrize("isa", list(ISA_NAMES), ids=ISA_NAMES.get)
def test_kernel_special_scales(isa):
    """E8M0 byte 255 is NaN (its row is NaN); byte 0 is 2^-127, a float32 subnormal."""
    use_isa(isa)
    try:
        gen = torch.Generator().manual_seed(2)
        qdata, scale = random_weight(3, 96, 32, gen)
        scale[0, 1] = 255
        scale[1] = 0
        xs = [torch.randn(rows, 96, generator=gen) for rows in (1, 2)]  # one row: the decode path
        for x in (*xs, *(x.bfloat16() for x in xs)):
            y = cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, 32, "floor", out_dtype=torch.float32)
            ref, magnitude = reference(x, qdata, scale, 32, "floor")
            assert bool(y[:, 0].isnan().all()) and not bool(y[:, 1:].isnan().any())
            assert bool((y[:, 1] != 0).all())
            torch.testing.assert_close(y[:, 1].double(), ref[:, 1], rtol=1e-4, atol=2.0**-149 * 96)
            check(y[:, 2], ref[:, 2], magnitude[:, 2], torch.float32, 96)
    finally:
        cpu_mxfp4_gemv.set_isa(None)


# -- the integer path (AVX2; AVX-512 VNNI where the CPU has it): MX fake-quantized inputs ----------

# The levels with an integer path: AVX2 (two chunks a step) and AVX-512 (four, with vpdpbusd and vpermb,
# on CPUs with VNNI and VBMI; without them AVX-512 runs the AVX2 code).
INTEGER_ISAS = {1: "avx2", 2: "avx512_vnni"}


def mx_activations(m, k, gen, block_size=32):
    """Rows whose every 32-chunk is E2M1 values on one power-of-two scale (an activation after MX
    fake quantization), spread over 2^-20..2^20 so the chunks' scales differ widely."""
    x = torch.randn(m, k, generator=gen) * 2.0 ** torch.randint(-20, 21, (m, k // 32, 1), generator=gen).repeat_interleave(32, 1).reshape(m, k)
    return mxfp4_fake_quantize(x, block_size, "floor")


@pytest.mark.parametrize("isa", list(INTEGER_ISAS), ids=INTEGER_ISAS.get)
@pytest.mark.parametrize("rule", ["floor", "even", "mse"])
def test_integer_path_matches_float64_reference(isa, rule):
    """Exact products and exact chunk sums: only the float32 sum over chunks rounds, so the error bound
    is that of K/32 terms, not K. Widths of 3, 6, 7, 18 and 19 chunks: last groups of every fill."""
    gen = torch.Generator().manual_seed(11)
    use_isa(isa)
    try:
        for k, n, block_size in [(96, 19, 32), (224, 8, 32), (576, 9, 32), (608, 33, 32), (192, 5, 64)]:
            qdata, scale = random_weight(n, k, block_size, gen)
            bias = torch.randn(n, generator=gen)
            for m in (1, 2, 3, 4, 5):
                x32 = mx_activations(m, k, gen, block_size)
                x32[0, :32] = 0.0  # an all-zero chunk
                for x, out_dtype in [(x32, torch.float32), (x32.bfloat16(), torch.float32), (x32.bfloat16(), torch.bfloat16)]:
                    assert torch.equal(x.float(), x32)  # E2M1 values are exact in bf16
                    for b in (None, bias):
                        before = cpu_mxfp4_gemv.integer_calls()
                        y = cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, block_size, rule, b, out_dtype)
                        assert cpu_mxfp4_gemv.integer_calls() == before + 1
                        ref, magnitude = reference(x, qdata, scale, block_size, rule, b)
                        check(y, ref, magnitude, out_dtype, k // 32 + 2)
    finally:
        cpu_mxfp4_gemv.set_isa(None)


@pytest.mark.parametrize("isa", list(INTEGER_ISAS), ids=INTEGER_ISAS.get)
def test_integer_path_only_where_it_is_exact(isa):
    """Inputs that are not integers on one power of two per chunk, fp_quant's 4/3 multiplier and the
    other code paths keep the float path, with the same numbers."""
    gen = torch.Generator().manual_seed(12)
    use_isa(isa)
    try:
        qdata, scale = random_weight(12, 128, 32, gen)
        mx = mx_activations(2, 128, gen)
        nudged = mx.clone()
        nudged[1, 100] += nudged[1, 96:128].abs().max() * 2.0**-5  # one chunk off the E2M1 grid
        wide = mx.clone()
        wide[0, 3] = 2.0**-30 * torch.sign(wide[0, 3] + 0.5)  # 2^-30 beside values near 1: no common scale
        special = mx.clone()
        special[1, 7] = float("inf")
        tiny = mxfp4_fake_quantize(torch.randn(2, 128, generator=gen), 32, "floor") * 2.0**-124  # scales below 2^-126
        for x, rule in [(torch.randn(2, 128, generator=gen), "floor"), (nudged, "floor"), (wide, "floor"),
                        (special, "floor"), (tiny, "floor"), (mx, "fp_quant")]:
            before = cpu_mxfp4_gemv.integer_calls()
            y = cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, 32, rule, out_dtype=torch.float32)
            assert cpu_mxfp4_gemv.integer_calls() == before
            ref, magnitude = reference(x, qdata, scale, 32, rule)
            if x is special:
                assert bool(y[1].isnan().logical_or(y[1].isinf()).all()) and bool(y[0].isfinite().all())
                check(y[0], ref[0], magnitude[0], torch.float32, 128)
            else:
                check(y, ref, magnitude, torch.float32, 128)
        cpu_mxfp4_gemv.set_isa(0)
        before = cpu_mxfp4_gemv.integer_calls()
        cpu_mxfp4_gemv.mxfp4_gemv(mx, qdata, scale, 32, "floor")
        assert cpu_mxfp4_gemv.integer_calls() == before
    finally:
        cpu_mxfp4_gemv.set_isa(None)


@pytest.mark.parametrize("isa", list(INTEGER_ISAS), ids=INTEGER_ISAS.get)
def test_integer_path_special_scales(isa):
    """E8M0 255 (NaN) and 0 (2^-127) on the integer path, as on the float one (AVX-512: rows with such
    bytes take the scale table, the others the exponent bits)."""
    use_isa(isa)
    try:
        gen = torch.Generator().manual_seed(13)
        qdata, scale = random_weight(3, 96, 32, gen)
        scale[0, 1] = 255
        scale[1] = 0
        x = mxfp4_fake_quantize(torch.randn(1, 96, generator=gen), 32, "floor")
        before = cpu_mxfp4_gemv.integer_calls()
        y = cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, 32, "floor", out_dtype=torch.float32)
        assert cpu_mxfp4_gemv.integer_calls() == before + 1
        ref, magnitude = reference(x, qdata, scale, 32, "floor")
        assert bool(y[:, 0].isnan().all()) and not bool(y[:, 1:].isnan().any())
        assert bool((y[:, 1] != 0).all())
        torch.testing.assert_close(y[:, 1].double(), ref[:, 1], rtol=1e-4, atol=2.0**-149 * 96)
        check(y[:, 2], ref[:, 2], magnitude[:, 2], torch.float32, 5)
    finally:
        cpu_mxfp4_gemv.set_isa(None)


def test_panel_gemm_matches_float64_reference():
    """More than 16 rows on the AVX-512 path: the integer path's panel GEMM (tiles of 4 rows x 48
    columns, panels of 16): row counts that leave 1-3 rows, column counts that leave part of a panel
    or of a tile, blocks of 32 and 64, every input and output dtype, bias, and NaN / 2^-127 scales."""
    gen = torch.Generator().manual_seed(14)
    use_isa(2)
    try:
        for m, k, n, block_size in [(17, 96, 19, 32), (20, 608, 50, 32), (33, 192, 97, 64), (18, 64, 48, 32)]:
            qdata, _ = random_weight(n, k, block_size, gen)
            scale = torch.randint(112, 128, (n, k // block_size), dtype=torch.uint8, generator=gen)  # |w| <= 6
            scale[1, 0], scale[2] = 255, 0
            bias = torch.randn(n, generator=gen)
            x32 = mx_activations(m, k, gen, block_size)
            x32[0, :32] = 0.0  # an all-zero chunk
            x16 = mxfp4_fake_quantize(torch.randn(m, k, generator=gen), block_size, "floor").half()  # float16's range
            for x, b, out_dtype in [(x32, None, torch.float32), (x32.bfloat16(), bias, torch.bfloat16),
                                    (x16, bias, torch.float16), (x32, bias, torch.bfloat16)]:
                before = cpu_mxfp4_gemv.integer_calls()
                y = cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, block_size, "floor", b, out_dtype)
                assert cpu_mxfp4_gemv.integer_calls() == before + 1 and y.shape == (m, n) and y.dtype == out_dtype
                ref, magnitude = reference(x, qdata, scale, block_size, "floor", b)
                assert bool(y[:, 1].isnan().all()) and not bool(y[:, [0, *range(2, n)]].isnan().any())
                keep = [0, *range(2, n)]
                check(y[:, keep], ref[:, keep], magnitude[:, keep], out_dtype, k // 32 + 2)
    finally:
        cpu_mxfp4_gemv.set_isa(None)


def test_w4a4_prompts_take_the_panels(monkeypatch):
    """With PANELS (AVX-512 VNNI without AMX) a W4A4 linear hands prompts of any length to the GEMV,
    which quantizes them and runs its panel GEMM: one call, no weight decode, the dense route's numbers
    up to float32 summation order; without PANELS (or with a dense cache) the dense route runs."""
    from torchao_mx_ext.kernels import cpu_mxfp4_quantize

    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", True)
    monkeypatch.setattr(cpu_mxfp4_quantize, "VECTORIZED", True)
    monkeypatch.setattr(cpu_mxfp4_gemv, "PANELS", True)
    decodes = []
    real_decode = cpu_mxfp4_dequantize.mxfp4_dequantize
    monkeypatch.setattr(cpu_mxfp4_dequantize, "mxfp4_dequantize", lambda *a: decodes.append(a[0].shape) or real_decode(*a))
    lin = torch.nn.Linear(100, 40).to(torch.bfloat16)
    quantize_(lin, MXFP4BlockRotConfig(scale_rule="mse"))
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(2, cpu_mxfp4_gemv.MAX_ROWS + 3, 100).bfloat16()
    with torch.no_grad():
        y = lin(x)
        assert len(calls) == 1 and not decodes
        monkeypatch.setattr(cpu_mxfp4_gemv, "PANELS", False)
        dense = lin(x)
        assert len(calls) == 1 and len(decodes) == 1
        monkeypatch.setattr(cpu_mxfp4_gemv, "PANELS", True)
        cached = torch.nn.Linear(100, 40).to(torch.bfloat16)
        cached.weight = torch.nn.Parameter(lin.weight.with_dequantized_cache(), requires_grad=False)
        cached(x)
        assert len(calls) == 1
    torch.testing.assert_close(y.float(), dense.float(), atol=2e-6 * dense.abs().max().item(), rtol=2.0**-7)


def test_w4a4_decode_step_takes_the_integer_path(monkeypatch):
    """A W4A4 linear's one-row input (rotated and fake-quantized) reaches the kernel in the form the
    integer path takes, and gives the emulation's numbers."""
    use_isa(1)
    try:
        lin = torch.nn.Linear(192, 40).to(torch.bfloat16)
        quantize_(lin, MXFP4BlockRotConfig())
        monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", False)
        x = torch.randn(1, 192).bfloat16()
        with torch.no_grad():
            before = cpu_mxfp4_gemv.integer_calls()
            y = lin(x)
            assert cpu_mxfp4_gemv.integer_calls() == before + 1
            with monkeypatch.context() as mp:
                mp.setattr(cpu_mxfp4_gemv, "applies", lambda weight, x, fused_input=False: False)
                from torchao_mx_ext.kernels import cpu_mxfp4_mm

                mp.setattr(cpu_mxfp4_mm, "applies", lambda weight, x: False)
                old = lin(x)
        torch.testing.assert_close(y.float(), old.float(), atol=2e-6 * old.abs().max().item(), rtol=2.0**-7)
    finally:
        cpu_mxfp4_gemv.set_isa(None)


def random_rotation(b, gen):
    """A random orthogonal ``b x b`` block in float32 (QR of a Gaussian matrix, float64)."""
    q, _ = torch.linalg.qr(torch.randn(b, b, generator=gen, dtype=torch.float64))
    return q.to(torch.float32)


@pytest.mark.parametrize("rule", ["floor", "even", "rceil", "mse"])
def test_input_transform_in_the_call(rule):
    """With ``rotation`` / ``act_scale_rule`` the GEMV computes ``Q_a(x R)`` itself: the same bits as the
    quantizer kernel's output fed to the plain GEMV, and the float64 product of the pure-torch
    quantization of a float64 rotation (rounded once to float32) with the decoded weight."""
    gen = torch.Generator().manual_seed(21)
    for k, n, block_size, b in [(576, 24, 32, 32), (192, 8, 64, 64), (96, 5, 32, 16)]:
        qdata, scale = random_weight(n, k, block_size, gen)
        rotation = random_rotation(b, gen)
        for m in (1, 3):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, generator=gen).to(dtype)
                for rot in (None, rotation):
                    y = cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, block_size, "floor", None, torch.float32, rot, rule)
                    if rot is None:
                        xq = torch.ops.torchao_mx_ext.mxfp4_fake_quantize(x.float(), block_size, rule)
                    else:
                        xq = torch.ops.torchao_mx_ext.mxfp4_rotate_fake_quantize(x.float(), rot, block_size, rule)
                    assert torch.equal(y, cpu_mxfp4_gemv.mxfp4_gemv(xq, qdata, scale, block_size, "floor", None, torch.float32))
                    xr = x.double() if rot is None else (x.double().reshape(m, k // b, b) @ rot.double()).reshape(m, k)
                    ref, magnitude = reference(mxfp4_fake_quantize(xr.float(), block_size, rule), qdata, scale, block_size, "floor")
                    check(y, ref, magnitude, torch.float32, k)


def test_input_transform_errors():
    gen = torch.Generator().manual_seed(22)
    qdata, scale = random_weight(4, 96, 32, gen)
    x = torch.randn(1, 96, generator=gen)
    with pytest.raises(RuntimeError, match="scale rule must be floor, even, rceil or mse"):
        cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, 32, "floor", None, None, None, "fp_quant")
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, 32, "floor", None, None, torch.eye(24), "floor")
    with pytest.raises(RuntimeError, match="not a multiple of the rotation block"):
        cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, 32, "floor", None, None, torch.eye(64), "floor")
    with pytest.raises(RuntimeError, match="square float32"):
        cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, 32, "floor", None, None, torch.eye(32, dtype=torch.float64), "floor")


def test_kernel_shapes_and_errors():
    gen = torch.Generator().manual_seed(3)
    qdata, scale = random_weight(4, 64, 32, gen)
    x = torch.randn(2, 3, 64, generator=gen)
    y = cpu_mxfp4_gemv.mxfp4_gemv(x, qdata, scale, 32, "floor")
    assert y.shape == (2, 3, 4)
    torch.testing.assert_close(y, cpu_mxfp4_gemv.mxfp4_gemv(x.reshape(6, 64), qdata, scale, 32, "floor").reshape(2, 3, 4))
    assert cpu_mxfp4_gemv.mxfp4_gemv(torch.randn(0, 64), qdata, scale, 32, "floor").shape == (0, 4)
    # a non-contiguous x is read correctly
    xt = torch.randn(64, 2, generator=gen).T
    torch.testing.assert_close(cpu_mxfp4_gemv.mxfp4_gemv(xt, qdata, scale, 32, "floor"), cpu_mxfp4_gemv.mxfp4_gemv(xt.contiguous(), qdata, scale, 32, "floor"))
    with pytest.raises(RuntimeError, match="features"):
        cpu_mxfp4_gemv.mxfp4_gemv(torch.randn(1, 32), qdata, scale, 32, "floor")
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_mxfp4_gemv.mxfp4_gemv(torch.randn(1, 64), qdata, torch.zeros(4, 4, dtype=torch.uint8), 16, "floor")


def test_group_equals_separate_calls(monkeypatch):
    """mxfp4_gemv_group: each output is mxfp4_gemv's, bit for bit, whichever rotations the members carry
    (the same tensor, an equal copy, none, another matrix) and with or without a bias."""
    gen = torch.Generator().manual_seed(23)
    rotation, other = random_rotation(32, gen), random_rotation(32, gen)
    members = [random_weight(n, 96, 32, gen) for n in (24, 8, 8, 5)]
    rotations = [rotation, rotation.clone(), None, other]
    biases = [torch.randn(24, generator=gen), None, torch.randn(8, generator=gen).bfloat16(), None]
    for x, out_dtype, rule in [(torch.randn(1, 96, generator=gen).bfloat16(), torch.bfloat16, "mse"),
                               (torch.randn(3, 96, generator=gen), torch.float32, "floor"), (torch.randn(2, 96, generator=gen), None, None)]:
        rots = rotations if rule is not None else [None] * 4
        before = cpu_mxfp4_gemv.integer_calls()
        outs = cpu_mxfp4_gemv.mxfp4_gemv_group(x, [q for q, _ in members], [s for _, s in members], 32, "floor", biases, out_dtype, rots, rule)
        if rule is not None and cpu_mxfp4_gemv.set_isa(None) == 1:  # AVX2: the input is prepared once per distinct rotation
            assert cpu_mxfp4_gemv.integer_calls() == before + 3
        assert len(outs) == len(members)
        for out, (q, s), b, r in zip(outs, members, biases, rots):
            assert torch.equal(out, cpu_mxfp4_gemv.mxfp4_gemv(x, q, s, 32, "floor", b, out_dtype, r, rule))
    # The pure-torch fallback (a build that failed), member by member: the same up to float32 summation order.
    qs, ss = [q for q, _ in members], [s for _, s in members]
    with torch.no_grad():
        kernel = cpu_mxfp4_gemv.mxfp4_gemv_group(x, qs, ss, 32, "floor", biases, torch.float32)
    for out, (q, s), b in zip(kernel, members, biases):
        ref, magnitude = reference(x, q, s, 32, "floor", b)
        check(out, ref, magnitude, torch.float32, 96)
    with monkeypatch.context() as mp:
        mp.setattr(cpu_mxfp4_gemv, "is_available", lambda: False)
        pure = cpu_mxfp4_gemv._fallback_mxfp4_gemv_group(x, qs, ss, 32, 1.0, biases, torch.float32, [None] * 4)
    for out, p in zip(kernel, pure):
        torch.testing.assert_close(out, p, atol=1e-5 * p.abs().max().item(), rtol=0)
    with pytest.raises(RuntimeError, match="same, nonzero length"):
        torch.ops.torchao_mx_ext.mxfp4_gemv_group(x, [members[0][0]], [members[0][1]], 32, 1.0, [None, None], None, [None], None)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.torchao_mx_ext.mxfp4_gemv_group(torch.randn(1, 64), [members[0][0]], [members[0][1]], 32, 1.0, [None], None, [None], None)
    torch.library.opcheck(
        torch.ops.torchao_mx_ext.mxfp4_gemv_group.default,
        (torch.randn(2, 96, generator=gen).bfloat16(), [q for q, _ in members[:2]], [s for _, s in members[:2]], 32, 1.0, [None, biases[0][:8]],
         torch.bfloat16, [rotation, None], "even"),
    )


@pytest.mark.parametrize("dense_first", [False, True])
def test_w4a4_decode_linear_is_one_gemv_call(monkeypatch, dense_first):
    """A W4A4 decode-step linear hands its rotation and activation quantization to the GEMV (no quantizer
    call of its own), with the two-call path's bits, whichever route prompts take; the width is
    zero-padded first."""
    from torchao_mx_ext.kernels import cpu_mxfp4_quantize

    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", dense_first)
    monkeypatch.setattr(cpu_mxfp4_quantize, "VECTORIZED", True)
    transforms = []
    real = cpu_mxfp4_quantize.rotate_and_quantize
    monkeypatch.setattr(cpu_mxfp4_quantize, "rotate_and_quantize", lambda *a, **k: transforms.append(1) or real(*a, **k))
    for k, n, dtype in [(192, 40, torch.bfloat16), (100, 24, torch.float32)]:
        lin = torch.nn.Linear(k, n).to(dtype)
        quantize_(lin, MXFP4BlockRotConfig(scale_rule="mse"))
        assert cpu_mxfp4_quantize.fuses_into_gemv(lin.weight)
        calls = _count_kernel_calls(monkeypatch)
        x = torch.randn(2, 1, k).to(dtype)
        with torch.no_grad():
            y = lin(x)
            assert len(calls) == 1 and not transforms
            with monkeypatch.context() as mp:
                mp.setattr(cpu_mxfp4_quantize, "fuses_into_gemv", lambda weight: False)
                two_calls = lin(x)
            assert len(calls) == 2 and len(transforms) == 1
        transforms.clear()
        assert y.dtype == dtype and torch.equal(y, two_calls)
    w4a4 = lin.weight
    # fp_quant activations and the emulated preference keep the quantizer
    for config in (MXFP4BlockRotConfig(scale_rule="fp_quant"), MXFP4BlockRotConfig(kernel_preference="emulated")):
        lin = torch.nn.Linear(64, 8)
        quantize_(lin, config)
        assert not cpu_mxfp4_quantize.fuses_into_gemv(lin.weight)
    monkeypatch.setattr(cpu_mxfp4_quantize, "VECTORIZED", False)  # the quantizer has no SIMD path here
    assert not cpu_mxfp4_quantize.fuses_into_gemv(w4a4)


# -- RotatedMXFP4Tensor.linear: the kernel path against the dequantize + F.linear path ------------

LINEAR_CASES = [
    # (in, out, config): weight-only with every scale rule, a rotation, padding, and one W4A4 (fp_quant:
    # the other W4A4 weights take the integer GEMM, tests/kernels/test_cpu_mxfp4_mm.py)
    (96, 40, MXFP4Config(scale_rule="floor", act_quant=False)),
    (64, 24, MXFP4Config(scale_rule="even", act_quant=False)),
    (160, 24, MXFP4Config(scale_rule="rceil", act_quant=False)),
    (96, 16, MXFP4Config(scale_rule="fp_quant", act_quant=False)),
    (100, 24, MXFP4BlockRotConfig(scale_rule="mse", act_quant=False)),
    (64, 48, MXFP4BlockRotConfig(scale_rule="fp_quant")),
]


def _old_path(monkeypatch, lin, x):
    with monkeypatch.context() as mp:
        mp.setattr(cpu_mxfp4_gemv, "applies", lambda weight, x, fused_input=False: False)
        return lin(x)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = cpu_mxfp4_gemv.mxfp4_gemv

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_mxfp4_gemv, "mxfp4_gemv", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,config", LINEAR_CASES)
def test_linear_uses_kernel_and_matches_dequantize_path(monkeypatch, k, n, config, dtype):
    lin = torch.nn.Linear(k, n).to(dtype)
    quantize_(lin, config)
    w = lin.weight
    assert isinstance(w, RotatedMXFP4Tensor)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        for shape in [(1, k), (3, k), (2, 1, k)]:
            x = torch.randn(*shape).to(dtype)
            y = lin(x)
            old = _old_path(monkeypatch, lin, x)
            assert y.dtype == old.dtype == dtype and y.shape == old.shape
            # Same decoded weights and (for bf16 GEMMs) the same bf16-rounded activation: only the
            # float32 summation order differs, then one rounding to the output dtype.
            scale = old.abs().max().item()
            if dtype == torch.float32:
                torch.testing.assert_close(y, old, atol=2e-6 * scale, rtol=0)
            else:
                torch.testing.assert_close(y.float(), old.float(), atol=2e-6 * scale, rtol=2.0**-7)
    assert len(calls) == 3


@pytest.mark.parametrize("dense_first", [False, True])
def test_linear_dispatch_conditions(monkeypatch, dense_first):
    # On AVX-512 CPUs decode + library GEMM takes over above FUSED_ROWS rows; elsewhere the GEMV keeps
    # up to MAX_ROWS.
    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", dense_first)
    limit = cpu_mxfp4_dequantize.FUSED_ROWS if dense_first else cpu_mxfp4_gemv.MAX_ROWS
    lin = torch.nn.Linear(64, 16)
    quantize_(lin, MXFP4Config(act_quant=False))
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        lin(torch.randn(limit, 64))
        assert len(calls) == 1
        lin(torch.randn(limit + 1, 64))  # prefill-sized batches: dequantize + GEMM
        assert len(calls) == 1
        cached = torch.nn.Linear(64, 16)
        cached.weight = torch.nn.Parameter(lin.weight.with_dequantized_cache(), requires_grad=False)
        cached(torch.randn(1, 64))  # a small batch reads the codes, not the dense cache
        assert len(calls) == 2
        cached(torch.randn(cpu_mxfp4_gemv.MAX_ROWS_CACHED + 1, 64))  # a larger one uses the cache
        assert len(calls) == 2
    x = torch.randn(1, 64, requires_grad=True)  # the kernel has no backward: autograd keeps the old path
    lin(x).sum().backward()
    assert len(calls) == 2 and x.grad is not None


def test_compiled_fullgraph_matches_eager_and_calls_the_op():
    from torch._inductor.utils import run_and_get_code

    model = torch.nn.Sequential(torch.nn.Linear(100, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    quantize_(model, MXFP4BlockRotConfig(act_quant=False))
    x = torch.randn(2, 100).bfloat16()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    assert len(re.findall(r"torch\.ops\.torchao_mx_ext\.mxfp4_gemv\.default\(", "\n".join(code))) == 2


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    qdata, scale = random_weight(8, 96, 32, gen)
    op = torch.ops.torchao_mx_ext.mxfp4_gemv.default
    samples = [
        (torch.randn(1, 96, generator=gen), qdata, scale, 32, 1.0, None, None),
        (torch.randn(3, 96, generator=gen).bfloat16(), qdata, scale, 32, 4.0 / 3.0, torch.randn(8, generator=gen), torch.float32),
        (torch.randn(2, 2, 96, generator=gen), qdata, scale, 32, 1.0, torch.randn(8, generator=gen).bfloat16(), torch.bfloat16),
        (torch.randn(2, 96, generator=gen).bfloat16(), qdata, scale, 32, 1.0, None, torch.bfloat16, random_rotation(32, gen), "mse"),
        (torch.randn(1, 96, generator=gen), qdata, scale, 32, 1.0, None, None, None, "even"),
    ]
    for args in samples:
        torch.library.opcheck(op, args)


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog):
    def fail():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_extension, "_load_extension", fail)
    monkeypatch.setattr(cpu_extension, "_state", None)
    with caplog.at_level(logging.WARNING, logger=cpu_extension.__name__):
        assert not cpu_mxfp4_gemv.is_available() and not cpu_mxfp4_gemv.is_available()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Ninja is required" in warnings[0].getMessage()
    lin = torch.nn.Linear(64, 16)
    quantize_(lin, MXFP4Config(act_quant=False))
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(1, 64)
    with torch.no_grad():
        y = lin(x)
    assert not calls  # the dequantize path
    # The operator's own fallback (what a graph traced elsewhere with the operator runs here).
    w = lin.weight
    for xin, out_dtype in [(x, torch.float32), (x.bfloat16(), torch.bfloat16)]:
        fallback = cpu_mxfp4_gemv._fallback_mxfp4_gemv(xin, w.qdata, w.scale, 32, 1.0, lin.bias, out_dtype)
        ref, magnitude = reference(xin, w.qdata, w.scale, 32, "floor", lin.bias)
        check(fallback, ref, magnitude, out_dtype, 64)
        if xin.dtype == torch.float32:
            torch.testing.assert_close(fallback, y, atol=2e-6 * y.abs().max().item(), rtol=0)


@pytest.mark.parametrize("rule", ["floor", "fp_quant"])
def test_pure_torch_fallback_matches_kernel(rule):
    gen = torch.Generator().manual_seed(5)
    qdata, scale = random_weight(24, 160, 32, gen)
    bias = torch.randn(24, generator=gen)
    for x in (torch.randn(3, 160, generator=gen), torch.randn(1, 160, generator=gen).bfloat16()):
        mult = 4.0 / 3.0 if rule == "fp_quant" else 1.0
        kernel = torch.ops.torchao_mx_ext.mxfp4_gemv(x, qdata, scale, 32, mult, bias, torch.float32)
        fallback = cpu_mxfp4_gemv.reference_mxfp4_gemv(x, qdata, scale, 32, mult, bias, torch.float32)
        torch.testing.assert_close(kernel, fallback, atol=1e-5 * fallback.abs().max().item(), rtol=0)


def test_ninja_from_the_pypi_package_is_put_on_path(monkeypatch):
    """torch's builder runs ``ninja`` from PATH; an unactivated venv has the wheel's binary off it."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(cpu_extension.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    with cpu_extension._ninja_on_path():
        assert cpu_extension.os.environ["PATH"].split(cpu_extension.os.pathsep)[0] == ninja.BIN_DIR
    assert cpu_extension.os.environ["PATH"] == "/nonexistent"
