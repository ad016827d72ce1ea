"""QESC: the closed-form router fit against autograd optimality, and the layer-by-layer pipeline on a
tiny Qwen2-MoE."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from torchao_mx_ext import MXFP4BlockRotConfig, RotatedMXFP4Tensor
from torchao_mx_ext.moe.qesc import DAMP_GRID, choose_damp, fit_router_to_topk_logits, qesc_quantize, topk_agreement

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def qesc_objective(w_new, w, x_fp, x_q, k, lam):
    """The loss written out per token (independent of the package's per-expert solve), + ridge."""
    z = x_fp @ w.T
    total = 0.0
    for t in range(x_fp.shape[0]):
        for i in torch.topk(z[t], k).indices.tolist():
            total = total + (z[t, i] - w_new[i] @ x_q[t]) ** 2
    return total + sum(lam[i] * ((w_new[i] - w[i]) ** 2).sum() for i in range(w.shape[0]))


def test_fit_is_the_minimiser_of_the_written_out_loss():
    torch.manual_seed(0)
    e, d, t, k = 6, 12, 80, 3
    w = torch.randn(e, d, dtype=torch.float64)
    x_fp = torch.randn(t, d, dtype=torch.float64)
    x_q = x_fp + 0.3 * torch.randn(t, d, dtype=torch.float64)  # a quantized model's shifted inputs
    damp = 0.01
    fitted = fit_router_to_topk_logits(w, x_fp, x_q, k, damp)
    # the ridge weights the package uses, recomputed here from their definition
    z = x_fp @ w.T
    top = torch.zeros(t, e, dtype=torch.bool).scatter_(1, z.topk(k, dim=1).indices, True)
    lam = [damp * float((x_q[top[:, i]] ** 2).sum(0).mean()) for i in range(e)]
    w_var = fitted.clone().requires_grad_(True)
    loss = qesc_objective(w_var, w, x_fp, x_q, k, lam)
    (grad,) = torch.autograd.grad(loss, w_var)
    assert grad.abs().max() < 1e-8 * float(loss.detach())  # stationary point of a convex quadratic: its minimum
    w_start = w.clone().requires_grad_(True)
    (grad_start,) = torch.autograd.grad(qesc_objective(w_start, w, x_fp, x_q, k, lam), w_start)
    assert grad_start.abs().max() > 1e-2 * float(loss.detach())  # the check above can fail
    assert qesc_objective(fitted, w, x_fp, x_q, k, lam) < qesc_objective(w, w, x_fp, x_q, k, lam)


def test_fit_keeps_the_router_when_inputs_did_not_move():
    w = torch.randn(8, 16)
    x = torch.randn(50, 16)
    torch.testing.assert_close(fit_router_to_topk_logits(w, x, x, 4), w, rtol=1e-5, atol=1e-6)


def tiny_moe():
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, qkv_bias=False, max_position_embeddings=128,
    )
    model = Qwen2MoeForCausalLM(config).eval()
    with torch.no_grad():  # spread the router logits like a trained router's
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def test_qesc_raises_agreement_and_quantizes_everything():
    fp = tiny_moe()
    calib = torch.randint(0, 128, (8, 32))
    held_out = torch.randint(0, 128, (4, 32))
    with_qesc, without = copy.deepcopy(fp), copy.deepcopy(fp)
    config = MXFP4BlockRotConfig()
    report = qesc_quantize(with_qesc, calib, config, k_loss=6, damp=0.01, progress=False)
    baseline = qesc_quantize(without, calib, config, calibrate_routers=False, progress=False)
    # identical pipeline up to the router fit: same "before" agreement, the fit only raises it
    assert report.agreement_before[0] == baseline.agreement_before[0]
    assert all(a >= b for a, b in zip(report.agreement_after, report.agreement_before))
    assert sum(report.agreement_after) > sum(report.agreement_before)
    for layer_fp, layer_q in zip(fp.model.layers, without.model.layers):
        assert torch.equal(layer_fp.mlp.gate.weight, layer_q.mlp.gate.weight)  # baseline: routers untouched
    for model in (with_qesc, without):
        experts = model.model.layers[0].mlp.experts
        assert isinstance(experts.gate_up_proj, RotatedMXFP4Tensor)
        assert isinstance(model.model.layers[2].self_attn.q_proj.weight, RotatedMXFP4Tensor)
        assert not isinstance(model.model.layers[0].mlp.gate.weight, RotatedMXFP4Tensor)  # router stays fp
    # on held-out tokens too, the re-fitted routers agree more with the full-precision ones
    assert topk_agreement(fp, with_qesc, held_out)["mean"] > topk_agreement(fp, without, held_out)["mean"]
    assert topk_agreement(fp, fp, held_out)["mean"] == 1.0


def held_out_agreement(w_fitted, w, x_fp, x_q, top_k):
    """Mean |top-k(W x_fp) & top-k(W' x_q)| / k over tokens, written with Python sets."""
    ref = (x_fp @ w.T).topk(top_k, dim=1).indices.tolist()
    got = (x_q @ w_fitted.T).topk(top_k, dim=1).indices.tolist()
    return sum(len(set(a) & set(b)) for a, b in zip(ref, got)) / (top_k * len(ref))


def shifted_router_inputs(t=600, d=16, e=8, seed=0):
    """Router weight and inputs where quantization applied a fixed distortion (learnable) plus noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, d, generator=g, dtype=torch.float64)
    x_fp = torch.randn(t, d, generator=g, dtype=torch.float64)
    distortion = torch.eye(d, dtype=torch.float64) + 0.4 * torch.randn(d, d, generator=g, dtype=torch.float64)
    x_q = x_fp @ distortion + 0.05 * torch.randn(t, d, generator=g, dtype=torch.float64)
    return w, x_fp, x_q


def test_choose_damp_takes_the_best_held_out_fit():
    w, x_fp, x_q = shifted_router_inputs()
    held = torch.arange(x_fp.shape[0]) >= 450
    k_loss, top_k = 4, 2
    chosen = choose_damp(w, x_fp, x_q, k_loss, top_k, held)
    scores = {None: held_out_agreement(w, w, x_fp[held], x_q[held], top_k)}
    for damp in DAMP_GRID:
        fitted = fit_router_to_topk_logits(w, x_fp[~held], x_q[~held], k_loss, damp)
        scores[damp] = held_out_agreement(fitted, w, x_fp[held], x_q[held], top_k)
    assert chosen is not None  # the distortion is learnable: a fit beats the unchanged router
    assert scores[chosen] == max(scores.values()) > scores[None]
    assert chosen == max(d for d in DAMP_GRID if scores[d] == scores[chosen])  # ties go to the larger ridge


def test_choose_damp_keeps_the_router_when_held_out_inputs_did_not_move():
    w, x_fp, x_q = shifted_router_inputs()
    held = torch.arange(x_fp.shape[0]) >= 450
    x_q = torch.where(held[:, None], x_fp, x_q)  # held-out tokens unshifted: the old router is exact there
    assert choose_damp(w, x_fp, x_q, 4, 2, held) is None
    with pytest.raises(ValueError, match="held_out must mark some"):
        choose_damp(w, x_fp, x_q, 4, 2, torch.zeros(x_fp.shape[0], dtype=torch.bool))


def test_qesc_auto_damp_reports_its_choice_per_layer():
    fp = tiny_moe()
    model = copy.deepcopy(fp)
    report = qesc_quantize(model, torch.randint(0, 128, (8, 32)), MXFP4BlockRotConfig(), k_loss=6, progress=False)
    assert len(report.damp) == len(report.agreement_after) == 3
    for damp, layer_fp, layer_q in zip(report.damp, fp.model.layers, model.model.layers):
        assert damp is None or damp in DAMP_GRID
        assert torch.equal(layer_fp.mlp.gate.weight, layer_q.mlp.gate.weight) == (damp is None)
    baseline = qesc_quantize(copy.deepcopy(fp), torch.randint(0, 128, (8, 32)), MXFP4BlockRotConfig(),
                             calibrate_routers=False, progress=False)
    assert baseline.damp == [None, None, None]


def test_dense_model_is_a_clear_error():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError, match="no MoE"):
        qesc_quantize(model, torch.randint(0, 64, (2, 8)), MXFP4BlockRotConfig(), progress=False)
