"""Bad settings and bad calibration ids for the MoE router passes (PESF, Ban, Pick, Ban&Pick) and QESC:
refused when given, with the exact exception type and a message naming the field and its range, and
nothing in the model changed by a refused call."""

import math

import numpy as np
import pytest
import torch

from _router_tiny_models import VOCAB, build_tiny
from model_state import assert_unchanged, fingerprint
from torchao_mx_ext import MXFP4BlockRotConfig, RotatedMXFP4Tensor
from torchao_mx_ext.calibration.data import CalibrationIdsTypeError
from torchao_mx_ext.moe import BanConfig, BanPickConfig, PESFConfig, PickConfig, apply_router_pass
from torchao_mx_ext.moe.ban_pick import (
    ban_pick_config_from_statistics,
    calibrate_ban_pick,
    install_ban,
    install_pick,
    measure_ban_pick_statistics,
)
from torchao_mx_ext.moe.pesf import install_pesf
from torchao_mx_ext.moe.qesc import fit_router_to_topk_logits, qesc_quantize
from torchao_mx_ext.moe.router_configs import (
    check_router_pass_settings,
    install_router_passes,
    router_pass_settings,
)
from torchao_mx_ext.moe.router_pass import installed_passes, set_router_pass_buffer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAN, INF = float("nan"), float("inf")
ROUTER0 = "model.layers.0.mlp.gate"


# ---------------------------------------------------------------------------------------------------
# "the model is unchanged": every tensor, every module's class, buffers, attributes and hooks


# ---------------------------------------------------------------------------------------------------
# configs: refused at construction


BAD_CONFIGS = [
    # (constructor, kwargs, exception, text the message must hold: the field)
    (PickConfig, dict(boost=NAN), ValueError, "PickConfig.boost"),
    (PickConfig, dict(boost=INF), ValueError, "PickConfig.boost"),
    (PickConfig, dict(boost=-0.5), ValueError, "PickConfig.boost"),
    (PickConfig, dict(boost=True), TypeError, "PickConfig.boost"),
    (PickConfig, dict(boost=None), TypeError, "PickConfig.boost"),
    (PickConfig, dict(boost="1.0"), TypeError, "PickConfig.boost"),
    (PickConfig, dict(experts=[1, -1]), ValueError, "PickConfig.experts[1]"),
    (PickConfig, dict(experts=[1.0]), TypeError, "PickConfig.experts[0]"),
    (PickConfig, dict(experts=[True]), TypeError, "PickConfig.experts[0]"),
    (PickConfig, dict(experts="3"), TypeError, "PickConfig.experts"),
    (PickConfig, dict(experts=3), TypeError, "PickConfig.experts"),
    (PickConfig, dict(layer_boosts={ROUTER0: NAN}), ValueError, f"PickConfig.layer_boosts['{ROUTER0}']"),
    (PickConfig, dict(layer_experts={ROUTER0: [-3]}), ValueError, f"PickConfig.layer_experts['{ROUTER0}'][0]"),
    (PickConfig, dict(layer_experts=[(ROUTER0, [1])]), TypeError, "PickConfig.layer_experts"),
    (PESFConfig, dict(alpha=None), TypeError, "PESFConfig.alpha"),
    (PESFConfig, dict(alpha=NAN), ValueError, "PESFConfig.alpha"),
    (PESFConfig, dict(alpha=INF), ValueError, "PESFConfig.alpha"),
    (PESFConfig, dict(alpha=-0.1), ValueError, "PESFConfig.alpha"),
    (PESFConfig, dict(alpha=False), TypeError, "PESFConfig.alpha"),
    (PESFConfig, dict(layer_alphas={ROUTER0: None}), TypeError, f"PESFConfig.layer_alphas['{ROUTER0}']"),
    (PESFConfig, dict(layer_alphas={0: 0.3}), TypeError, "PESFConfig.layer_alphas"),
    (BanConfig, dict(tau=NAN), ValueError, "BanConfig.tau"),
    (BanConfig, dict(tau=1.5), ValueError, "BanConfig.tau"),
    (BanConfig, dict(tau=-0.1), ValueError, "BanConfig.tau"),
    (BanConfig, dict(tau=None), TypeError, "BanConfig.tau"),
    (BanConfig, dict(k_min=0), ValueError, "BanConfig.k_min"),
    (BanConfig, dict(k_min=1.5), TypeError, "BanConfig.k_min"),
    (BanConfig, dict(k_min=True), TypeError, "BanConfig.k_min"),
    (BanConfig, dict(protected=[-1]), ValueError, "BanConfig.protected[0]"),
    (BanConfig, dict(layer_taus={ROUTER0: 2.0}), ValueError, f"BanConfig.layer_taus['{ROUTER0}']"),
    (BanPickConfig, dict(tau=INF), ValueError, "BanPickConfig.tau"),
    (BanPickConfig, dict(k_min=-1), ValueError, "BanPickConfig.k_min"),
    (BanPickConfig, dict(boost=NAN), ValueError, "BanPickConfig.boost"),
    (BanPickConfig, dict(picks=[0.5]), TypeError, "BanPickConfig.picks[0]"),
    (BanPickConfig, dict(layer_taus={ROUTER0: NAN}), ValueError, f"BanPickConfig.layer_taus['{ROUTER0}']"),
    (BanPickConfig, dict(layer_picks={ROUTER0: [-2]}), ValueError, f"BanPickConfig.layer_picks['{ROUTER0}'][0]"),
    (BanPickConfig, dict(layer_boosts={ROUTER0: -1.0}), ValueError, f"BanPickConfig.layer_boosts['{ROUTER0}']"),
]


@pytest.mark.parametrize("cls, kwargs, exc, field", BAD_CONFIGS, ids=[f"{c.__name__}-{k}" for c, k, _, _ in BAD_CONFIGS])
def test_config_refuses_bad_value(cls, kwargs, exc, field):
    with pytest.raises(exc) as info:
        cls(**kwargs)
    assert type(info.value) is exc  # exactly, not a subclass of it
    message = str(info.value)
    assert field in message
    # the accepted range is named too
    assert any(r in message for r in (">= 0", ">= 1", "in [0, 1]", "dict", "sequence")), message


def test_pick_nan_boost_and_pesf_none_alpha_are_refused():
    """A NaN boost would make every logit NaN, alpha=None would fail deep inside the pass: both are
    refused at construction, naming the field and its range."""
    with pytest.raises(ValueError, match=r"PickConfig\.boost must be a finite number \(>= 0\), got nan"):
        PickConfig(experts=[1], boost=float("nan"))
    with pytest.raises(TypeError, match=r"PESFConfig\.alpha must be a real number \(>= 0\), got NoneType None"):
        PESFConfig(alpha=None)


@pytest.mark.parametrize("config", [
    PESFConfig(alpha=0), PESFConfig(alpha=0.0), PESFConfig(alpha=2.0), PESFConfig(alpha=np.float32(0.7)),
    PESFConfig(layer_alphas={ROUTER0: 0.5}),
    BanConfig(tau=0.0), BanConfig(tau=1), BanConfig(tau=1.0, k_min=np.int64(3), protected=(2,)),
    BanConfig(layer_taus={ROUTER0: 0.55}),
    PickConfig(), PickConfig(experts=[1, 5], boost=0.0), PickConfig(experts=(3,), boost=25.0),
    BanPickConfig(), BanPickConfig(tau=0.6, picks=[1], boost=0.5),
    BanPickConfig(layer_taus={ROUTER0: 1.0}, layer_picks={ROUTER0: []}, layer_boosts={ROUTER0: 0.0}),
])
def test_config_accepts_documented_values(config):
    config.validate()
    resolved = config.for_router(ROUTER0)  # per-layer resolution re-checks (replace -> __post_init__)
    assert not resolved.has_layer_values()


def test_apply_router_pass_revalidates_a_mutated_config_before_changing_anything():
    model = build_tiny("qwen3_moe")  # a flattening block: PESF would rewire it first
    before = fingerprint(model)
    config = PESFConfig(alpha=0.3)
    config.alpha = float("nan")  # dataclasses are mutable: the handler must not trust construction alone
    with pytest.raises(ValueError, match=r"PESFConfig\.alpha"):
        apply_router_pass(model, config)
    assert_unchanged(model, before)

    config = BanPickConfig(tau=0.8, picks=[1], boost=0.5)
    config.layer_boosts = {ROUTER0: float("inf")}
    with pytest.raises(ValueError, match=r"BanPickConfig\.layer_boosts\['model\.layers\.0\.mlp\.gate'\]"):
        apply_router_pass(model, config)
    assert_unchanged(model, before)


@pytest.mark.parametrize("arch, config, text", [
    ("qwen3_moe", PESFConfig(layer_alphas={"model.layers.9.mlp.gate": 0.5}), "name no MoE router"),
    ("qwen3_moe", PickConfig(experts=[1, 8], boost=1.0), "PickConfig.experts: expert index 8 out of range [0, 8)"),
    ("mixtral", BanConfig(tau=0.8, protected=[9]), "BanConfig.protected: expert index 9 out of range"),
    ("olmoe", BanPickConfig(layer_picks={"model.layers.1.mlp.gate": [12]}),
     "expert index 12 out of range [0, 8) of router model.layers.1.mlp.gate"),
])
def test_apply_router_pass_refuses_what_a_router_cannot_take_before_changing_anything(arch, config, text):
    """What one router cannot take is refused before the blocks are rewired, the experts marked for
    sentinels or the first routers rewritten."""
    model = build_tiny(arch)
    before = fingerprint(model)
    with pytest.raises(ValueError) as info:
        apply_router_pass(model, config)
    assert text in str(info.value)
    assert_unchanged(model, before)


def test_apply_router_pass_refuses_a_pass_one_router_already_has_before_changing_anything():
    model = build_tiny("qwen2_moe")
    install_ban(model.model.layers[1].mlp.gate, 0.8)  # only the second router carries Ban
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"'ban' is already installed on model\.layers\.1\.mlp\.gate"):
        apply_router_pass(model, BanPickConfig(tau=0.7, picks=[1], boost=0.5))
    assert_unchanged(model, before)
    assert installed_passes(model.model.layers[0].mlp.gate) == ()


@pytest.mark.parametrize("install, args, exc, field", [
    (install_pesf, (NAN,), ValueError, "alpha"),
    (install_pesf, (None,), TypeError, "alpha"),
    (install_pick, ([1], NAN), ValueError, "boost"),
    (install_pick, ([1], -1.0), ValueError, "boost"),
    (install_pick, ([9], 1.0), ValueError, "experts"),  # 8 experts
    (install_pick, ([1.5], 1.0), TypeError, "experts[0]"),
    (install_ban, (1.2,), ValueError, "tau"),
    (install_ban, (0.8, 0), ValueError, "k_min"),
    (install_ban, (0.8, 2.5), TypeError, "k_min"),
    (install_ban, (0.8, 1, [8]), ValueError, "protected"),
])
def test_installers_refuse_bad_values_and_leave_the_router_alone(install, args, exc, field):
    model = build_tiny("deepseek_v3")
    router = model.model.layers[0].mlp.gate
    before = fingerprint(model)
    with pytest.raises(exc) as info:
        install(router, *args)
    assert type(info.value) is exc and field in str(info.value)
    assert installed_passes(router) == ()
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------
# saved settings (checkpoint form): the same ranges; install_router_passes changes nothing on refusal


@pytest.mark.parametrize("entry, text", [
    ({"pass": "ban", "tau": 1.5, "k_min": 1, "protected": []}, "ban.tau"),
    ({"pass": "ban", "tau": 0.8, "k_min": 0, "protected": []}, "ban.k_min"),
    ({"pass": "ban", "tau": 0.8, "k_min": 1, "protected": [-1]}, "ban.protected"),
    ({"pass": "pesf", "alpha": NAN}, "pesf.alpha"),
    ({"pass": "pesf", "alpha": -1}, "pesf.alpha"),
    ({"pass": "pick", "experts": [1], "boost": INF}, "pick.boost"),
    ({"pass": "pick", "experts": [1], "boost": -2.0}, "pick.boost"),
])
def test_saved_settings_out_of_range_are_refused(entry, text):
    settings = {ROUTER0: [entry]}
    with pytest.raises(ValueError, match="invalid value") as info:
        check_router_pass_settings(settings)
    assert text in str(info.value) and ROUTER0 in str(info.value)
    model = build_tiny("olmoe")
    before = fingerprint(model)
    with pytest.raises(ValueError, match="invalid value"):
        install_router_passes(model, {ROUTER0: [{"pass": "pesf", "alpha": 0.3}], "model.layers.1.mlp.gate": [entry]})
    assert_unchanged(model, before)


def test_saving_refuses_a_buffer_written_out_of_range():
    """A buffer written directly (not through set_router_pass_buffer, which checks) is unchecked; the
    saved form (router_pass_settings, what checkpoints store) refuses such a value instead of writing
    a checkpoint that cannot be loaded."""
    model = build_tiny("qwen2_moe")
    apply_router_pass(model, PickConfig(experts=[2], boost=1.0))
    assert router_pass_settings(model)[ROUTER0] == [{"pass": "pick", "experts": [2], "boost": 1.0}]
    with torch.no_grad():
        model.model.layers[0].mlp.gate.pick_boost.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"pick\.boost.*written directly"):
        router_pass_settings(model)


ROUTER1 = "model.layers.1.mlp.gate"


@pytest.mark.parametrize("name, value, exc, text", [
    ("pesf_alpha", NAN, ValueError, "pesf_alpha must be a finite number (>= 0), got nan"),
    ("pesf_alpha", -0.1, ValueError, "pesf_alpha must be >= 0"),
    ("pesf_alpha", None, TypeError, "pesf_alpha must be a real number"),
    ("pick_boost", INF, ValueError, "pick_boost must be a finite number (>= 0)"),
    ("pick_boost", -1.0, ValueError, "pick_boost must be >= 0"),
    ("ban_tau", 1.5, ValueError, "ban_tau must be in [0, 1]"),
    ("ban_tau", "0.5", TypeError, "ban_tau must be a real number"),
    ("ban_k_min", 0, ValueError, "ban_k_min must be an integer >= 1"),
    ("ban_k_min", 1.5, TypeError, "ban_k_min must be an integer"),
    ("ban_k_min", True, TypeError, "ban_k_min must be an integer"),
    ("pick_mask", [1, 0, 0, 0, 0, 0, 0, 0], TypeError, "pick_mask[0] must be True or False"),
    ("pick_mask", torch.zeros(8), TypeError, "pick_mask must be a bool mask over the 8 experts"),
    ("pick_mask", [True, False], ValueError, "pick_mask must have 8 entries"),
    ("ban_protected", "all", TypeError, "ban_protected must be a bool mask"),
    ("ban_tau", {ROUTER1: NAN}, ValueError, f"ban_tau['{ROUTER1}'] must be a finite number"),
    ("pick_boost", {ROUTER0: 0.5, ROUTER1: -2.0}, ValueError, f"pick_boost['{ROUTER1}'] must be >= 0"),
])
def test_set_router_pass_buffer_checks_values_before_changing_anything(name, value, exc, text):
    """Every value is checked as the configs check it, on every router, before any buffer changes."""
    model = build_tiny("qwen2_moe")
    apply_router_pass(model, PESFConfig(alpha=0.3))
    apply_router_pass(model, PickConfig(experts=[2], boost=1.0))
    apply_router_pass(model, BanConfig(tau=0.8, k_min=1))
    before = fingerprint(model)
    with pytest.raises(exc) as info:
        set_router_pass_buffer(model, name, value)
    assert type(info.value) is exc and text in str(info.value), str(info.value)
    assert_unchanged(model, before)


def test_set_router_pass_buffer_takes_documented_values():
    model = build_tiny("qwen2_moe")
    apply_router_pass(model, PickConfig(experts=[2], boost=1.0))
    apply_router_pass(model, BanConfig(tau=0.8, k_min=1))
    gate0, gate1 = model.model.layers[0].mlp.gate, model.model.layers[1].mlp.gate
    assert set_router_pass_buffer(model, "ban_tau", {ROUTER1: 1}) == 1
    assert float(gate1.ban_tau) == 1.0 and float(gate0.ban_tau) == pytest.approx(0.8)
    assert set_router_pass_buffer(model, "ban_k_min", np.int64(2)) == 2
    assert int(gate0.ban_k_min) == int(gate1.ban_k_min) == 2
    assert set_router_pass_buffer(model, "pick_boost", torch.tensor(0.25)) == 2
    assert float(gate0.pick_boost) == 0.25
    set_router_pass_buffer(model, "pick_mask", {ROUTER0: [i == 3 for i in range(8)]})
    assert gate0.pick_mask.nonzero().flatten().tolist() == [3]
    set_router_pass_buffer(model, "pick_mask", np.arange(8) < 2)
    assert gate1.pick_mask.nonzero().flatten().tolist() == [0, 1]
    set_router_pass_buffer(model, "ban_protected", False)
    assert not gate0.ban_protected.any() and not gate1.ban_protected.any()
    with pytest.raises(ValueError, match="has a pass buffer 'pesf_alpha'"):
        set_router_pass_buffer(model, "pesf_alpha", 0.5)  # no PESF installed


# ---------------------------------------------------------------------------------------------------
# Ban&Pick calibration


def _ids(n=2, s=16, seed=0):
    return torch.randint(3, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(tau_min=0.9, tau_max=0.7), ValueError, "tau_min"),
    (dict(tau_max=1.5), ValueError, "tau_max"),
    (dict(tau_min=NAN), ValueError, "tau_min"),
    (dict(boost=NAN), ValueError, "boost"),
    (dict(boost=-1.0), ValueError, "boost"),
    (dict(num_picks=-1), ValueError, "num_picks"),
    (dict(num_picks=1.0), TypeError, "num_picks"),
    (dict(k_min=0), ValueError, "k_min"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=True), TypeError, "batch_size"),
])
def test_calibrate_ban_pick_refuses_bad_settings_before_running(kwargs, exc, field):
    model = build_tiny("qwen3_moe")
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    before = fingerprint(model)
    with pytest.raises(exc) as info:
        calibrate_ban_pick(model, _ids(), **kwargs)
    assert type(info.value) is exc and field in str(info.value)
    assert calls == []  # refused before the first calibration forward
    assert_unchanged(model, before)


BAD_IDS = [
    (torch.zeros(0, 8, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(2, 3, 4, dtype=torch.long), ValueError, "shape"),
    (torch.rand(2, 8) * 10, CalibrationIdsTypeError, "dtype torch.float32"),
    (torch.full((2, 8), VOCAB), ValueError, "outside the vocabulary [0, 96)"),
    (torch.full((2, 8), -1), ValueError, "outside the vocabulary"),
    ([torch.full((8,), 3), torch.full((8,), VOCAB + 5)], ValueError, "calib_ids[1]"),
    ([], ValueError, "empty list"),
    ("1 2 3", TypeError, "calib_ids"),
]


@pytest.mark.parametrize("ids, exc, text", BAD_IDS, ids=[str(i) for i in range(len(BAD_IDS))])
def test_ban_pick_statistics_refuse_bad_ids_before_running(ids, exc, text):
    model = build_tiny("mixtral")
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    before = fingerprint(model)
    with pytest.raises(exc) as info:
        measure_ban_pick_statistics(model, ids)
    assert type(info.value) is exc and text in str(info.value)
    assert calls == []
    assert_unchanged(model, before)


def test_ban_pick_still_takes_one_dimensional_sequences():
    """(s,) tensors stay accepted (documented), alone or in a list."""
    model = build_tiny("olmoe")
    a = measure_ban_pick_statistics(model, _ids(1, 12)[0])
    b = measure_ban_pick_statistics(model, [_ids(1, 12)[0]])
    assert a.tokens == b.tokens == 12
    config = ban_pick_config_from_statistics(a, num_picks=0, boost=0.0, tau_min=0.0, tau_max=1.0)
    assert all(p == [] for p in config.layer_picks.values())


# ---------------------------------------------------------------------------------------------------
# QESC


def test_fit_refuses_bad_settings():
    w, x = torch.randn(8, 16), torch.randn(40, 16)
    with pytest.raises(ValueError, match=r"k_loss must be an integer >= 1, got 0"):
        fit_router_to_topk_logits(w, x, x, 0)
    with pytest.raises(TypeError, match=r"k_loss"):
        fit_router_to_topk_logits(w, x, x, 2.0)
    with pytest.raises(ValueError, match=r"damp must be a finite number \(>= 0\), got nan"):
        fit_router_to_topk_logits(w, x, x, 4, damp=math.nan)
    with pytest.raises(ValueError, match=r"damp must be >= 0, got -0.01"):
        fit_router_to_topk_logits(w, x, x, 4, damp=-0.01)


@pytest.mark.parametrize("ids, kwargs, exc, text", [
    (None, dict(k_loss=2), ValueError, "k_loss must exceed the routing top-k (2"),
    (None, dict(k_loss=1), ValueError, "k_loss must exceed"),
    (None, dict(k_loss=True), TypeError, "k_loss"),
    (None, dict(k_loss=4.0), TypeError, "k_loss"),
    (None, dict(damp=math.inf), ValueError, "damp"),
    (None, dict(damp=-1.0), ValueError, "damp"),
    (None, dict(damp="big"), ValueError, "damp must be a finite number >= 0 or 'auto', got 'big'"),
    (_ids(1), dict(damp="auto"), ValueError, "give >= 2 sequences, got 1"),
    (None, dict(calibrate_routers="yes"), TypeError, "calibrate_routers"),
    (None, dict(config="mxfp4"), TypeError, "config"),
    *[(ids, {}, exc, text) for ids, exc, text in BAD_IDS if isinstance(ids, torch.Tensor)],
    (torch.randint(3, VOCAB, (12,)), {}, ValueError, "shape [n, seq_len]"),
])
def test_qesc_refuses_bad_input_before_changing_the_model(ids, kwargs, exc, text):
    model = build_tiny("qwen3_moe")  # top-2 of 8
    before = fingerprint(model)
    kwargs = dict(kwargs)
    config = kwargs.pop("config", MXFP4BlockRotConfig(act_quant=False))
    with pytest.raises(exc) as info:
        qesc_quantize(model, _ids() if ids is None else ids, config, progress=False, **kwargs)
    assert type(info.value) is exc and text in str(info.value), str(info.value)
    assert_unchanged(model, before)
    assert not any(isinstance(p, RotatedMXFP4Tensor) for p in model.parameters())


def test_qesc_accepts_k_loss_above_top_k():
    model = build_tiny("qwen3_moe")
    report = qesc_quantize(model, _ids(2, 8), MXFP4BlockRotConfig(act_quant=False), k_loss=3, progress=False)
    assert len(report.agreement_after) == 2
