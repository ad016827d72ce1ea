"""The Blackwell MXFP4 GEMM path: off unless opted in on capable hardware; where such a GPU exists, equal
to the emulation up to accumulation order and bfloat16 output rounding."""

import pytest
import torch
from torchao.quantization import quantize_

from torchao_mx_ext import MXFP4BlockRotConfig
from torchao_mx_ext.kernels import cuda_mxfp4_mm

ON_BLACKWELL = torch.cuda.is_available() and cuda_mxfp4_mm.hardware_available(torch.device("cuda"))


def test_cpu_never_takes_the_hardware_path(monkeypatch):
    monkeypatch.setenv(cuda_mxfp4_mm.ENV_FLAG, "1")
    lin = torch.nn.Linear(64, 32)
    quantize_(lin, MXFP4BlockRotConfig())
    assert not cuda_mxfp4_mm.hardware_available(torch.device("cpu"))
    assert not cuda_mxfp4_mm.applies(lin.weight, torch.randn(4, 64))


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
