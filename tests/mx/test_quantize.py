import pytest
import torch

from reference import ref_quantize
from torchao_mx_ext.mx import (
    SCALE_RULES,
    element_multiplier,
    e2m1_to_code,
    mxfp4_dequantize,
    mxfp4_fake_quantize,
    mxfp4_quantize,
    round_onto_scales,
    unpack_uint4,
)
from torchao_mx_ext.mx.e8m0 import exp2_int


def _hard_cases() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    blocks = []
    # magnitudes spanning 1e-6..1e6, per element and per block
    blocks.append(torch.randn(64, 32, generator=g).sign() * 10 ** (torch.rand(64, 32, generator=g) * 12 - 6))
    blocks.append(torch.randn(64, 32, generator=g) * 10 ** (torch.rand(64, 1, generator=g) * 12 - 6))
    # exact ties at every E2M1 midpoint, for several block exponents (amax = 6 * 2^j -> e = j)
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)
    for j in (-20, -3, 0, 7):
        blocks.append((ties * 2.0**j).view(1, 32))
        blocks.append((-ties * 2.0**j).view(1, 32))
    # all-zero block; saturation (amax / 2^k >= 1.75 clips under floor); rceil/even edges
    blocks.append(torch.zeros(1, 32))
    for lead in (7.0, 7.5, 7.99, 6.5, 6.01, 3.0, 3.01, 3.5, 1.5 * 2**-126):
        row = torch.rand(1, 32, generator=g) * lead
        row[0, 5] = lead
        blocks.append(row)
    # subnormal and tiny block maxima, and huge ones
    blocks.append(torch.rand(1, 32, generator=g) * 1e-40)
    blocks.append(torch.full((1, 32), 2.0**-149))
    blocks.append(torch.rand(1, 32, generator=g) * 2.0**-126)
    blocks.append(torch.rand(1, 32, generator=g) * 2e38)  # fp_quant overflows above ~2.8e38 (documented)
    return torch.cat(blocks).to(torch.float32)


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_bit_exact_against_float64_reference(rule):
    x = _hard_cases()
    qdata, scale = mxfp4_quantize(x, 32, rule)
    ref_q, ref_e, ref_deq = ref_quantize(x, rule)
    assert qdata.dtype == torch.uint8 and qdata.shape == (x.shape[0], 16)
    assert scale.dtype == torch.uint8 and scale.shape == (x.shape[0], 1)
    assert torch.equal(scale.to(torch.int64) - 127, ref_e)
    deq = mxfp4_dequantize(qdata, scale, 32, rule).to(torch.float64)
    if rule == "fp_quant":  # 4/3 is not a float: equal to float32 rounding
        torch.testing.assert_close(deq, ref_deq, rtol=2**-22, atol=0)
    else:
        assert torch.equal(deq, ref_deq)


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_rounding_onto_fixed_scales_is_the_quantizers_rounding(rule):
    """round_onto_scales on the exponents mxfp4_quantize chose gives its codes bit for bit (the one
    element rounding GPTQ shares), from float32 and from float64 input alike."""
    x = _hard_cases()[:-1]  # the last block (fp_quant overflow) has its own test
    qdata, scale = mxfp4_quantize(x, 32, rule)
    inv_scale = exp2_int(-(scale.to(torch.int32) - 127))  # [n, 1]: one block per row
    for src in (x, x.double()):
        q = round_onto_scales(src, inv_scale, element_multiplier(rule))
        assert q.dtype == torch.float32
        assert torch.equal(e2m1_to_code(q), unpack_uint4(qdata))


def test_floor_rule_is_the_ocp_definition_on_known_blocks():
    # amax = 6 * 2^3 -> e = floor(log2(48)) - 2 = 3; 5 * 2^3 = 40 is a tie between 4 and 6 -> 4 * 8 = 32
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 2] = 48.0, 40.0, -2.0
    qdata, scale = mxfp4_quantize(x, 32, "floor")
    assert scale.item() == 127 + 3
    deq = mxfp4_dequantize(qdata, scale, 32, "floor")
    assert deq[0, :3].tolist() == [48.0, 32.0, -0.0]
    # amax = 7.5 * 2^0 -> e = 0 under floor, clipped to 6; even and rceil move the exponent up
    y = torch.zeros(1, 32)
    y[0, 0] = 7.5
    assert mxfp4_dequantize(*mxfp4_quantize(y, 32, "floor"), 32, "floor")[0, 0].item() == 6.0
    assert mxfp4_dequantize(*mxfp4_quantize(y, 32, "even"), 32, "even")[0, 0].item() == 8.0
    assert mxfp4_dequantize(*mxfp4_quantize(y, 32, "rceil"), 32, "rceil")[0, 0].item() == 8.0


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_fake_quantize_equals_round_trip(rule):
    x = torch.randn(8, 3, 96) * 10 ** (torch.rand(8, 3, 1) * 6 - 3)
    assert torch.equal(mxfp4_fake_quantize(x, 32, rule), mxfp4_dequantize(*mxfp4_quantize(x, 32, rule), 32, rule))


def test_fake_quantize_keeps_dtype_and_computes_in_float32():
    x = torch.randn(4, 64)
    out = mxfp4_fake_quantize(x.to(torch.bfloat16), 32, "floor")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), mxfp4_fake_quantize(x.to(torch.bfloat16).float(), 32, "floor"))


def test_non_finite_block_becomes_nan_and_others_are_untouched():
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    qdata, scale = mxfp4_quantize(x, 32, "floor")
    assert scale[0, 0].item() == 255 and scale[1, 1].item() == 255
    deq = mxfp4_dequantize(qdata, scale, 32, "floor")
    assert bool(deq[0, :32].isnan().all()) and bool(deq[1, 32:].isnan().all())
    assert bool(deq[0, 32:].isfinite().all()) and bool(deq[1, :32].isfinite().all())
    assert torch.equal(deq.isnan(), mxfp4_fake_quantize(x, 32, "floor").isnan())


def test_mse_rule_never_worse_than_floor():
    x = torch.randn(256, 32) * 10 ** (torch.rand(256, 1) * 4 - 2)
    err = lambda rule: (mxfp4_fake_quantize(x, 32, rule) - x).square().sum(-1)
    assert bool((err("mse") <= err("floor")).all())
    assert float(err("mse").sum()) < float(err("floor").sum())


def test_bad_width_and_rule_are_clear_errors():
    with pytest.raises(ValueError, match="blocks of 32"):
        mxfp4_quantize(torch.randn(4, 40))
    with pytest.raises(ValueError, match="unknown MXFP4 scale rule"):
        mxfp4_quantize(torch.randn(4, 32), 32, "nearest")


def test_compiles_to_the_same_bits():
    x = torch.randn(16, 128) * 10 ** (torch.rand(16, 1) * 6 - 3)
    for rule in ("floor", "mse"):
        compiled = torch.compile(mxfp4_fake_quantize, fullgraph=True)
        assert torch.equal(compiled(x, 32, rule), mxfp4_fake_quantize(x, 32, rule))


@pytest.mark.parametrize("rule,mode", [("floor", "FLOOR"), ("even", "EVEN"), ("rceil", "RCEIL")])
def test_codes_and_scales_identical_to_torchao_to_mx(rule, mode):
    # torchao's MX implementation is independent of ours: same bytes means the same format and layout
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    x = torch.randn(64, 256) * 10 ** (torch.rand(64, 1) * 8 - 4)
    scale_ao, data_ao = to_mx(x, torch.float4_e2m1fn_x2, 32, getattr(ScaleCalculationMode, mode))
    qdata, scale = mxfp4_quantize(x, 32, rule)
    assert torch.equal(scale_ao.view(torch.uint8).reshape(scale.shape), scale)
    assert torch.equal(data_ao.view(torch.uint8), qdata)
