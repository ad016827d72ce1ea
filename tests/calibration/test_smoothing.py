"""Smoothing (SmoothQuant scales folded into norms / up_proj): the fp model is unchanged, the scales
follow the formula (float64 reference), massive channels are divided down, bad input is refused."""
import math

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from torchao_mx_ext.calibration.smoothing import SMOOTHING_ALPHA_GRID, smooth_model, smoothing_scales
from torchao_mx_ext.configs import MXFP4BlockRotConfig
from torchao_mx_ext.recipes import METHODS, quantize_model

from reference import ref_fake_quantize, ref_hadamard
from checkpoint_checks import assert_same_weights
from decoder_families import MODELS, REFUSED, SMALL, max_rel_err, randomise_biases, randomise_norms


@pytest.mark.parametrize("arch", list(MODELS))
def test_smoothing_keeps_the_fp_model(arch):
    torch.manual_seed(0)
    model = randomise_biases(randomise_norms(MODELS[arch]())).eval()  # Granite: biases on up_proj too
    ids = torch.randint(3, 96, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        before = {n: p.clone() for n, p in model.named_parameters()}
        scales = smooth_model(model, torch.randint(3, 96, (3, 16)), alpha=0.5)
        out = model(ids).logits
    assert max_rel_err(out, ref) <= 1e-4
    assert len(scales) == 3 * SMALL["num_hidden_layers"]
    assert all(a == 0.5 and bool((s > 0).all()) and not torch.allclose(s, torch.ones_like(s)) for a, s in scales.values())
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
        model = randomise_norms(MODELS["llama"]()).eval()
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


def _reference_block_rot_error(readers, x, s) -> float:
    """float64 reference of block-rot W4A4 (``mse`` rule for both sides): ``sum ||Q((x/s) R) Q((W s) R)^T
    - x W^T||^2`` with R the block-diagonal 32-wide Sylvester Hadamard."""
    x = x.to(torch.float64)
    width = x.shape[-1]
    rot = torch.block_diag(*[ref_hadamard(32)] * (width // 32)).to(torch.float64)
    xq = ref_fake_quantize(((x / s).to(torch.float32).to(torch.float64) @ rot).to(torch.float32), "mse")
    total = 0.0
    for lin in readers:
        w = lin.weight.detach().to(torch.float64)
        wq = ref_fake_quantize(((w * s).to(torch.float32).to(torch.float64) @ rot).to(torch.float32), "mse")
        total += float((xq @ wq.T - x @ w.T).pow(2).sum())
    return total


def test_alpha_search_picks_the_least_quantization_error_per_group():
    """With a grid, each group gets the alpha whose block-rot W4A4 output error (float64 reference
    quantizer) is least; the fp model is unchanged; a grid needs a config."""
    torch.manual_seed(0)
    model = randomise_norms(MODELS["llama"]()).eval()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[40] = 60.0
    calib = torch.randint(3, 96, (4, 32))
    ids = torch.randint(3, 96, (2, 24))
    inputs = {}
    layer = model.model.layers[0]
    readers = {"attention": [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
               "down_proj": [layer.mlp.down_proj]}
    hooks = [rs[0].register_forward_pre_hook(lambda m, a, k=k: inputs.setdefault(k, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for k, rs in readers.items()]
    with torch.no_grad():
        for row in calib:
            model(row.unsqueeze(0))
        fp = model(ids).logits
    for h in hooks:
        h.remove()
    expected = {}
    for name, rs in readers.items():
        x = torch.cat(inputs[name])
        w_absmax = torch.cat([lin.weight.detach().to(torch.float64) for lin in rs]).abs().amax(0)
        x_absmax = x.abs().amax(0).to(torch.float64)
        errors = {a: _reference_block_rot_error(rs, x, smoothing_scales(x_absmax, w_absmax, a)) for a in SMOOTHING_ALPHA_GRID}
        expected[name] = errors
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match="config"):
        smooth_model(model, calib, SMOOTHING_ALPHA_GRID)
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(model, calib, [0.5, 2.0], config=MXFP4BlockRotConfig())
    with pytest.raises(ValueError, match="ignored"):
        smooth_model(model, calib, 0.5, config=MXFP4BlockRotConfig())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    chosen = smooth_model(model, calib, SMOOTHING_ALPHA_GRID, config=MXFP4BlockRotConfig())
    with torch.no_grad():
        assert max_rel_err(model(ids).logits, fp) <= 1e-4
    for name, key in (("attention", "model.layers.0.self_attn.q_proj"), ("down_proj", "model.layers.0.mlp.down_proj")):
        alpha, _ = chosen[key]
        errors = expected[name]
        assert alpha in SMOOTHING_ALPHA_GRID
        # the reference's least error, up to float32-vs-float64 rounding flipping a few FP4 roundings
        assert errors[alpha] <= min(errors.values()) * 1.01, (name, alpha, errors)
    # the searched alphas differ between groups (not one global value)
    assert len({a for a, _ in chosen.values()}) > 1


def test_default_recipe_saves_and_reloads_bit_exactly(tmp_path):
    """The W4A4 default (smoothing + GPTAQ on the block Hadamard) through our ``save_pretrained`` and
    transformers' ``from_pretrained``: the smoothed norms and the MXFP4 codes come back, the logits equal."""
    from transformers import AutoModelForCausalLM

    from torchao_mx_ext.hf import save_pretrained
    from torchao_mx_ext.recipes import DEFAULT_METHOD

    torch.manual_seed(0)
    model = randomise_norms(MODELS["llama"]()).eval()
    original_norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    quantize_model(model, torch.randint(3, 96, (4, 32)))  # the default method
    assert DEFAULT_METHOD.startswith("smooth+")
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, original_norm)
    reloaded = AutoModelForCausalLM.from_pretrained(save_pretrained(model, tmp_path / "q", quant_config=None)).eval()
    ids = torch.randint(3, 96, (2, 24))
    assert_same_weights(model, reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
