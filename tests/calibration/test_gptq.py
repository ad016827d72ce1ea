"""GPTQ for MXFP4: the package against an independent float64 OBS-form reference, RTN limits,
error reduction, and the prepare -> calibrate -> convert flow through ``quantize_``."""

import copy
import logging

import numpy as np
import pytest
import torch
from torchao.core.config import config_from_dict, config_to_dict
from torchao.quantization import quantize_
from transformers import LlamaConfig, LlamaForCausalLM

from reference import ref_quantize, rne_e2m1
from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config, RotatedMXFP4Tensor, configs
from torchao_mx_ext.calibration import GPTQConfig, MXFP4GPTQConfig, gptq_mxfp4, static_group_exponents
from torchao_mx_ext.calibration.gptq import OBSERVER_ATTR
from torchao_mx_ext.mx import e2m1_to_code, mxfp4_dequantize, mxfp4_quantize, unpack_uint4
from torchao_mx_ext.rotation import rotation_block

RULES = ["floor", "even", "rceil", "fp_quant", "mse"]


# ---------------------------------------------------------------------------------------------
# independent reference: Optimal Brain Surgeon form (explicit H^-1 and Gaussian elimination,
# one column at a time, no Cholesky, no lazy batches), float64
# ---------------------------------------------------------------------------------------------
def reference_gptq(weight, hessian, rule, damp=0.01, act_order=True, block=32):
    """-> (E2M1 values float64 [N, K], exponents int64 [N, K/block]).

    Follows the package's documented float arithmetic where it matters for ties: the element is
    rounded from the float32 value of the current weight (as mxfp4_quantize rounds float32 weights)
    and the error is taken against the float32 dequantized value (fp_quant: 2^e * fl32(4/3)).
    """
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    n, k = w.shape
    for i in range(k):
        if h[i, i] == 0:  # dead input
            h[i, i] = 1.0
            w[:, i] = 0.0
    exps = ref_quantize(w.float(), rule, block)[1]  # static groups, from the whole weight
    key = [float(h[i, i]) for i in range(k)]
    h = h + damp * (sum(key) / k) * torch.eye(k, dtype=torch.float64)
    order = sorted(range(k), key=lambda j: -key[j]) if act_order else list(range(k))  # sorted is stable
    hinv = torch.linalg.inv(h)
    deq_mult = float(np.float32(4.0 / 3.0)) if rule == "fp_quant" else 1.0
    values = torch.zeros(n, k, dtype=torch.float64)
    for j in order:
        e = exps[:, j // block].to(torch.float64)
        v = w[:, j].float().double() * 2.0 ** (-e)
        if rule == "fp_quant":
            v = (v * 0.75).float().double()
        q = torch.from_numpy(rne_e2m1(v.numpy()))
        dq = (q * 2.0**e * deq_mult).float().double()
        err = (w[:, j] - dq) / hinv[j, j]
        w -= torch.outer(err, hinv[j])  # OBS: delta_F = -err * [H_F^-1]_{j,F}
        hinv -= torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]  # remove j from H_F^-1
        values[:, j] = q
    return values, exps


def correlated_inputs(rows, k, seed, outliers=True):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.6 * torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(rows, k, generator=g) @ mix
    if outliers:  # a few strong channels, as in LLM activations
        x[:, torch.randperm(k, generator=g)[: max(1, k // 16)]] *= 8.0
    return x


def hessian_of(x):
    return 2.0 / x.shape[0] * x.double().T @ x.double()


def codes_of(qdata):
    return unpack_uint4(qdata)


# ---------------------------------------------------------------------------------------------
# (a) package == reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n,k,act_order,column_block,dead", [(16, 64, True, 128, False), (24, 128, True, 48, True), (24, 128, False, 32, False)])
def test_matches_float64_obs_reference_bit_exact(rule, n, k, act_order, column_block, dead):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.05
    h = hessian_of(correlated_inputs(3 * k, k, seed=k))
    if dead:
        idx = torch.tensor([3, 40, 41, 100])
        h[idx, :] = 0
        h[:, idx] = 0
    qdata, scale = gptq_mxfp4(w, h, 32, rule, 0.01, column_block, act_order, compute_dtype=torch.float64)
    ref_values, ref_exps = reference_gptq(w, h, rule, 0.01, act_order)
    assert qdata.shape == (n, k // 2) and qdata.dtype == torch.uint8
    assert scale.shape == (n, k // 32) and scale.dtype == torch.uint8
    assert torch.equal(scale.to(torch.int64) - 127, ref_exps)
    # Cholesky + lazy batches vs explicit inverse + elimination differ by ~1e-15 relative; no
    # element lands that close to an E2M1 rounding boundary, so the codes agree exactly.
    assert torch.equal(codes_of(qdata), e2m1_to_code(ref_values.float()))
    # GPTQ really moved elements away from RTN on these correlated Hessians
    rtn_codes = codes_of(mxfp4_quantize(torch.where(h.diagonal() == 0, 0.0, w), 32, rule)[0])
    assert (codes_of(qdata) != rtn_codes).float().mean() > 0.05


def test_float32_loop_tracks_float64():
    w = torch.randn(32, 128) * 0.05
    x = correlated_inputs(512, 128, seed=1)
    h = hessian_of(x)
    q32, s32 = gptq_mxfp4(w, h, scale_rule="floor", compute_dtype=torch.float32)
    q64, s64 = gptq_mxfp4(w, h, scale_rule="floor", compute_dtype=torch.float64)
    assert torch.equal(s32, s64)  # scales never depend on the loop
    assert (codes_of(q32) == codes_of(q64)).float().mean() > 0.97


# ---------------------------------------------------------------------------------------------
# (b) no correlation -> RTN on the static scales
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_identity_hessian_is_rtn(rule):
    w = torch.randn(24, 96) * 0.1
    expected = mxfp4_quantize(w, 32, rule)
    got = gptq_mxfp4(w, torch.eye(96), scale_rule=rule, act_order=False)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # a diagonal (uncorrelated) Hessian propagates nothing either, whatever the column order
    diag = torch.diag(torch.rand(96) + 0.1)
    got = gptq_mxfp4(w, diag, scale_rule=rule, act_order=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_output_holds_in_rotated_tensor():
    w = torch.randn(8, 64)
    qdata, scale = gptq_mxfp4(w, hessian_of(correlated_inputs(256, 64, 2)), scale_rule="mse")
    t = RotatedMXFP4Tensor(qdata, scale, 32, "mse", None, 64, torch.float32)
    torch.testing.assert_close(t.dequantize(), mxfp4_dequantize(qdata, scale, 32, "mse"))
    assert (t.dequantize() - w).abs().max() < w.abs().max()


# ---------------------------------------------------------------------------------------------
# (c) GPTQ lowers the layer's output error
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["floor", "mse", "fp_quant"])
def test_output_error_below_rtn(rule):
    k, n = 128, 64
    x = correlated_inputs(1024, k, seed=3)
    w = torch.randn(n, k) * 0.05
    h = hessian_of(x)
    ref = x.double() @ w.double().T

    def err(qdata, scale):
        wq = mxfp4_dequantize(qdata, scale, 32, rule).double()
        return float((ref - x.double() @ wq.T).norm())

    rtn = err(*mxfp4_quantize(w, 32, rule))
    plain = err(*gptq_mxfp4(w, h, scale_rule=rule, act_order=False))
    ordered = err(*gptq_mxfp4(w, h, scale_rule=rule, act_order=True))
    shrunk = err(*gptq_mxfp4(w, h, scale_rule=rule, act_order=True, mse_shrink=True))
    # measured (floor / mse / fp_quant): plain 0.79-0.80, act-order 0.70-0.72, + shrink 0.65-0.70 of RTN
    assert plain < 0.85 * rtn and ordered < 0.8 * rtn and shrunk < 0.8 * rtn, (rtn, plain, ordered, shrunk)
    assert ordered < plain  # act-order matters with outlier channels


def test_mse_shrink_lowers_group_weighted_error():
    k, n = 128, 64
    h = hessian_of(correlated_inputs(512, k, seed=4))
    w = torch.randn(n, k) * 0.05
    w[:, ::7] *= 6  # heavy-tailed groups, where the rule's exponent is not the best one

    def group_error(e):  # sum over groups of d_g H_gg d_g^T, RTN on exponents e (reference rounding)
        scale = torch.pow(2.0, e.double()).repeat_interleave(32, 1)
        values = torch.from_numpy(rne_e2m1((w.double() / scale).numpy()))
        d = (w.double() - values * scale).reshape(n, k // 32, 32)
        hg = torch.stack([h[i * 32:(i + 1) * 32, i * 32:(i + 1) * 32] for i in range(k // 32)])
        return float(torch.einsum("ngi,gij,ngj->", d, hg, d))

    base = static_group_exponents(w, 32, "floor")
    shrunk = static_group_exponents(w, 32, "floor", mse_shrink=True, hessian=h)
    assert (shrunk != base).any() and ((shrunk - base).abs() <= 1).all()
    assert group_error(shrunk) < group_error(base)


# ---------------------------------------------------------------------------------------------
# (d) prepare -> calibrate -> convert
# ---------------------------------------------------------------------------------------------
def _calibrate(model, batches):
    with torch.no_grad():
        for b in batches:
            model(b)


@pytest.mark.parametrize("base", [MXFP4BlockRotConfig(), MXFP4Config(act_quant=False, scale_rule="floor")])
def test_prepare_convert_sequential(base, caplog):
    configs.reset_padding_reports()  # report_padding warns once per width and process
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(80, 48), torch.nn.GELU(), torch.nn.Linear(48, 40)).eval()
    batches = [correlated_inputs(128, 80, seed=s).reshape(4, 32, 80) for s in range(4)]
    x_all = torch.cat(batches).reshape(-1, 80)
    with torch.no_grad():
        ref = model(x_all)
    rtn = copy.deepcopy(model)
    quantize_(rtn, base)

    with caplog.at_level(logging.WARNING):
        quantize_(model, MXFP4GPTQConfig(base=base, step="prepare"))
    assert "input width 80" in caplog.text
    _calibrate(model, batches)
    obs = getattr(model[0], OBSERVER_ATTR)
    assert obs.count == x_all.shape[0]
    # H is built from the inputs exactly as the stored weight will see them: x R, padded
    xr = rtn[0].weight.rotate_input(x_all)
    assert torch.equal(obs.rotate(x_all), xr)
    expected = 2.0 / xr.shape[0] * xr.double().T @ xr.double()
    # float32 accumulation over 512 rows vs float64
    torch.testing.assert_close(obs.hessian(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))

    quantize_(model, MXFP4GPTQConfig(base=base, step="convert"))
    for i in (0, 2):
        wq = model[i].weight
        assert isinstance(wq, RotatedMXFP4Tensor) and wq.shape == rtn[i].weight.shape
        assert wq.act_scale_rule == base.activation_scale_rule and wq.scale_rule == base.scale_rule
        if base.rotation == "identity":
            assert wq.rotation is None
        else:  # the one shared block, not a copy
            shared = rotation_block(base.rotation, base.rotation_size, base.seed)
            assert wq.rotation.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
        assert not hasattr(model[i], OBSERVER_ATTR) and not model[i]._forward_pre_hooks
        assert "mxfp4(" in repr(model[i])
    with torch.no_grad():
        gptq_err = float((model(x_all) - ref).norm())
        rtn_err = float((rtn(x_all) - ref).norm())
    assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)


def test_prepare_convert_tiny_llama():
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    calib = [torch.randint(0, 128, (4, 32)) for _ in range(4)]
    held_out = torch.randint(0, 128, (4, 32))
    with torch.no_grad():
        ref_calib = torch.cat([model(ids).logits for ids in calib])
        ref_held = model(held_out).logits
    base = MXFP4BlockRotConfig()
    rtn = copy.deepcopy(model)
    quantize_(rtn, base)

    quantize_(model, MXFP4GPTQConfig(base=base, step="prepare"))
    _calibrate(model, calib)
    quantize_(model, MXFP4GPTQConfig(base=base, step="convert"))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 15 and all(isinstance(m.weight, RotatedMXFP4Tensor) for m in linears)
    with torch.no_grad():
        g_calib = torch.cat([model(ids).logits for ids in calib])
        r_calib = torch.cat([rtn(ids).logits for ids in calib])
        g_held, r_held = model(held_out).logits, rtn(held_out).logits
    assert g_calib.isfinite().all()
    # W4A4: activation error (the same for both) dilutes the gain; measured 0.88-0.91 over seeds 0-2
    assert (g_calib - ref_calib).norm() < 0.95 * (r_calib - ref_calib).norm()
    assert (g_held - ref_held).norm() < (r_held - ref_held).norm()


def test_config_round_trips_through_torchao_serialisation():
    cfg = MXFP4GPTQConfig(base=MXFP4BlockRotConfig(scale_rule="floor"), step="convert", mse_shrink=True)
    back = config_from_dict(config_to_dict(cfg))
    assert type(back) is MXFP4GPTQConfig and back == cfg


def test_deprecated_gptq_config_name_still_works_and_warns():
    """``GPTQConfig``, the former name: a DeprecationWarning pointing at the caller, the same handler,
    the same weights bit for bit, and it still round-trips through torchao's serialisation."""
    base = MXFP4BlockRotConfig(scale_rule="floor")
    with pytest.warns(DeprecationWarning, match="use MXFP4GPTQConfig") as record:
        old_prepare = GPTQConfig(base=base, step="prepare")
    assert record[0].filename == __file__
    assert isinstance(old_prepare, MXFP4GPTQConfig)
    with pytest.warns(DeprecationWarning):
        old_convert = GPTQConfig(base=base, step="convert")
    with pytest.warns(DeprecationWarning):
        back = config_from_dict(config_to_dict(old_convert))
    assert type(back) is GPTQConfig and back == old_convert

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)).eval()
    twin = copy.deepcopy(model)
    batches = [correlated_inputs(64, 64, seed=s) for s in range(2)]
    for m, (prepare, convert) in (
        (model, (old_prepare, old_convert)),
        (twin, (MXFP4GPTQConfig(base=base, step="prepare"), MXFP4GPTQConfig(base=base, step="convert"))),
    ):
        quantize_(m, prepare)
        _calibrate(m, batches)
        quantize_(m, convert)
    for i in (0, 2):
        old_w, new_w = model[i].weight, twin[i].weight
        assert isinstance(old_w, RotatedMXFP4Tensor)
        assert torch.equal(old_w.qdata, new_w.qdata) and torch.equal(old_w.scale, new_w.scale)


# ---------------------------------------------------------------------------------------------
# (e) bad input
# ---------------------------------------------------------------------------------------------
def test_gptq_function_rejects_bad_input():
    w, h = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(ValueError, match="multiple of block_size"):
        gptq_mxfp4(torch.randn(8, 40), torch.eye(40))
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_mxfp4(w, torch.eye(32))
    with pytest.raises(ValueError, match="2-D"):
        gptq_mxfp4(torch.randn(64), h)
    with pytest.raises(ValueError, match="NaN"):
        gptq_mxfp4(torch.full((8, 64), float("nan")), h)
    with pytest.raises(ValueError, match="NaN"):
        gptq_mxfp4(w, torch.full((64, 64), float("inf")))
    with pytest.raises(ValueError, match="damp"):
        gptq_mxfp4(w, h, damp=-0.1)
    with pytest.raises(ValueError, match="column_block"):
        gptq_mxfp4(w, h, column_block=0)
    with pytest.raises(ValueError, match="scale rule"):
        gptq_mxfp4(w, h, scale_rule="ceil")
    with pytest.raises(ValueError, match="positive definite"):
        gptq_mxfp4(w, -torch.eye(64) + 0.0, damp=0.0)
    qt = RotatedMXFP4Tensor.from_hp(w)
    with pytest.raises(TypeError, match="plain"):
        gptq_mxfp4(qt, h)


def test_config_rejects_bad_use():
    with pytest.raises(TypeError, match="base="):
        MXFP4GPTQConfig(step="prepare")
    with pytest.raises(ValueError, match="step"):
        MXFP4GPTQConfig(base=MXFP4Config(), step="observe")
    with pytest.raises(ValueError, match="compute_dtype"):
        MXFP4GPTQConfig(base=MXFP4Config(), compute_dtype="bfloat16")
    assert MXFP4GPTQConfig(base=MXFP4Config(), step="PREPARE").step == "prepare"

    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(ValueError, match="not prepared"):
        quantize_(lin, MXFP4GPTQConfig(base=MXFP4Config(), step="convert"))
    quantize_(lin, MXFP4GPTQConfig(base=MXFP4Config(), step="prepare"))
    with pytest.raises(ValueError, match="already prepared"):
        quantize_(lin, MXFP4GPTQConfig(base=MXFP4Config(), step="prepare"))
    with pytest.raises(ValueError, match="saw no calibration data"):
        quantize_(lin, MXFP4GPTQConfig(base=MXFP4Config(), step="convert"))
    _calibrate(lin, [torch.randn(16, 64)])
    with pytest.raises(ValueError, match="another rotation"):
        quantize_(lin, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(), step="convert"))
    quantize_(lin, MXFP4GPTQConfig(base=MXFP4Config(), step="convert"))
    assert isinstance(lin[0].weight, RotatedMXFP4Tensor)
    with pytest.raises(ValueError, match="already MXFP4-quantized"):
        quantize_(lin, MXFP4GPTQConfig(base=MXFP4Config(), step="convert"))
    with pytest.raises(TypeError, match="already quantized"):
        quantize_(lin, MXFP4GPTQConfig(base=MXFP4Config(), step="prepare"))


# ---------------------------------------------------------------------------------------------
# (d) on a real SmolLM2-135M layer, with real WikiText-2 activations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("linear,rotate", [("self_attn.q_proj", False), ("mlp.down_proj", True)])
def test_real_smollm2_layer_hessian_weighted_error_below_rtn(linear, rotate, shared_data):
    """GPTQ's objective, tr((W - Q) H (W - Q)^T), measured in float64 on calibration inputs of a real
    layer and on held-out inputs of the same corpus: GPTQ must beat RTN on both (measured: q_proj
    0.19x / 0.25x, down_proj 0.42x / 0.63x of RTN's error)."""
    from torchao_mx_ext.calibration.data import calibration_ids
    from torchao_mx_ext.zoo import load_model

    model, tok = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:6]  # only layer 5's inputs are needed
    module = model.model.layers[5].get_submodule(linear)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        # 8192 calibration rows, several times the widest input (1536): with n ~ K rows GPTQ fits the
        # calibration set and loses to RTN on held-out down_proj rows (measured at n = 2048).
        # Held out: other WikiText-2 windows. (Across corpora it need not hold: calibrated on
        # WikiText-2, down_proj's error on TinyStories was 1.16x RTN's, q_proj's 0.49x.)
        for source, n, seed in (("wikitext2", 16, 0), ("wikitext2", 2, 1)):
            model(calibration_ids(tok, source, n_samples=n, seq_len=512, seed=seed, data_dir=shared_data))
    handle.remove()
    x_cal, x_held = seen
    w = module.weight.detach()
    k = w.shape[1]
    r = rotation_block("hadamard", 32).double() if rotate else None

    def rotated(x):
        x = x.double()
        return x if r is None else (x.reshape(-1, k // 32, 32) @ r).reshape(x.shape)

    def weighted_error(wq, x):
        d = rotated(w) - wq.double()
        xr = rotated(x)
        return float(((xr @ d.T) ** 2).sum())

    h = hessian_of(rotated(x_cal))
    rtn = mxfp4_dequantize(*mxfp4_quantize(rotated(w).float(), 32, "mse"), 32, "mse")
    gptq = mxfp4_dequantize(*gptq_mxfp4(rotated(w).float(), h, scale_rule="mse"), 32, "mse")
    for x in (x_cal, x_held):
        assert weighted_error(gptq, x) < 0.9 * weighted_error(rtn, x), (linear, weighted_error(gptq, x), weighted_error(rtn, x))


def test_gptq_weights_keep_the_configs_kernel_preference():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    base = MXFP4Config(kernel_preference="emulated")
    quantize_(model, MXFP4GPTQConfig(base=base, step="prepare"))
    with torch.no_grad():
        model(torch.randn(16, 64))
    quantize_(model, MXFP4GPTQConfig(base=base, step="convert"))
    assert model[0].weight.kernel_preference == "emulated"


# ---------------------------------------------------------------------------------------------
# (e) asymmetric calibration (GPTAQ)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_asymmetric_target_is_ridge_least_squares_towards_w(damp):
    """W* minimises 2/n ||X~ V^T - X W^T||^2 + lambda ||V - W||^2, lambda = damp * mean(diag H):
    checked against numpy's lstsq of the stacked system [X~; sqrt(n lambda / 2) I] V^T = [X W^T; sqrt(n lambda / 2) W^T]."""
    from torchao_mx_ext.calibration.gptq import asymmetric_target

    n, k, out = 400, 48, 12
    x = correlated_inputs(n, k, seed=3).double()
    g = torch.Generator().manual_seed(4)
    x_tilde = x + 0.3 * torch.randn(n, k, generator=g, dtype=torch.float64)  # the drifted inputs
    w = torch.randn(out, k, generator=g, dtype=torch.float64)
    h = 2.0 / n * x_tilde.T @ x_tilde
    c = 2.0 / n * x_tilde.T @ x
    got = asymmetric_target(w, h, c, damp)
    lam = damp * float(torch.diagonal(h).mean())
    a = np.concatenate([x_tilde.numpy(), np.sqrt(n * lam / 2) * np.eye(k)])
    b = np.concatenate([(x @ w.T).numpy(), np.sqrt(n * lam / 2) * w.T.numpy()])
    ref = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-8, atol=1e-8)
    if damp == 0.0:  # the plain least-squares fit reproduces X W^T better from X~ than W itself does
        assert (x_tilde @ got.T - x @ w.T).norm() < 0.9 * (x_tilde @ w.T - x @ w.T).norm()


def test_asymmetric_gptq_is_plain_gptq_when_nothing_drifts():
    """Weight-only and no reference stream: X~_q = X, so C = H bit for bit and the correction is zero."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    batches = [correlated_inputs(96, 64, seed=s) for s in range(3)]
    results = []
    for asymmetric in (False, True):
        m = copy.deepcopy(model)
        base = MXFP4BlockRotConfig(act_quant=False)
        quantize_(m, MXFP4GPTQConfig(base=base, step="prepare", asymmetric=asymmetric))
        _calibrate(m, batches)
        if asymmetric:
            obs = getattr(m[0], OBSERVER_ATTR)
            assert torch.equal(obs.cross(), obs.hessian())
        quantize_(m, MXFP4GPTQConfig(base=base, step="convert", asymmetric=asymmetric))
        results.append(m[0].weight)
    assert torch.equal(results[0].qdata, results[1].qdata) and torch.equal(results[0].scale, results[1].scale)


def test_asymmetric_gptq_lowers_w4a4_error_against_the_full_precision_output():
    """W4A4: the asymmetric Hessian is taken on Q_a(x R), and the target is x W^T. On held-out rows the
    W4A4 layer's error against the full-precision output must fall below plain GPTQ's (held-out rows of
    the same distribution; the least-squares fit of the quantization noise needs rows >> width: with
    8x the width the in-sample gain (10%) did not carry over, with 48x it does)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64)).eval()
    rows = correlated_inputs(8192, 128, seed=0)
    batches, held_out = list(rows[:6144].split(1024)), rows[6144:]
    with torch.no_grad():
        ref = model(held_out)
    errors = {}
    for asymmetric in (False, True):
        m = copy.deepcopy(model)
        quantize_(m, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(), step="prepare", asymmetric=asymmetric))
        _calibrate(m, batches)
        if asymmetric:
            obs = getattr(m[0], OBSERVER_ATTR)  # (the full target here: asymmetric_alpha=1 below)
            xr = obs.rotate(torch.cat(batches))
            xq = mxfp4_dequantize(*mxfp4_quantize(xr, 32, "mse"), 32, "mse", torch.float32)  # what W4A4 consumes
            torch.testing.assert_close(obs.hessian(), hessian_of(xq), rtol=1e-5, atol=1e-6 * float(hessian_of(xq).abs().max()))
            torch.testing.assert_close(obs.cross(), 2.0 / xr.shape[0] * xq.double().T @ xr.double(), rtol=1e-5, atol=1e-3)
        quantize_(m, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(), step="convert", asymmetric=asymmetric, asymmetric_alpha=1.0))
        with torch.no_grad():
            errors[asymmetric] = float((m(held_out) - ref).norm())
    assert errors[True] < 0.98 * errors[False], errors


def test_asymmetric_alpha_zero_is_plain_gptq_and_range_is_checked():
    """alpha scales the correction W* - W: alpha = 0 gives plain GPTQ's codes bit for bit on drifted
    inputs, alpha = 1 does not; alpha outside [0, 1] is refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    rows = correlated_inputs(2048, 64, seed=1)
    drifted = rows + 0.2 * torch.randn_like(rows)
    codes = {}
    for key, kw in {"gptq": {}, "a0": dict(asymmetric=True, asymmetric_alpha=0.0), "a1": dict(asymmetric=True, asymmetric_alpha=1.0)}.items():
        m = copy.deepcopy(model)
        quantize_(m, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(act_quant=False), step="prepare", **kw))
        obs = getattr(m[0], OBSERVER_ATTR)
        with torch.no_grad():
            for ref, x in zip(rows.split(512), drifted.split(512)):
                if kw:
                    obs.record_reference(True)
                    m(ref)
                    obs.record_reference(False)
                m(x)
        quantize_(m, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(act_quant=False), step="convert", **kw))
        codes[key] = m[0].weight.qdata.clone()
    assert torch.equal(codes["a0"], codes["gptq"])
    assert not torch.equal(codes["a1"], codes["gptq"])
    for bad in (-0.1, 1.5):
        with pytest.raises((ValueError, TypeError), match="asymmetric_alpha"):
            MXFP4GPTQConfig(base=MXFP4BlockRotConfig(), asymmetric=True, asymmetric_alpha=bad)


def test_asymmetric_observer_pairs_reference_rows():
    """The reference stream's rows are kept and paired with the next call's; mismatches are errors."""
    from torchao_mx_ext.calibration.gptq import HessianObserver

    obs = HessianObserver(32, 32, None, torch.float64, "cpu", asymmetric=True, act_quant=None)
    x_ref, x_q = torch.randn(10, 32, dtype=torch.float64), torch.randn(10, 32, dtype=torch.float64)
    obs.record_reference(True)
    obs.update(x_ref)
    with pytest.raises(RuntimeError, match="two reference passes"):
        obs.update(x_ref)
    obs.record_reference(False)
    obs.update(x_q)
    assert obs.count == 10
    torch.testing.assert_close(obs.cross(), 2.0 / 10 * x_q.float().double().T @ x_ref.float().double())
    torch.testing.assert_close(obs.hessian(), 2.0 / 10 * x_q.float().double().T @ x_q.float().double())
    obs.record_reference(True)
    obs.update(x_ref)
    obs.record_reference(False)
    with pytest.raises(RuntimeError, match="do not pair"):
        obs.update(x_q[:5])
    with pytest.raises(ValueError, match="only used by asymmetric"):
        HessianObserver(32, 32, None, torch.float32, "cpu").record_reference(True)
    with pytest.raises(TypeError, match="asymmetric"):
        MXFP4GPTQConfig(base=MXFP4Config(), asymmetric=1)
