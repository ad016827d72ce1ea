import io

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import quantize_

from reference import ref_fake_quantize, ref_hadamard
from torchao_mx_ext import MXFP4ActivationTensor, MXFP4BlockRotConfig, MXFP4Config, RotatedMXFP4Tensor
from torchao_mx_ext.rotation import orthogonal_block


def _reference_linear(x, w, b, rotation64, rule, act_rule):
    """float64 F.linear(Q(x R), Q(W R)) + b with zero padding to the rotation/block width."""
    k = w.shape[1]
    size = 32 if rotation64 is None else rotation64.shape[0]
    kp = -(-k // 32) * 32
    kp = -(-kp // size) * size
    xp = F.pad(x.double(), (0, kp - k))
    wp = F.pad(w.double(), (0, kp - k))
    if rotation64 is not None:
        rot = torch.block_diag(*[rotation64] * (kp // rotation64.shape[0]))
        xp, wp = xp @ rot, wp @ rot
    wq = ref_fake_quantize(wp.float().double(), rule)  # the weight is rotated in float64, stored from float32
    xq = xp if act_rule is None else ref_fake_quantize(xp.float().double(), act_rule)
    return F.linear(xq, wq, None if b is None else b.double())


CASES = [
    # (in, out, config, rotation in float64 or None)
    (64, 48, MXFP4Config(scale_rule="floor"), None),
    (96, 40, MXFP4Config(scale_rule="mse", act_quant=False), None),
    (64, 48, MXFP4BlockRotConfig(scale_rule="floor"), lambda: ref_hadamard(32)),
    (172, 24, MXFP4BlockRotConfig(scale_rule="even"), lambda: ref_hadamard(32)),
    (128, 24, MXFP4BlockRotConfig(scale_rule="rceil", rotation_size=None), lambda: ref_hadamard(128)),
    (
        96,
        16,
        MXFP4BlockRotConfig(scale_rule="mse", rotation="random_hadamard", rotation_size=None, seed=4),
        lambda: orthogonal_block("random_hadamard", 96, 4),
    ),
]


@pytest.mark.parametrize("k,n,config,rotation", CASES)
def test_linear_matches_float64_reference_eager_and_compiled(k, n, config, rotation):
    lin = torch.nn.Linear(k, n)
    x = torch.randn(5, 7, k) * 3
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    quantize_(lin, config)
    assert isinstance(lin.weight, RotatedMXFP4Tensor) and lin.weight.shape == (n, k)
    ref = _reference_linear(x, w, b, None if rotation is None else rotation(), config.scale_rule, config.activation_scale_rule)
    with torch.no_grad():
        eager = lin(x)
        compiled = torch.compile(lin, fullgraph=True)(x)
    assert eager.dtype == torch.float32
    scale = ref.abs().max().item()
    torch.testing.assert_close(eager.double(), ref, atol=2e-6 * scale, rtol=0)
    torch.testing.assert_close(compiled, eager, atol=1e-6 * scale, rtol=0)


def test_dequantize_is_quantized_rotated_weight():
    lin = torch.nn.Linear(64, 8)
    w = lin.weight.detach().clone().double()
    quantize_(lin, MXFP4BlockRotConfig(scale_rule="floor"))
    h = ref_hadamard(32)
    expected = ref_fake_quantize((w @ torch.block_diag(h, h)).float().double(), "floor")
    assert torch.equal(lin.weight.dequantize().double(), expected)


def test_activation_tensor_is_the_emulated_activation():
    lin = torch.nn.Linear(64, 8)
    quantize_(lin, MXFP4BlockRotConfig(scale_rule="even"))
    x = torch.randn(3, 64)
    act = lin.weight.quantize_input(x)
    assert isinstance(act, MXFP4ActivationTensor) and act.shape == (3, 64)
    assert act.qdata.dtype == torch.uint8 and act.qdata.shape == (3, 32) and act.scale.shape == (3, 2)
    y = F.linear(act.dequantize(), lin.weight.dequantize(), lin.bias)
    assert torch.equal(y, lin(x))


def test_storage_is_4_25_bits_per_weight_and_rotation_is_shared():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256), torch.nn.Linear(256, 64))
    quantize_(model, MXFP4BlockRotConfig())
    for lin in model:
        w = lin.weight
        bits = (w.qdata.numel() * w.qdata.element_size() + w.scale.numel() * w.scale.element_size()) * 8
        assert bits / w.numel() == 4.25
    ptrs = {lin.weight.rotation.untyped_storage().data_ptr() for lin in model}
    assert len(ptrs) == 1  # one 32x32 block for the whole model


def test_export_state_dict_and_save_load_round_trip():
    torch.manual_seed(1)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    a, b = make(), make()
    quantize_(a, MXFP4BlockRotConfig())
    quantize_(b, MXFP4BlockRotConfig())
    x = torch.randn(4, 64)
    with torch.no_grad():
        ya = a(x)
        assert not torch.equal(ya, b(x))
        exported = torch.export.export(a, (x,))
        assert torch.equal(exported.module()(x), ya)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf)  # weights_only=True by default
        assert isinstance(state["0.weight"], RotatedMXFP4Tensor)
        b.load_state_dict(state)
        assert torch.equal(b(x), ya)


def test_to_dtype_changes_compute_dtype_not_codes():
    lin = torch.nn.Linear(64, 16)
    quantize_(lin, MXFP4BlockRotConfig())
    x = torch.randn(2, 64)
    with torch.no_grad():
        y32 = lin(x)
        qdata = lin.weight.qdata.clone()
        lin.to(torch.bfloat16)
        assert lin.weight.dtype == torch.bfloat16 and torch.equal(lin.weight.qdata, qdata)
        y16 = lin(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.02)


def test_bad_weights_get_clear_errors():
    lin = torch.nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_(lin, MXFP4Config())
    with pytest.raises(TypeError, match="floating-point"):
        RotatedMXFP4Tensor.from_hp(torch.ones(8, 64, dtype=torch.int32))
    ok = torch.nn.Linear(64, 8)
    quantize_(ok, MXFP4Config())
    with pytest.raises(TypeError, match="already MXFP4-quantized"):
        quantize_(ok, MXFP4Config())
    with pytest.raises(TypeError, match="already quantized"):
        RotatedMXFP4Tensor.from_hp(ok.weight)
    with pytest.raises(ValueError, match="unknown MXFP4 scale rule"):
        MXFP4Config(scale_rule="ceil")
    with pytest.raises(ValueError, match="unknown rotation"):
        MXFP4BlockRotConfig(rotation="cayley")
    with pytest.raises(ValueError, match="rotation_size"):
        MXFP4BlockRotConfig(rotation_size=0)


def test_dequantized_cache_changes_speed_not_numbers():
    from torchao_mx_ext import cache_dequantized_weights

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    quantize_(model, MXFP4BlockRotConfig())
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
        cache_dequantized_weights(model)
        assert model[0].weight.dequantized is not None
        assert torch.equal(model(x), ref)
        assert torch.equal(torch.compile(model, fullgraph=True)(x), ref)
        cache_dequantized_weights(model, enabled=False)
        assert model[0].weight.dequantized is None and torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="no MXFP4-quantized weights"):
        cache_dequantized_weights(torch.nn.Linear(4, 4))


def test_bf16_inputs_use_an_exact_bf16_gemm():
    lin = torch.nn.Linear(64, 16, bias=False)
    quantize_(lin, MXFP4BlockRotConfig(scale_rule="floor"))
    lin.to(torch.bfloat16)
    x = torch.randn(4, 64).to(torch.bfloat16)
    w = lin.weight
    xq = w.quantize_input(x).dequantize(torch.float32)
    # MXFP4 values are exact in bf16: casting the float32 operands loses nothing
    assert torch.equal(xq.to(torch.bfloat16).float(), xq)
    assert torch.equal(w.dequantize(torch.bfloat16).float(), w.dequantize(torch.float32))
    assert w.gemm_dtype(torch.bfloat16) == torch.bfloat16
    with torch.no_grad():
        y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), xq @ w.dequantize(torch.float32).T, rtol=2**-7, atol=1e-2)


def test_whole_model_pickles_and_computes_the_same():
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    quantize_(model, MXFP4BlockRotConfig())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(3, 64)
    assert isinstance(loaded[0].weight, RotatedMXFP4Tensor) and "mxfp4(" in repr(loaded)
    assert torch.equal(loaded(x), model(x))


def test_state_dict_between_plain_and_quantized_models_is_refused_clearly():
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64))
    quantized = torch.nn.Sequential(torch.nn.Linear(64, 64))
    quantize_(quantized, MXFP4BlockRotConfig())
    with pytest.raises(RuntimeError, match="quantized weight into a plain tensor"):
        plain.load_state_dict(quantized.state_dict())
    with pytest.raises(RuntimeError, match="plain tensor into an MXFP4-quantized weight"):
        quantized.load_state_dict(torch.nn.Sequential(torch.nn.Linear(64, 64)).state_dict())
    other = torch.nn.Sequential(torch.nn.Linear(64, 64))
    quantize_(other, MXFP4Config(scale_rule="floor"))
    with pytest.raises(RuntimeError, match="scale_rule"):
        quantized.load_state_dict(other.state_dict())
    same = torch.nn.Sequential(torch.nn.Linear(64, 64))
    quantize_(same, MXFP4BlockRotConfig())
    same.load_state_dict(quantized.state_dict())
    assert torch.equal(same[0].weight.qdata, quantized[0].weight.qdata)


def test_kernel_preference_chooses_the_kernel(monkeypatch):
    from torchao_mx_ext.kernels import cpu_mxfp4_gemv, cpu_mxfp4_mm

    calls = []
    for module, name in ((cpu_mxfp4_gemv, "mxfp4_gemv"), (cpu_mxfp4_mm, "mxfp4_mm")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    x = torch.randn(1, 64)
    outputs = {}
    for preference in ("auto", "emulated"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 32))
        torch.manual_seed(0)
        model[0].reset_parameters()
        quantize_(model, MXFP4BlockRotConfig(kernel_preference=preference))
        assert model[0].weight.kernel_preference == preference
        assert model[0].weight.to(torch.bfloat16).kernel_preference == preference
        calls.clear()
        with torch.no_grad():
            outputs[preference] = model(x)
        # W4A4 on CPU, one row: the GEMV on the fake-quantized input (the integer GEMM takes larger batches)
        w = model[0].weight
        expected = "mxfp4_mm" if cpu_mxfp4_mm.applies(w, x) else "mxfp4_gemv" if cpu_mxfp4_gemv.applies(w, x) else None
        assert calls == ([expected] if preference == "auto" and expected else [])
    torch.testing.assert_close(outputs["auto"], outputs["emulated"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel_preference"):
        MXFP4Config(kernel_preference="fast")
