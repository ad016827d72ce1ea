"""Our ``even`` scale rule is compressed-tensors' own dynamic MXFP4 activation rule (what a vLLM W4A4
MXFP4 model computes): checked against compressed-tensors itself.

compressed-tensors (the ``export`` extra) is the reference here: its ``generate_mx_scales`` and the
clamp to uint8 that ``calculate_qparams`` applies give the E8M0 byte of a block maximum, and its
``compute_dynamic_scales_and_zp`` + ``fake_quantize`` the whole W4A4 activation round trip.
"""

import pytest
import torch

from torchao_mx_ext.mx import SCALE_RULES, mxfp4_fake_quantize, mxfp4_quantize, shared_exponent

ct_utils = pytest.importorskip("compressed_tensors.quantization.utils.mxfp_utils")

# Above this finite block maximum compressed-tensors' power-of-two rounding overflows to inf.
CT_OVERFLOW = 1.75 * 2.0**127


def ct_scale_byte(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' E8M0 byte for block maxima, as calculate_qparams computes it for MXFP4."""
    from compressed_tensors.quantization.quant_args import round_to_quantized_type_dtype

    biased = ct_utils.generate_mx_scales(amax, num_bits=4)
    return round_to_quantized_type_dtype(biased, dtype=torch.uint8, cast_to_original_dtype=False)


def edge_maxima() -> torch.Tensor:
    """Every float32 exponent field, each with the mantissa patterns that decide the rounding
    (0, just below and at the 1.75 carry, the top two bits, all ones), plus zero and subnormals."""
    mantissas = torch.tensor([0, 1, 0x1FFFFF, 0x200000, 0x400000, 0x5FFFFF, 0x600000, 0x600001, 0x7FFFFF], dtype=torch.int64)
    exponents = torch.arange(0, 255, dtype=torch.int64)
    bits = (exponents.view(-1, 1) << 23) | mantissas.view(1, -1)
    values = bits.flatten().to(torch.int32).view(torch.float32)
    return values[values < CT_OVERFLOW]



def test_exponents_bit_exact_on_edge_and_random_maxima():
    g = torch.Generator().manual_seed(3)
    random = torch.rand(20000, generator=g) * 10 ** (torch.rand(20000, generator=g) * 76 - 40)  # 1e-40 .. 1e36
    amax = torch.cat([edge_maxima(), random.to(torch.float32)])
    ours = shared_exponent(amax, "even") + 127
    assert torch.equal(ours.to(torch.int64), ct_scale_byte(amax).to(torch.int64))
    # the documented single divergence: compressed-tensors overflows to the NaN scale byte
    top = torch.tensor([CT_OVERFLOW, torch.finfo(torch.float32).max])
    assert ct_scale_byte(top).tolist() == [255, 255]
    assert (shared_exponent(top, "even") + 127).tolist() == [253, 253]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_bit_exact_with_compressed_tensors_w4a4_activation(dtype):
    """Our ``mxfp4_fake_quantize(x, 32, "even")`` is compressed-tensors' dynamic MXFP4 input round trip."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    args = preset_name_to_scheme("MXFP4", ["Linear"]).input_activations
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 7, 256, generator=g) * 10 ** (torch.rand(6, 7, 8, 1, generator=g) * 12 - 6).repeat_interleave(32, -2).squeeze(-1)
    # exact E2M1 ties and the 1.75 carry inside blocks
    x[0, 0, :32] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4) * 2.0**-3
    x[0, 1, :32] = 7.0
    x[0, 2, :32] = 0.0
    x = x.to(dtype)
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=None)
    theirs = fake_quantize(x=x, scale=scale, zero_point=zp, args=args)
    ours = mxfp4_fake_quantize(x, 32, "even")
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def test_quantized_scales_are_compressed_tensors_scales():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 128, generator=g) * 10 ** (torch.rand(64, 1, generator=g) * 20 - 10)
    _, scale = mxfp4_quantize(x, 32, "even")
    amax = x.abs().reshape(64, 4, 32).amax(-1)
    assert torch.equal(scale.to(torch.int64), ct_scale_byte(amax).to(torch.int64))
