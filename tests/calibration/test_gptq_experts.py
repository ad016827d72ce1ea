"""GPTQ for fused 3-D MoE experts: per-expert Hessians against an independent float64 token loop, the
converted weights against ``gptq_mxfp4`` per expert (bit for bit), the Hessian-weighted error against
RTN on a tiny random Qwen2-MoE with real routing, ``sequential_gptq`` on a MoE model, and bad use.

The references never call the package's observers or experts forward: they loop over tokens and their
top-k slots (skipping sentinel slots, id == E), rotate with the closed-form float64 Hadamard of
tests/reference.py, and run each expert's projections as float64 matmuls.
"""

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import quantize_
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from reference import ref_hadamard
from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config, RotatedMXFP4Tensor
from torchao_mx_ext.configs import quantize_linears
from torchao_mx_ext.calibration import MXFP4GPTQConfig, gptq_mxfp4
from torchao_mx_ext.calibration.gptq import OBSERVER_ATTR
from torchao_mx_ext.calibration.gptq_experts import ExpertsHessianObserver
from torchao_mx_ext.calibration.sequential import sequential_gptq
from torchao_mx_ext.moe.experts import is_fused_experts, quantize_expert_weights, quantize_experts_module

sys.path.insert(0, str(Path(__file__).parents[1] / "moe"))
from _router_tiny_models import NUM_EXPERTS, VOCAB, build_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN, INTER, E, TOP_K = 64, 48, 4, 2  # INTER 48: padded to 64 (zero columns) in every config below


def make_experts(act: str, exact: bool, seed: int = 0) -> Qwen3MoeExperts:
    """Random experts. ``exact``: dyadic weights (k/64, |k| <= 16; not on the MXFP4 grid), so that with
    inputs in {-1, 0, 1}, a ReLU and a Hadamard block of size 16 or 64 (entries +-1/4, +-1/8) every
    product and sum of the forward, the rotation and the Hessian is exact in float32 and float64 alike
    (a few dozen significant bits at most)."""
    config = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=TOP_K,
                            hidden_act=act, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config._experts_implementation = "eager"
    module = Qwen3MoeExperts(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (module.gate_up_proj, module.down_proj):
            if exact:
                w.copy_(torch.randint(-16, 17, w.shape, generator=g) / 64.0)
            else:
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return module


def make_inputs(num_tokens: int, exact: bool, seed: int = 0):
    """Tokens and a hand-built routing: experts 0..2 only (expert 3 receives nothing), distinct per
    token, with sentinel slots (id E, nonzero weight) and one all-sentinel token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (num_tokens, HIDDEN), generator=g).float() if exact else torch.randn(num_tokens, HIDDEN, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(num_tokens)])
    index[index == E - 1] = E  # expert 3 -> sentinel
    index[0] = E  # all sentinels
    weights = torch.rand(num_tokens, TOP_K, generator=g) + 0.1
    assert (index == E).sum() > num_tokens // 4
    return x, index, weights


def block_rotation64(config, width: int):
    """float64 ``diag(H_b, ...)`` for the padded width (``None`` without rotation)."""
    if config.rotation == "identity":
        return None
    size = config.rotation_size or width
    return torch.block_diag(*[ref_hadamard(size)] * (width // size))


def padded(width: int) -> int:
    return -(-width // 32) * 32


def reference_hessians(gate_up, down, x, index, rot_h, rot_i, act):
    """float64 ``(H1 [E, Hp, Hp], H2 [E, Ip, Ip], n [E])`` from a loop over tokens and their slots."""
    hp, ip = padded(gate_up.shape[-1]), padded(down.shape[-1])
    s1 = torch.zeros(E, hp, hp, dtype=torch.float64)
    s2 = torch.zeros(E, ip, ip, dtype=torch.float64)
    n = [0] * E
    for t in range(x.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            if e >= E:
                continue  # sentinel slot: not routed anywhere
            xt = x[t].double()
            gate, up = (gate_up[e].double() @ xt).chunk(2)
            ht = act(gate) * up
            xr = F.pad(xt, (0, hp - xt.shape[0]))
            hr = F.pad(ht, (0, ip - ht.shape[0]))
            if rot_h is not None:
                xr, hr = xr @ rot_h, hr @ rot_i
            s1[e] += torch.outer(xr, xr)
            s2[e] += torch.outer(hr, hr)
            n[e] += 1
    scale = torch.tensor([2.0 / c if c else 0.0 for c in n], dtype=torch.float64).view(E, 1, 1)
    return s1 * scale, s2 * scale, n


def rotated_weight64(w, rotation64):
    """``W R`` in float64, zero-padded to the stored width."""
    wp = F.pad(w.double(), (0, padded(w.shape[-1]) - w.shape[-1]))
    return wp if rotation64 is None else wp @ rotation64


def observe(module, config, batches):
    quantize_(module, MXFP4GPTQConfig(base=config, step="prepare", hessian_dtype="float64"), filter_fn=is_fused_experts)
    with torch.no_grad():
        return [module(*b) for b in batches]


# ---------------------------------------------------------------------------------------------
# per-expert Hessians
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "float"])
def test_per_expert_hessians_match_token_loop(exact):
    config = MXFP4BlockRotConfig(rotation_size=16) if exact else MXFP4BlockRotConfig()
    act = "relu" if exact else "silu"
    module = make_experts(act, exact)
    fp = copy.deepcopy(module)
    gate_up, down = module.gate_up_proj.detach().clone(), module.down_proj.detach().clone()
    x, index, weights = make_inputs(60, exact)
    keys, children = set(module.state_dict()), [n for n, _ in module.named_modules()]

    halves = [(x[:25], index[:25], weights[:25]), (x[25:], index[25:], weights[25:])]  # two calls accumulate
    outputs = observe(module, config, halves)
    assert isinstance(module, Qwen3MoeExperts) and is_fused_experts(module)
    # the observer stays out of the state dict and the module tree
    assert set(module.state_dict()) == keys and [n for n, _ in module.named_modules()] == children
    # the observing forward is the plain full-precision experts math
    with torch.no_grad():
        expected = fp(x, index, weights)
    torch.testing.assert_close(torch.cat(outputs), expected, atol=1e-5, rtol=1e-5)

    observer = getattr(module, OBSERVER_ATTR)
    assert isinstance(observer, ExpertsHessianObserver)
    actfn = F.relu if exact else F.silu
    rot = block_rotation64(config, 64)
    h1, h2, n = reference_hessians(gate_up, down, x, index, rot, rot, actfn)
    assert n[E - 1] == 0 and sum(n) == int((index < E).sum())
    assert observer.counts() == n
    for e in range(E - 1):
        for got_obs, ref in ((observer.observers[0][e], h1[e]), (observer.observers[1][e], h2[e])):
            got = got_obs.hessian()
            if exact:
                assert torch.equal(got, ref), e
            else:  # float32 forward and rotation vs float64
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="no calibration data"):
        observer.observers[0][E - 1].hessian()


# ---------------------------------------------------------------------------------------------
# convert == gptq_mxfp4 per expert (bit for bit), RTN for an expert without rows
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,gptq_kwargs", [
    (MXFP4BlockRotConfig(scale_rule="floor", rotation_size=16), dict()),
    (MXFP4BlockRotConfig(scale_rule="mse", rotation_size=None), dict(act_order=False, column_block=24)),  # 64-wide
    (MXFP4Config(scale_rule="even", act_quant=False), dict(mse_shrink=True, damp=0.05, compute_dtype="float64")),
], ids=["block16", "global64", "identity"])
def test_convert_is_gptq_per_expert_and_rtn_without_rows(config, gptq_kwargs, caplog):
    """Exact arithmetic (tokens in {-1, 0, 1}, dyadic weights, ReLU, Hadamard entries +-1/4 or +-1/8): the
    observed Hessians ARE the reference ones, so the converted bytes must equal gptq_mxfp4 on them."""
    module = make_experts("relu", exact=True)
    gate_up, down = module.gate_up_proj.detach().clone(), module.down_proj.detach().clone()
    x, index, weights = make_inputs(80, exact=True, seed=1)
    rtn = quantize_experts_module(copy.deepcopy(module), config)

    observe(module, config, [(x, index, weights)])
    with caplog.at_level(logging.WARNING):
        quantize_(module, MXFP4GPTQConfig(base=config, step="convert", **gptq_kwargs), filter_fn=is_fused_experts)
    assert "1 of 4 experts received no calibration tokens" in caplog.text

    cfg = MXFP4GPTQConfig(base=config, step="convert", **gptq_kwargs)
    dtype = torch.float64 if cfg.compute_dtype == "float64" else torch.float32
    rot = block_rotation64(config, 64)
    h1, h2, n = reference_hessians(gate_up, down, x, index, rot, rot, F.relu)
    assert n[E - 1] == 0 and min(n[: E - 1]) > 20
    for name, w_fp, hessians in (("gate_up_proj", gate_up, h1), ("down_proj", down, h2)):
        got, ref_rtn = getattr(module, name), getattr(rtn, name)
        # the layout of quantize_expert_weights: class, shape, attributes, the one shared rotation block
        assert type(got) is RotatedMXFP4Tensor and got.shape == ref_rtn.shape and got.qdata.shape == ref_rtn.qdata.shape
        for attr in ("block_size", "scale_rule", "act_scale_rule", "in_features", "dtype"):
            assert getattr(got, attr) == getattr(ref_rtn, attr), attr
        assert (got.rotation is None) == (ref_rtn.rotation is None)
        if got.rotation is not None:
            assert got.rotation.untyped_storage().data_ptr() == ref_rtn.rotation.untyped_storage().data_ptr()
        for e in range(E - 1):
            qdata, scale = gptq_mxfp4(
                rotated_weight64(w_fp[e], rot), hessians[e], config.block_size, config.scale_rule, cfg.damp,
                cfg.column_block, cfg.act_order, cfg.mse_shrink, dtype,
            )
            assert torch.equal(got.qdata[e], qdata) and torch.equal(got.scale[e], scale), (name, e)
            assert not torch.equal(got.qdata[e], ref_rtn.qdata[e]), (name, e)  # GPTQ really moved codes
        # the expert no token reached: RTN, exactly as quantize_expert_weights stores it
        assert torch.equal(got.qdata[E - 1], ref_rtn.qdata[E - 1]) and torch.equal(got.scale[E - 1], ref_rtn.scale[E - 1])
        assert torch.equal(quantize_expert_weights(w_fp, config).qdata[E - 1], got.qdata[E - 1])

    # the MXFP4 experts class, as quantize_experts_module gives it; observer gone
    assert type(module) is type(rtn) and not hasattr(module, OBSERVER_ATTR)
    assert "mxfp4[" in repr(module)
    with torch.no_grad():
        y = module(x, index, weights)
    assert y.isfinite().all() and torch.equal(y[0], torch.zeros(HIDDEN))


# ---------------------------------------------------------------------------------------------
# real routing: GPTQ lowers tr((W - Q) H (W - Q)^T) against RTN
# ---------------------------------------------------------------------------------------------
def _routed_inputs(model):
    """Record (hidden_states, top_k_index) entering every experts module."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, i=i):
            seen.setdefault(i, []).append((args[0].detach().clone(), args[1].detach().clone()))
        handles.append(layer.mlp.experts.register_forward_pre_hook(hook))
    return seen, handles


def _vectorized_reference_hessians(gate_up, down, xs, rot):
    """float64 per-expert Hessians of real routing (a mask per expert; the loop version is checked above)."""
    num_experts = gate_up.shape[0]
    h1, h2 = [], []
    x = torch.cat([a for a, _ in xs]).double()
    index = torch.cat([b for _, b in xs])
    for e in range(num_experts):
        rows = x[(index == e).any(-1)]  # distinct experts per token: one slot at most
        gate, up = (rows @ gate_up[e].double().T).chunk(2, dim=-1)
        h = F.silu(gate) * up
        xr, hr = rows @ rot, h @ rot[: h.shape[-1], : h.shape[-1]]
        h1.append(2.0 / rows.shape[0] * xr.T @ xr)
        h2.append(2.0 / rows.shape[0] * hr.T @ hr)
    return h1, h2


def test_gptq_beats_rtn_on_tiny_qwen2_moe_routing():
    model = build_tiny("qwen2_moe", seed=0)
    fp_weights = [(l.mlp.experts.gate_up_proj.detach().clone(), l.mlp.experts.down_proj.detach().clone()) for l in model.model.layers]
    config = MXFP4BlockRotConfig(scale_rule="mse")
    rtn = copy.deepcopy(model)
    quantize_(rtn, config, filter_fn=is_fused_experts)
    calib = torch.randint(3, VOCAB, (8, 48), generator=torch.Generator().manual_seed(0))

    quantize_(model, MXFP4GPTQConfig(base=config, step="prepare"), filter_fn=is_fused_experts)
    seen, handles = _routed_inputs(model)
    with torch.no_grad():
        for ids in calib.split(2):
            model(ids)
    for h in handles:
        h.remove()
    quantize_(model, MXFP4GPTQConfig(base=config, step="convert"), filter_fn=is_fused_experts)

    rot = torch.block_diag(*[ref_hadamard(32)] * 2)  # hidden 64, moe inter 32: both widths fit, no padding
    ratios = []
    for i, (gate_up, down) in enumerate(fp_weights):
        h1, h2 = _vectorized_reference_hessians(gate_up, down, seen[i], rot)
        for p, (w_fp, hessians, name) in enumerate(((gate_up, h1, "gate_up_proj"), (down, h2, "down_proj"))):
            r = rot[: w_fp.shape[-1], : w_fp.shape[-1]]

            def weighted_error(qmodel):
                q = getattr(qmodel.model.layers[i].mlp.experts, name).dequantize().double()
                total = 0.0
                for e in range(NUM_EXPERTS):
                    d = w_fp[e].double() @ r - q[e]
                    total += float(torch.trace(d @ hessians[e] @ d.T))
                return total

            ratios.append((i, name, weighted_error(model) / weighted_error(rtn)))
    # measured (layer 0 / layer 1): gate_up_proj 0.43 / 0.45 of RTN's error, down_proj 0.68 / 0.71
    assert all(ratio < 0.9 for _, _, ratio in ratios), ratios


# ---------------------------------------------------------------------------------------------
# sequential_gptq on a MoE model
# ---------------------------------------------------------------------------------------------
def test_sequential_gptq_quantizes_experts_with_gptq(caplog):
    model = build_tiny("qwen2_moe", seed=1)
    calib = torch.randint(3, VOCAB, (16, 64), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    base = MXFP4BlockRotConfig(scale_rule="floor", act_quant=False)
    rtn = quantize_linears(copy.deepcopy(model), base)  # RTN: every linear and every experts module
    with torch.no_grad():
        ref, ref_calib = model(held_out).logits, model(calib).logits
    with caplog.at_level(logging.WARNING):
        sequential_gptq(model, calib, lambda short: base, progress=False)
    assert "RTN" not in caplog.text  # no expert fell back, and no blanket RTN warning

    for layer, layer_rtn in zip(model.model.layers, rtn.model.layers):
        experts, experts_rtn = layer.mlp.experts, layer_rtn.mlp.experts
        assert type(experts) is type(experts_rtn) and not hasattr(experts, OBSERVER_ATTR)
        for name in ("gate_up_proj", "down_proj"):
            w, w_rtn = getattr(experts, name), getattr(experts_rtn, name)
            assert isinstance(w, RotatedMXFP4Tensor) and w.shape == w_rtn.shape
            assert torch.equal(w.scale, w_rtn.scale)  # static groups: the rule's scales, as RTN's (floor, no shrink)
            # GPTQ moved a sizeable share of the codes away from RTN, in every expert
            assert all((w.qdata[e] != w_rtn.qdata[e]).float().mean() > 0.05 for e in range(NUM_EXPERTS)), name
        assert isinstance(layer.self_attn.q_proj.weight, RotatedMXFP4Tensor)  # the linears too
    with torch.no_grad():
        out, out_calib = model(held_out).logits, model(calib).logits
        out_rtn, out_rtn_calib = rtn(held_out).logits, rtn(calib).logits
    assert out.isfinite().all()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    # weight-only MXFP4 of a random tiny model; measured over seeds 1-3: held out 0.098-0.099 (RTN
    # 0.106-0.120), calibration windows 0.073-0.075 (RTN 0.095-0.103)
    assert rel(out, ref) < 0.15
    assert rel(out_calib, ref_calib) < 0.9 * rel(out_rtn_calib, ref_calib)
    assert rel(out, ref) < rel(out_rtn, ref)


# ---------------------------------------------------------------------------------------------
# bad use
# ---------------------------------------------------------------------------------------------
def test_bad_use_is_a_clear_error():
    base = MXFP4BlockRotConfig()
    prepare = MXFP4GPTQConfig(base=base, step="prepare")
    convert = MXFP4GPTQConfig(base=base, step="convert")
    x, index, weights = make_inputs(16, exact=False)

    module = make_experts("silu", exact=False)
    with pytest.raises(ValueError, match="not prepared"):
        quantize_(module, convert, filter_fn=is_fused_experts)
    quantize_(module, prepare, filter_fn=is_fused_experts)
    with pytest.raises(ValueError, match="already prepared"):
        quantize_(module, prepare, filter_fn=is_fused_experts)
    with pytest.raises(ValueError, match="saw no calibration data"):
        quantize_(module, convert, filter_fn=is_fused_experts)
    with torch.no_grad():
        module(x, index, weights)
    with pytest.raises(ValueError, match="another rotation/padding"):
        quantize_(module, MXFP4GPTQConfig(base=MXFP4Config(), step="convert"), filter_fn=is_fused_experts)
    with pytest.raises(ValueError, match="another rotation/padding"):
        quantize_(module, MXFP4GPTQConfig(base=MXFP4BlockRotConfig(seed=1, rotation="random_hadamard"), step="convert"),
                  filter_fn=is_fused_experts)
    assert isinstance(getattr(module, OBSERVER_ATTR), ExpertsHessianObserver)  # failed converts change nothing
    quantize_(module, convert, filter_fn=is_fused_experts)
    assert isinstance(module.gate_up_proj, RotatedMXFP4Tensor)
    with pytest.raises(ValueError, match="already MXFP4-quantized"):
        quantize_(module, convert, filter_fn=is_fused_experts)
    with pytest.raises(TypeError, match="already quantized"):
        quantize_(module, prepare, filter_fn=is_fused_experts)

    rtn = quantize_experts_module(make_experts("silu", exact=False), base)
    with pytest.raises(TypeError, match="already quantized"):
        quantize_(rtn, prepare, filter_fn=is_fused_experts)
    with pytest.raises(ValueError, match="already MXFP4-quantized"):
        quantize_(rtn, convert, filter_fn=is_fused_experts)

    transposed = make_experts("silu", exact=False)
    transposed.is_transposed = True
    with pytest.raises(NotImplementedError, match="transposed"):
        quantize_(transposed, prepare, filter_fn=is_fused_experts)
    hooked = make_experts("silu", exact=False)
    hooked.forward = hooked.forward  # what accelerate's add_hook_to_module does (a wrapper) at its core
    with pytest.raises(NotImplementedError, match="instance-level forward"):
        quantize_(hooked, prepare, filter_fn=is_fused_experts)
