"""Smoothing (SmoothQuant scales folded into norms / up_proj): the fp model is unchanged, the scales
follow the formula (float64 reference), massive channels are divided down, bad input is refused."""
import math

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from torchao_mx_ext.calibration.smoothing import smooth_model, smoothing_scales
from torchao_mx_ext.recipes import METHODS, quantize_model

from rotation.test_fusion import MODELS, REFUSED, SMALL, _max_rel_err, _randomise_biases, _randomise_norms


@pytest.mark.parametrize("arch", list(MODELS))
def test_smoothing_keeps_the_fp_model(arch):
    torch.manual_seed(0)
    model = _randomise_biases(_randomise_norms(MODELS[arch]())).eval()  # Granite: biases on up_proj too
    ids = torch.randint(3, 96, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        before = {n: p.clone() for n, p in model.named_parameters()}
        scales = smooth_model(model, torch.randint(3, 96, (3, 16)), alpha=0.5)
        out = model(ids).logits
    assert _max_rel_err(out, ref) <= 1e-4
    assert len(scales) == 3 * SMALL["num_hidden_layers"]
    assert all(bool((s > 0).all()) and not torch.allclose(s, torch.ones_like(s)) for s in scales.values())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("down_proj" in n for n in changed) and any("layernorm" in n for n in changed)


def test_scales_match_the_formula_and_shrink_a_massive_channel():
    x = torch.tensor([1.0, 2.0, 400.0, 0.0], dtype=torch.float64)
    w = torch.tensor([0.5, 0.25, 0.1, 0.3], dtype=torch.float64)
    s = smoothing_scales(x, w, 0.5)
    raw = [math.sqrt(1.0 / 0.5), math.sqrt(2.0 / 0.25), math.sqrt(400.0 / 0.1)]
    geo = math.exp(sum(math.log(v) for v in raw) / 3)
    assert s.dtype == torch.float64
    assert torch.allclose(s, torch.tensor([raw[0] / geo, raw[1] / geo, raw[2] / geo, 1.0], dtype=torch.float64), rtol=1e-10, atol=0)
    # the smoothed input x / s has a smaller range across channels than x
    live = x[:3] / s[:3]
    assert (live.max() / live.min()) < (x[:3].max() / x[:3].min())


def test_smoothing_refuses_unsupported_models_and_bad_alpha():
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)).eval()
    with pytest.raises(NotImplementedError, match="model-level rotation supports"):
        smooth_model(moe, torch.randint(3, 96, (1, 8)))
    gemma2 = REFUSED["gemma2"]().eval()
    with pytest.raises(NotImplementedError, match="post-sublayer"):
        smooth_model(gemma2, torch.randint(3, 96, (1, 8)))
    model = MODELS["llama"]().eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            smooth_model(model, torch.randint(3, 96, (1, 8)), alpha=alpha)
    with pytest.raises(ValueError):
        smooth_model(model, torch.full((1, 8), 500))  # ids outside the vocabulary
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_smooth_block_rot_lowers_w4a4_error_with_a_massive_channel():
    """A model whose MLP input has one massive channel per layer (as SmolLM2's have): smoothing before
    the block rotation lowers the W4A4 logits error against the fp model."""
    def build():
        torch.manual_seed(0)
        model = _randomise_norms(MODELS["llama"]()).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight[5] = 60.0
                layer.input_layernorm.weight[40] = 60.0
        return model

    calib = torch.randint(3, 96, (4, 32))
    ids = torch.randint(3, 96, (2, 32))
    ref = build()
    with torch.no_grad():
        fp = ref(ids).logits
        errs = {}
        for method in ("block-rot", "smooth+block-rot"):
            model = build()
            quantize_model(model, calib, method=method)
            errs[method] = (model(ids).logits - fp).pow(2).mean().item()
    assert errs["smooth+block-rot"] < 0.8 * errs["block-rot"], errs


def test_smooth_methods_need_calibration():
    assert METHODS["smooth+gptaq-block-rot"].calibrated and METHODS["smooth+gptaq-block-rot"].asymmetric
    with pytest.raises(ValueError, match="calib_ids"):
        quantize_model(MODELS["llama"]().eval(), None, method="smooth+block-rot")
