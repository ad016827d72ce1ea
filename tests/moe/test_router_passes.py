"""Router passes (PESF, Ban, Pick) on tiny random models of every supported MoE architecture.

References are independent of the passes: the routers' own (transformers) forward, applied per
sequence, then the pruning rules written as plain Python loops over tokens."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import quantize_
from torchao.quantization.quant_api import FqnToConfig

from _router_tiny_models import ARCHS, NUM_EXPERTS, TOP_K, VOCAB, build_tiny
from torchao_mx_ext.moe.adapters import adapter_for_router, find_moe_blocks, is_moe_router
from torchao_mx_ext.moe.router_configs import BanConfig, BanPickConfig, PESFConfig, PickConfig, apply_router_pass
from torchao_mx_ext.moe.router_pass import installed_passes, remove_router_passes, set_router_pass_buffer
from torchao_mx_ext.moe.routing_stats import measure_active_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = NUM_EXPERTS


def _ids(batch=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def _routers(model):
    return [block.gate for _, block, _ in find_moe_blocks(model)]


def _capture_router_calls(model):
    """Forward hooks recording (router input, weights, indices) of every router call, per layer."""
    calls = collections.defaultdict(list)
    handles = []
    for i, router in enumerate(_routers(model)):
        def hook(module, args, output, i=i):
            calls[i].append((args[0].detach(), output[1].detach(), output[2].detach()))
        handles.append(router.register_forward_hook(hook))
    return calls, handles


def _original_routing(router, x, boost=None):
    """The router's own (transformers) forward on one sequence ``x`` (S, H). With ``boost`` ((N,)
    tensor), F.linear is patched to add it to the router logits: Pick's rule through the original code."""
    forward = adapter_for_router(router).router_class.forward  # transformers' code, not the pass
    if boost is None:
        return forward(router, x)
    linear = F.linear

    def boosted_linear(inp, weight, bias=None):
        out = linear(inp, weight, bias)
        return out + boost.to(out.dtype) if weight.shape == router.weight.shape else out

    F.linear = boosted_linear
    try:
        return forward(router, x)
    finally:
        F.linear = linear


# ------------------------------------------------------------------------------------------------
# Plain-Python references of the rules


def reference_pesf(weights, indices, alpha, seq_len):
    """PESF per sequence of ``seq_len`` consecutive tokens (module docstring of pesf.py)."""
    w, idx = weights.double().tolist(), indices.tolist()
    T, K = len(idx), len(idx[0])
    for start in range(0, T, seq_len):
        rows = range(start, start + seq_len)
        counts = collections.Counter(e for t in rows for e in idx[t] if e < N)
        threshold = alpha * seq_len * K / N
        for t in rows:
            top = max(w[t])
            keep = [idx[t][j] >= N or counts[idx[t][j]] >= threshold or w[t][j] == top for j in range(K)]
            _prune(w[t], idx[t], keep)
    return torch.tensor(w, dtype=torch.float64), torch.tensor(idx)


def reference_ban(weights, indices, tau, k_min, protected=()):
    """Ban per token (module docstring of ban_pick.py)."""
    w, idx = weights.double().tolist(), indices.tolist()
    for t in range(len(idx)):
        total = sum(w[t])
        p = [v / total for v in w[t]]
        order = sorted(range(len(p)), key=lambda j: -p[j])  # stable: ties keep slot order
        keep, before = [False] * len(p), 0.0
        for rank, j in enumerate(order):
            keep[j] = rank < k_min or before < tau or tau >= 1 or idx[t][j] >= N or idx[t][j] in protected
            before += p[j]
        _prune(w[t], idx[t], keep)
    return torch.tensor(w, dtype=torch.float64), torch.tensor(idx)


def _prune(w, idx, keep):
    if all(keep):
        return
    total, kept = sum(w), sum(v for v, k in zip(w, keep) if k)
    for j, k in enumerate(keep):
        if k:
            w[j] = w[j] * total / kept
        else:
            w[j], idx[j] = 0.0, N


def _active_per_token(weights, indices):
    return ((indices < N) & (weights != 0)).sum(-1).double().mean().item()


# ------------------------------------------------------------------------------------------------
# Neutral settings, output_router_logits, reversibility


@pytest.mark.parametrize("arch", ARCHS)
def test_neutral_passes_are_bit_identical_and_removable(arch):
    model = build_tiny(arch)
    ids = _ids()
    ref = model(ids, output_router_logits=True)
    keys = list(model.state_dict())
    original_classes = {name: type(m) for name, m in model.named_modules()}

    apply_router_pass(model, PESFConfig(alpha=0.0))
    apply_router_pass(model, PickConfig(experts=[1, 5], boost=0.0))
    apply_router_pass(model, BanConfig(tau=1.0, k_min=1, protected=[2]))
    router = _routers(model)[0]
    assert installed_passes(router) == ("pesf", "pick", "ban")
    assert isinstance(router, original_classes["model.layers.0.mlp.gate"])
    assert list(model.state_dict()) == keys  # hyper-parameter buffers are non-persistent

    out = model(ids, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    assert len(out.router_logits) == len(ref.router_logits) == 2
    for a, b in zip(out.router_logits, ref.router_logits):
        assert torch.equal(a, b)
    if ref.aux_loss is not None:
        assert torch.equal(out.aux_loss, ref.aux_loss)

    assert remove_router_passes(model) > 0
    assert {name: type(m) for name, m in model.named_modules()} == original_classes
    assert not any(n.startswith(("pesf_", "pick_", "ban_")) for n, _ in model.named_buffers())
    assert torch.equal(model(ids).logits, ref.logits)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_neutral_passes_bit_identical_in_bfloat16(arch):
    model = build_tiny(arch).to(torch.bfloat16)
    ids = _ids()
    ref = model(ids).logits
    apply_router_pass(model, PESFConfig(alpha=0.0))
    apply_router_pass(model, BanPickConfig(tau=1.0, picks=[0, 3], boost=0.0))
    assert torch.equal(model(ids).logits, ref)


def test_decode_steps_are_not_pruned_by_pesf():
    """l = 1: every selected expert has count 1 >= alpha*K/N for alpha <= N/K."""
    model = build_tiny("qwen2_moe")  # K = 4, N = 8: alpha up to 2 prunes nothing at l = 1
    ids = _ids(batch=3, seq=1)
    ref = model(ids).logits
    apply_router_pass(model, PESFConfig(alpha=2.0))
    assert torch.equal(model(ids).logits, ref)
    set_router_pass_buffer(model, "pesf_alpha", 2.1)
    assert not torch.equal(model(ids).logits, ref)  # past N/K the rule does prune single tokens


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_generate_with_kv_cache(arch):
    model = build_tiny(arch)
    ids = _ids(batch=1, seq=6)
    ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    apply_router_pass(model, PESFConfig(alpha=0.0))
    apply_router_pass(model, BanPickConfig())
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), ref)
    set_router_pass_buffer(model, "pesf_alpha", 0.7)
    set_router_pass_buffer(model, "ban_tau", 0.6)
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == ref.shape


def test_mixtral_block_with_router_jitter_is_refused_for_pesf():
    model = build_tiny("mixtral", router_jitter_noise=0.1)
    with pytest.raises(ValueError, match="router_jitter_noise"):
        apply_router_pass(model, PESFConfig(alpha=0.3))
    apply_router_pass(model, BanConfig(tau=0.8))  # per-token passes need no block rewrite


# ------------------------------------------------------------------------------------------------
# The rules against plain-Python references


@pytest.mark.parametrize("arch", ARCHS)
def test_pesf_matches_per_sequence_reference(arch):
    model = build_tiny(arch)
    ids = _ids(batch=2, seq=12)
    alpha = 0.9  # threshold 1.35*K: never an integer, so float rounding cannot flip a decision
    apply_router_pass(model, PESFConfig(alpha=alpha))
    calls, handles = _capture_router_calls(model)
    stats = measure_active_experts(model, ids)
    for h in handles:
        h.remove()

    active_ref = []
    for layer, router in enumerate(_routers(model)):
        [(x, weights, indices)] = calls[layer]
        assert x.shape[:2] == ids.shape  # the router sees (B, S, H): sequences are visible
        orig_w, orig_i = zip(*[_original_routing(router, x[b])[1:] for b in range(x.shape[0])])
        ref_w, ref_i = reference_pesf(torch.cat(orig_w), torch.cat(orig_i), alpha, seq_len=ids.shape[1])
        assert (ref_i == N).any(), "the setting must prune something to test anything"
        assert torch.equal(indices, ref_i)
        torch.testing.assert_close(weights.double(), ref_w, rtol=1e-6, atol=1e-7)
        # totals kept, up to the float32 rounding of each rescaled weight (float64's default tolerance is
        # finer than one float32 ulp, which failed on an AVX-512 CPU)
        torch.testing.assert_close(weights.double().sum(-1), torch.cat(orig_w).double().sum(-1), rtol=1e-6, atol=1e-7)
        active_ref.append(_active_per_token(ref_w, ref_i))
        assert stats.per_layer[f"model.layers.{layer}.mlp.gate"] == pytest.approx(active_ref[-1])
    assert stats.mean == pytest.approx(sum(active_ref) / len(active_ref))
    assert stats.mean < TOP_K[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_ban_pick_matches_per_token_reference(arch):
    model = build_tiny(arch)
    ids = _ids(batch=2, seq=10, seed=2)
    ref_logits = model(ids, output_router_logits=True).router_logits
    picks, boost, tau, k_min = [3], 1.0, 0.55, 1
    apply_router_pass(model, BanPickConfig(tau=tau, k_min=k_min, picks=picks, boost=boost))
    calls, handles = _capture_router_calls(model)
    out = model(ids, output_router_logits=True)
    for h in handles:
        h.remove()
    # the returned logits are the router's own: layer 0 sees the same input as the original model
    assert torch.equal(out.router_logits[0], ref_logits[0])

    boost_vector = torch.zeros(N)
    boost_vector[picks] = boost
    for layer, router in enumerate(_routers(model)):
        [(x, weights, indices)] = calls[layer]
        x2 = x.reshape(-1, x.shape[-1])
        _, picked_w, picked_i = _original_routing(router, x2, boost=boost_vector)
        ref_w, ref_i = reference_ban(picked_w, picked_i, tau, k_min, protected=set(picks))
        assert (ref_i == N).any() and ((ref_i < N).sum(-1) > 1).any(), "the setting must prune, not only keep top-1"
        assert torch.equal(indices, ref_i)
        torch.testing.assert_close(weights.double(), ref_w, rtol=1e-6, atol=1e-7)
        # the boost changes routing: the picked experts are selected at least as often as without it
        _, plain_w, plain_i = _original_routing(router, x2)
        for e in picks:
            assert (picked_i == e).sum() >= (plain_i == e).sum()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_pesf_then_ban_composes(arch):
    model = build_tiny(arch)
    ids = _ids(batch=2, seq=12, seed=3)
    apply_router_pass(model, PESFConfig(alpha=0.6))
    apply_router_pass(model, BanConfig(tau=0.6, k_min=1))
    assert installed_passes(_routers(model)[0]) == ("pesf", "ban")
    calls, handles = _capture_router_calls(model)
    model(ids)
    for h in handles:
        h.remove()
    for layer, router in enumerate(_routers(model)):
        [(x, weights, indices)] = calls[layer]
        orig_w, orig_i = zip(*[_original_routing(router, x[b])[1:] for b in range(x.shape[0])])
        pesf_w, pesf_i = reference_pesf(torch.cat(orig_w), torch.cat(orig_i), 0.6, seq_len=12)
        ref_w, ref_i = reference_ban(pesf_w, pesf_i, 0.6, 1)
        assert torch.equal(indices, ref_i)
        torch.testing.assert_close(weights.double(), ref_w, rtol=1e-6, atol=1e-7)


def test_ban_reduces_active_experts_and_respects_k_min():
    model = build_tiny("qwen2_moe")  # K = 4, raw softmax weights
    ids = _ids()
    dense = measure_active_experts(model, ids).mean
    apply_router_pass(model, BanConfig(tau=0.5, k_min=2))
    calls, handles = _capture_router_calls(model)
    banned = measure_active_experts(model, ids)
    for h in handles:
        h.remove()
    assert dense == 4.0 and 2.0 <= banned.mean < 4.0
    for layer in calls:
        [(_, weights, indices)] = calls[layer]
        assert ((indices < N).sum(-1) >= 2).all()


# ------------------------------------------------------------------------------------------------
# torch.export, torch.compile, hyper-parameters without recompiling


@pytest.mark.parametrize("arch", ARCHS)
def test_export_and_compile_fullgraph(arch):
    model = build_tiny(arch, experts_implementation="batched_mm")  # the eager experts loop is data-dependent
    ids = _ids()
    apply_router_pass(model, PESFConfig(alpha=0.5))
    apply_router_pass(model, BanPickConfig(tau=0.7, picks=[2], boost=0.5))
    eager = model(ids, use_cache=False).logits
    plain = build_tiny(arch, experts_implementation="batched_mm")(ids, use_cache=False).logits
    assert not torch.allclose(eager, plain)  # non-neutral: the passes change the model

    exported = torch.export.export(model, (ids,), kwargs={"use_cache": False}, strict=False)
    torch.testing.assert_close(exported.module()(ids, use_cache=False).logits, eager)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_changing_a_buffer_does_not_recompile(arch):
    from torch._dynamo.testing import CompileCounter

    model = build_tiny(arch, experts_implementation="batched_mm")
    ids = _ids()
    ref = model(ids, use_cache=False).logits
    apply_router_pass(model, PESFConfig(alpha=0.0))
    apply_router_pass(model, BanConfig(tau=1.0))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    assert torch.equal(compiled(ids, use_cache=False).logits, ref)

    set_router_pass_buffer(model, "pesf_alpha", 0.7)
    set_router_pass_buffer(model, "ban_tau", {"model.layers.1.mlp.gate": 0.6})
    changed = compiled(ids, use_cache=False).logits
    assert counter.frame_count == 1
    assert not torch.allclose(changed, ref)  # the buffers are graph inputs, not baked constants
    torch.testing.assert_close(changed, model(ids, use_cache=False).logits)


def test_inductor_compiles_a_passed_router():
    model = build_tiny("qwen3_moe")
    block = model.model.layers[0].mlp
    apply_router_pass(model, PESFConfig(alpha=0.6))
    apply_router_pass(model, BanPickConfig(tau=0.6, picks=[1], boost=0.5))
    x = torch.randn(2, 16, 64)
    logits, weights, indices = block.gate(x)
    torch._dynamo.reset()
    compiled = torch.compile(block.gate, fullgraph=True, backend="inductor")
    c_logits, c_weights, c_indices = compiled(x)
    assert torch.equal(c_indices, indices) and (indices == N).any()
    torch.testing.assert_close(c_weights, weights)
    torch.testing.assert_close(c_logits, logits)


# ------------------------------------------------------------------------------------------------
# torchao entry points, per-layer values, errors


def test_quantize_with_is_moe_router_and_fqn_to_config():
    model = build_tiny("mixtral")
    quantize_(model, BanConfig(tau=0.8), filter_fn=is_moe_router)
    assert all(installed_passes(r) == ("ban",) for r in _routers(model))
    per_layer = FqnToConfig({"model.layers.1.mlp.gate": PESFConfig(alpha=0.4)})
    quantize_(model, per_layer, filter_fn=None)
    assert [installed_passes(r) for r in _routers(model)] == [("ban",), ("ban", "pesf")]


def test_per_layer_values_resolve_by_router_name():
    model = build_tiny("olmoe")
    config = BanPickConfig(tau=1.0, layer_taus={"model.layers.1.mlp.gate": 0.7},
                           layer_picks={"model.layers.0.mlp": [4]}, layer_boosts={"model.layers.0.mlp.gate": 0.5})
    with pytest.raises(ValueError, match="per-layer values"):
        quantize_(model, config, filter_fn=is_moe_router)
    apply_router_pass(model, config)
    r0, r1 = _routers(model)
    assert r0.ban_tau.item() == 1.0 and r1.ban_tau.item() == pytest.approx(0.7)
    assert r0.pick_mask.nonzero().flatten().tolist() == [4] and not r1.pick_mask.any()
    assert r0.ban_protected.nonzero().flatten().tolist() == [4]
    assert r0.pick_boost.item() == 0.5 and r1.pick_boost.item() == 0.0
    with pytest.raises(ValueError, match="name no MoE router"):
        apply_router_pass(build_tiny("olmoe"), BanConfig(layer_taus={"model.layers.9.mlp.gate": 0.5}))


def test_a_pass_installs_once_and_state_dict_round_trips():
    model = build_tiny("deepseek_v2")
    apply_router_pass(model, PESFConfig(alpha=0.3))
    with pytest.raises(ValueError, match="already installed"):
        apply_router_pass(model, PESFConfig(alpha=0.5))
    fresh = build_tiny("deepseek_v2", seed=5)
    fresh.load_state_dict(model.state_dict())  # same keys, strict
    ids = _ids()
    apply_router_pass(fresh, PESFConfig(alpha=0.3))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_dense_model_is_a_clear_error():
    dense = build_tiny("llama")
    with pytest.raises(ValueError, match="no MoE layer.*Qwen3MoeTopKRouter"):
        apply_router_pass(dense, PESFConfig())
    with pytest.raises(ValueError, match="no MoE layer"):
        measure_active_experts(dense, _ids())


def test_unsupported_router_is_a_clear_error():
    class ToyTopKRouter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            logits = x @ self.weight.T
            w, i = logits.softmax(-1).topk(2)
            return logits, w, i

    class ToySparseMoeBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = ToyTopKRouter()
            self.experts = torch.nn.Linear(8, 8)

    model = torch.nn.Sequential(ToySparseMoeBlock())
    assert not is_moe_router(model[0].gate)
    with pytest.raises(ValueError, match=r"unsupported router.*ToyTopKRouter.*supported routers: Qwen3MoeTopKRouter"):
        apply_router_pass(model, BanConfig())
