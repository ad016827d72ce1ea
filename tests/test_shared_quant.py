"""share_input_quantization: q/k/v and gate/up rotate and quantize their common input once, with the
same numbers bit for bit (eager here; the compiled kernel count is in test_compile.py)."""

import copy
import logging

import pytest
import torch

import torchao_mx_ext as tme
from torchao_mx_ext.recipes import quantize_linears
from torchao_mx_ext.shared_quant import shared_groups
from torchao_mx_ext.zoo import load_model


@pytest.fixture(scope="module")
def base():
    model, _ = load_model("stories260k")
    return model


@pytest.fixture
def prompt(base):
    return torch.randint(0, base.config.vocab_size, (2, 9))


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "config",
    [tme.MXFP4BlockRotConfig(), tme.MXFP4BlockRotConfig(act_quant=False), tme.MXFP4Config(scale_rule="even"),
     tme.MXFP4BlockRotConfig(rotation="random_hadamard", rotation_size=None, seed=3)],
    ids=["block-rot", "block-rot-weight-only", "rtn-even", "global-rot"],
)
def test_shared_is_bit_exact_and_reversible(base, prompt, config, dtype):
    model = quantize_linears(copy.deepcopy(base), config).to(dtype)
    ref = logits(model, prompt)
    keys = set(model.state_dict())
    assert tme.share_input_quantization(model) == 2 * len(model.model.layers)
    assert set(shared_groups(model).values()) == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    assert set(model.state_dict()) == keys  # the shared rotation is not state
    assert torch.equal(logits(model, prompt), ref)
    tme.unshare_input_quantization(model)
    assert not shared_groups(model)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert torch.equal(logits(model, prompt), ref)


def test_shared_follows_dtype_and_copies(base, prompt):
    model = quantize_linears(copy.deepcopy(base), tme.MXFP4BlockRotConfig())
    tme.share_input_quantization(model)
    # .to(bfloat16) casts floating buffers: the rotation is kept as int32 bits and stays exact.
    model.to(torch.bfloat16)
    reference = quantize_linears(copy.deepcopy(base), tme.MXFP4BlockRotConfig()).to(torch.bfloat16)
    assert torch.equal(logits(model, prompt), logits(reference, prompt))
    # A deep copy is shared on its own: unsharing it leaves the original shared.
    clone = copy.deepcopy(model)
    tme.unshare_input_quantization(clone)
    assert shared_groups(model) and not shared_groups(clone)
    assert torch.equal(logits(model, prompt), logits(clone, prompt))


def test_incompatible_groups_are_left_alone(base, prompt, caplog):
    # fp_quant activations on a bfloat16 model run their GEMM in float32: Q_a(x R) in bfloat16 would round.
    model = quantize_linears(copy.deepcopy(base), tme.MXFP4BlockRotConfig(act_scale_rule="fp_quant")).to(torch.bfloat16)
    ref = logits(model, prompt)
    with caplog.at_level(logging.WARNING, logger="torchao_mx_ext.shared_quant"):
        assert tme.share_input_quantization(model) == 0
    assert "would round it" in caplog.text
    assert torch.equal(logits(model, prompt), ref)


def test_unknown_architecture_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(NotImplementedError, match="check_architecture=False"):
        tme.share_input_quantization(model)


def test_checkpoint_saved_in_shared_mode_is_the_per_linear_one(base, prompt, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from torchao_mx_ext.hf import save_pretrained

    config = tme.MXFP4BlockRotConfig()
    plain = quantize_linears(copy.deepcopy(base), config)
    shared = quantize_linears(copy.deepcopy(base), config)
    tme.share_input_quantization(shared)
    a = save_pretrained(plain, tmp_path / "plain", quant_config=config)
    b = save_pretrained(shared, tmp_path / "shared", quant_config=config)
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert shared_groups(shared)  # saving did not unshare the model
    reloaded = AutoModelForCausalLM.from_pretrained(b)
    assert not shared_groups(reloaded)
    assert torch.equal(logits(reloaded, prompt), logits(plain, prompt))


@pytest.mark.parametrize("rule", ["floor", "even", "rceil", "mse", "fp_quant"])
def test_requantizing_mxfp4_values(rule):
    """The claim REQUANTIZE_EXACT rests on, checked with the independent reference quantizer: quantizing
    MXFP4 values again returns them for those rules (not for fp_quant, whose 4/3 grid moves)."""
    from reference import ref_fake_quantize

    from torchao_mx_ext.shared_quant import REQUANTIZE_EXACT

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=gen) * torch.exp2(torch.randint(-135, 120, (96, 1), generator=gen).float())
    x[0] = 0.0
    x[1] = torch.linspace(-7, 7, 64)  # maxima that clip, and values on rounding ties
    once = ref_fake_quantize(x, rule)
    twice = ref_fake_quantize(once, rule)
    assert torch.equal(twice, once) == (rule in REQUANTIZE_EXACT)


@pytest.mark.parametrize("route", ["avx2", "avx512", "avx512_panels"])
def test_shared_members_feed_the_integer_gemm(base, prompt, monkeypatch, route):
    """On a CPU where W4A4 runs the integer GEMM (AVX2), the members keep their activation rule (the
    GEMM takes codes), and so they do where the GEMV's panel GEMM takes prompts (AVX-512 VNNI: it
    quantizes its input itself); with the emulation preference, or where many-row linears decode the
    weight for the library GEMM instead (other AVX-512 CPUs), they become weight-only, as on other devices."""
    from torchao_mx_ext.kernels import cpu_mxfp4_dequantize, cpu_mxfp4_gemv, cpu_mxfp4_mm, cpu_mxfp4_quantize

    monkeypatch.setattr(cpu_mxfp4_dequantize, "DENSE_FIRST", route != "avx2")
    monkeypatch.setattr(cpu_mxfp4_gemv, "PANELS", route == "avx512_panels")

    calls = []
    real = cpu_mxfp4_mm.mxfp4_mm
    monkeypatch.setattr(cpu_mxfp4_mm, "mxfp4_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    for preference in ("auto", "emulated"):
        model = quantize_linears(copy.deepcopy(base), tme.MXFP4BlockRotConfig(kernel_preference=preference))
        tme.share_input_quantization(model)
        q = model.model.layers[0].self_attn.q_proj.weight
        o = model.model.layers[0].self_attn.o_proj.weight  # not shared: as quantized
        takes = cpu_mxfp4_mm.takes_weight(o)
        assert not (takes and route != "avx2")
        keeps = takes or (route == "avx512_panels" and preference == "auto" and cpu_mxfp4_quantize.VECTORIZED)
        assert q.rotation is None and q.act_scale_rule == (o.act_scale_rule if keeps else None)
        calls.clear()
        logits(model, prompt)
        assert len(calls) == (7 * len(model.model.layers) if takes else 0)
