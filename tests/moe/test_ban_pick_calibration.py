"""Ban&Pick calibration (key experts, layer sensitivity) against a per-token reference computed from the
expert weights directly."""
import pytest
import torch
import torch.nn.functional as F

from _router_tiny_models import NUM_EXPERTS, VOCAB, build_tiny
from torchao_mx_ext.moe.adapters import adapter_for_router, find_moe_blocks
from torchao_mx_ext.moe.ban_pick import ban_pick_config_from_statistics, calibrate_ban_pick, measure_ban_pick_statistics
from torchao_mx_ext.moe.router_configs import PESFConfig, apply_router_pass
from torchao_mx_ext.moe.router_pass import installed_passes
from torchao_mx_ext.moe.routing_stats import measure_active_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _calib_ids(batch=3, seq=16):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(7))


def _expert(experts, e, x):
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def _reference_statistics(model, ids):
    """Per layer: (frequency, key score, sensitivity at k_min = 1, logit std), token by token."""
    blocks = find_moe_blocks(model)
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o)))
               for i, (_, b, _) in enumerate(blocks)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    result = []
    for i, (_, block, _) in enumerate(blocks):
        x, y = seen[i]
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        with torch.no_grad():
            logits, w, idx = adapter_for_router(block.gate).router_class.forward(block.gate, x)
        selections, effect = torch.zeros(NUM_EXPERTS, dtype=torch.float64), torch.zeros(NUM_EXPERTS, dtype=torch.float64)
        error = energy = 0.0
        with torch.no_grad():
            for t in range(x.shape[0]):
                e_t = y[t].double().pow(2).sum().item()
                energy += e_t
                outs = [w[t, j] * _expert(block.experts, int(idx[t, j]), x[t]) for j in range(idx.shape[1])]
                for j, out in enumerate(outs):
                    selections[int(idx[t, j])] += 1
                    effect[int(idx[t, j])] += out.double().pow(2).sum().item() / e_t
                top = int(torch.argmax(w[t]))  # k_min = 1: the top expert alone, carrying the whole weight
                only_top = w[t].sum() * _expert(block.experts, int(idx[t, top]), x[t])
                error += (only_top - sum(outs)).double().pow(2).sum().item()
        tokens = x.shape[0]
        result.append((selections / tokens, effect / tokens, error / energy, logits.double().std(unbiased=False).item()))
    return result


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_statistics_match_a_per_token_reference(arch):
    model = build_tiny(arch)
    ids = _calib_ids()
    reference = _reference_statistics(model, ids)
    stats = measure_ban_pick_statistics(model, ids, k_min=1, batch_size=2)  # two forwards: streamed sums
    assert stats.tokens == ids.numel()
    for layer, (freq, score, sensitivity, logit_std) in enumerate(reference):
        fqn = f"model.layers.{layer}.mlp.gate"
        torch.testing.assert_close(stats.frequency[fqn].double(), freq)
        torch.testing.assert_close(stats.key_score[fqn].double(), score, rtol=1e-4, atol=1e-7)
        assert stats.sensitivity[fqn] == pytest.approx(sensitivity, rel=1e-4)
        assert stats.logit_std[fqn] == pytest.approx(logit_std, rel=1e-4)
        assert 0 < stats.sensitivity[fqn]

    config = ban_pick_config_from_statistics(stats, num_picks=2, boost=0.5, tau_min=0.7, tau_max=0.9)
    sens = [r[2] for r in reference]
    most, least = int(torch.tensor(sens).argmax()), int(torch.tensor(sens).argmin())
    assert config.layer_taus[f"model.layers.{most}.mlp.gate"] == pytest.approx(0.9)
    assert config.layer_taus[f"model.layers.{least}.mlp.gate"] == pytest.approx(0.7)
    for layer, (_, score, _, logit_std) in enumerate(reference):
        fqn = f"model.layers.{layer}.mlp.gate"
        assert config.layer_picks[fqn] == torch.argsort(score, descending=True)[:2].tolist()
        assert config.layer_boosts[fqn] == pytest.approx(0.5 * logit_std, rel=1e-4)


def test_alternative_rules_frequency_picks_and_uniform_tau():
    """The rules Ban&Pick's calibration was measured against: key experts by selection frequency alone,
    and one tau for every layer (the middle of [tau_min, tau_max]); bad rule names are refused."""
    model = build_tiny("qwen2_moe")
    ids = _calib_ids()
    reference = _reference_statistics(model, ids)
    stats = measure_ban_pick_statistics(model, ids, k_min=1, batch_size=2)
    config = ban_pick_config_from_statistics(stats, num_picks=2, tau_min=0.6, tau_max=0.9,
                                             pick_score="frequency", tau_rule="uniform")
    for layer, (freq, _, _, _) in enumerate(reference):
        fqn = f"model.layers.{layer}.mlp.gate"
        assert config.layer_picks[fqn] == torch.argsort(freq, descending=True, stable=True)[:2].tolist()
        assert config.layer_taus[fqn] == pytest.approx(0.75)
    for bad in ({"pick_score": "largest"}, {"tau_rule": "random"}):
        with pytest.raises(ValueError, match="pick_score must be one of"):
            ban_pick_config_from_statistics(stats, **bad)
        with pytest.raises(ValueError, match="pick_score must be one of"):
            calibrate_ban_pick(model, ids, **bad)


def test_calibrated_ban_pick_installs_and_prunes():
    model = build_tiny("qwen3_moe")
    ids = _calib_ids()
    config = calibrate_ban_pick(model, ids, num_picks=1, boost=0.5, tau_min=0.6, tau_max=0.8)
    dense = measure_active_experts(model, ids).mean
    apply_router_pass(model, config)
    routers = [b.gate for _, b, _ in find_moe_blocks(model)]
    for layer, router in enumerate(routers):
        fqn = f"model.layers.{layer}.mlp.gate"
        assert installed_passes(router) == ("pick", "ban")
        assert router.pick_mask.nonzero().flatten().tolist() == config.layer_picks[fqn]
        assert torch.equal(router.ban_protected, router.pick_mask)
        assert router.ban_tau.item() == pytest.approx(config.layer_taus[fqn])
    assert measure_active_experts(model, ids).mean < dense == 2.0
    with pytest.raises(ValueError, match="original routing"):
        calibrate_ban_pick(model, ids)


def test_calibration_refuses_a_model_with_passes():
    model = build_tiny("olmoe")
    apply_router_pass(model, PESFConfig(alpha=0.3))
    with pytest.raises(ValueError, match="passes installed"):
        measure_ban_pick_statistics(model, _calib_ids())
