"""MXFP4 for fused 3-D MoE experts, against an independent float64 reference.

The reference loops over tokens and their top-k slots, skips sentinel slots (expert id == E), and runs
each expert's two projections as float64 ``Q(x R) Q(W_e R)^T`` from tests/reference.py (spec-written
MXFP4, closed-form Hadamard), never calling the package's quantizer.
"""

import io

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import quantize_
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralForCausalLM
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts, Qwen2MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeForCausalLM

from reference import ref_fake_quantize, ref_hadamard
from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config, RotatedMXFP4Tensor, cache_dequantized_weights
from torchao_mx_ext.configs import weight_layout
from torchao_mx_ext.moe.experts import EXPERTS_BACKEND, is_fused_experts, quantize_experts_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles new module instances/classes: without a reset they pile up against Dynamo's
    # recompile limit (8) of the one shared forward function.
    torch._dynamo.reset()
    yield

HIDDEN = 64
ARCHS = {
    # name: (config class, experts class, causal LM class, name of the experts' intermediate size)
    "qwen3": (Qwen3MoeConfig, Qwen3MoeExperts, Qwen3MoeForCausalLM, "moe_intermediate_size"),
    "qwen2": (Qwen2MoeConfig, Qwen2MoeExperts, Qwen2MoeForCausalLM, "moe_intermediate_size"),
    "mixtral": (MixtralConfig, MixtralExperts, MixtralForCausalLM, "intermediate_size"),
}


def tiny_config(arch, num_experts=4, inter=64, top_k=2):
    config_cls, _, _, inter_name = ARCHS[arch]
    experts = {"num_local_experts": num_experts} if arch == "mixtral" else {"num_experts": num_experts}
    extra = {"shared_expert_intermediate_size": 32} if arch == "qwen2" else {}
    config = config_cls(
        vocab_size=96, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts_per_tok=top_k, **{inter_name: inter}, **experts, **extra,
    )
    config._experts_implementation = "eager"
    return config


def random_experts(arch, num_experts, inter, seed=0):
    module = ARCHS[arch][1](tiny_config(arch, num_experts, inter))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=g) * 0.2)
        module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=g) * 0.2)
        module.down_proj[0, :, 3] *= 20  # an outlier input channel, which rotations spread
    return module


def random_routing(num_tokens, num_experts, top_k, seed=0):
    """Distinct experts per token; slot value ``num_experts`` = sentinel (with a nonzero weight, to
    show it is skipped, not merely zero-weighted). Token 1 is all sentinels."""
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num_experts + 1, generator=g)[:top_k] for _ in range(num_tokens)])
    index[1] = num_experts
    index[2, 0] = num_experts
    weights = torch.rand(num_tokens, top_k, generator=g) + 0.1
    assert (index == num_experts).sum() >= top_k + 1
    return index, weights


# -- float64 reference --------------------------------------------------------------------------
def ref_quantized_weight(w, rotation64, rule):
    """Q(W R) in float64 for a 2-D weight, zero-padded to the rotation/block width (rotated in float64,
    stored from float32, as documented by RotatedMXFP4Tensor)."""
    k = w.shape[-1]
    size = 32 if rotation64 is None else rotation64.shape[0]
    kp = -(-(-(-k // 32) * 32) // size) * size
    wp = F.pad(w.double(), (0, kp - k))
    if rotation64 is not None:
        wp = wp @ torch.block_diag(*[rotation64] * (kp // size))
    return ref_fake_quantize(wp.float().double(), rule)


def ref_linear(x, wq, rotation64, act_rule):
    """float64 Q_a(x R) wq^T for one token's row ``x`` (its float32 value quantized, like the module's)."""
    kp = wq.shape[-1]
    xp = F.pad(x.float().double(), (0, kp - x.shape[-1]))
    if rotation64 is not None:
        size = rotation64.shape[0]
        xp = xp @ torch.block_diag(*[rotation64] * (kp // size))
    xq = xp if act_rule is None else ref_fake_quantize(xp.float().double(), act_rule)
    return xq @ wq.T


def ref_experts(x, index, weights, gate_up, down, rot_h, rot_i, rule, act_rule):
    num_experts = gate_up.shape[0]
    q_gate_up = [ref_quantized_weight(w, rot_h, rule) for w in gate_up]
    q_down = [ref_quantized_weight(w, rot_i, rule) for w in down]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            if e == num_experts:
                continue  # sentinel: skipped
            gate, up = ref_linear(x[t : t + 1], q_gate_up[e], rot_h, act_rule).chunk(2, dim=-1)
            h = F.silu(gate) * up
            out[t] += weights[t, slot].double() * ref_linear(h, q_down[e], rot_i, act_rule)[0]
    return out


# -- numerics -----------------------------------------------------------------------------------
CASES = [
    # (arch, experts, intermediate size, config, float64 rotation block for width 64 (hidden), for inter)
    ("qwen3", 8, 96, MXFP4BlockRotConfig(scale_rule="floor"), lambda: ref_hadamard(32), lambda: ref_hadamard(32)),
    ("mixtral", 4, 40, MXFP4BlockRotConfig(scale_rule="even"), lambda: ref_hadamard(32), lambda: ref_hadamard(32)),
    ("qwen2", 4, 64, MXFP4Config(scale_rule="floor"), lambda: None, lambda: None),
    ("qwen3", 4, 40, MXFP4Config(scale_rule="even", act_quant=False), lambda: None, lambda: None),
    ("mixtral", 8, 64, MXFP4BlockRotConfig(scale_rule="floor", act_quant=False), lambda: ref_hadamard(32), lambda: ref_hadamard(32)),
    # full-width ("global") rotation; inter 40 is padded to 64 and rotated by H64
    ("qwen3", 4, 40, MXFP4BlockRotConfig(scale_rule="rceil", rotation_size=None), lambda: ref_hadamard(64), lambda: ref_hadamard(64)),
    ("qwen3", 4, 96, MXFP4BlockRotConfig(), lambda: ref_hadamard(32), lambda: ref_hadamard(32)),  # default rule (mse)
]


@pytest.mark.parametrize("arch,num_experts,inter,config,rot_h,rot_i", CASES)
def test_experts_match_float64_reference(arch, num_experts, inter, config, rot_h, rot_i):
    module = random_experts(arch, num_experts, inter)
    gate_up, down = module.gate_up_proj.detach().clone(), module.down_proj.detach().clone()
    x = torch.randn(12, HIDDEN)
    index, weights = random_routing(12, num_experts, 2)
    quantize_experts_module(module, config)

    w = module.gate_up_proj
    assert isinstance(w, RotatedMXFP4Tensor) and w.shape == gate_up.shape and module.down_proj.shape == down.shape
    assert isinstance(module, ARCHS[arch][1]) and is_fused_experts(module)
    # the stored weights are Q(W_e R) bit for bit
    assert torch.equal(module.down_proj.dequantize()[1].double(), ref_quantized_weight(down[1], rot_i(), config.scale_rule))

    ref = ref_experts(x, index, weights, gate_up, down, rot_h(), rot_i(), config.scale_rule, config.activation_scale_rule)
    with torch.no_grad():
        eager = module(x, index, weights)
        # Dynamo captures it whole (fullgraph); Inductor is exercised in test_inductor_matches_eager.
        captured = torch.compile(module, fullgraph=True, backend="eager")(x, index, weights)
    assert eager.dtype == torch.float32
    assert torch.equal(eager[1], torch.zeros(HIDDEN))  # all-sentinel token
    scale = ref.abs().max().item()
    torch.testing.assert_close(eager.double(), ref, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(captured, eager, atol=1e-6 * scale, rtol=0)


def test_inductor_matches_eager_with_padding_and_sentinels():
    module = random_experts("mixtral", 4, 40)
    quantize_experts_module(module, MXFP4BlockRotConfig(scale_rule="floor"))
    x = torch.randn(10, HIDDEN)
    index, weights = random_routing(10, 4, 2, seed=3)
    with torch.no_grad():
        eager = module(x, index, weights)
        compiled = torch.compile(module, fullgraph=True, backend="inductor")(x, index, weights)
    torch.testing.assert_close(compiled, eager, atol=1e-6 * eager.abs().max().item(), rtol=0)


def test_sentinel_slots_contribute_nothing():
    module = random_experts("qwen3", 4, 64)
    quantize_experts_module(module, MXFP4BlockRotConfig())
    x = torch.randn(9, HIDDEN)
    index, weights = random_routing(9, 4, 2, seed=1)
    sentinel = index == 4
    # the same routing with each sentinel slot sent to a real expert at weight zero
    index_zeroed, weights_zeroed = index.masked_fill(sentinel, 0), weights.masked_fill(sentinel, 0.0)
    with torch.no_grad():
        y = module(x, index, weights)
        y_zeroed = module(x, index_zeroed, weights_zeroed)
    torch.testing.assert_close(y, y_zeroed, atol=1e-6, rtol=1e-6)
    assert torch.equal(y[1], torch.zeros(HIDDEN))


def test_storage_4_25_bits_and_rotation_shared_with_linears():
    config = MXFP4BlockRotConfig()
    module = random_experts("qwen3", 4, 96)
    quantize_experts_module(module, config)
    for w in (module.gate_up_proj, module.down_proj):
        assert w.qdata.dtype == torch.uint8 and w.scale.dtype == torch.uint8 and w.qdata.dim() == 3
        bits = (w.qdata.numel() * w.qdata.element_size() + w.scale.numel() * w.scale.element_size()) * 8
        assert bits / w.numel() == 4.25
    linear = torch.nn.Linear(96, 8)
    quantize_(linear, config)
    # one 32 x 32 block in memory for experts and linears alike (Parameter() detaches: compare storage)
    block = weight_layout(config, HIDDEN, "cpu")[1]
    rotations = (module.gate_up_proj.rotation, module.down_proj.rotation, linear.weight.rotation, block)
    assert len({r.untyped_storage().data_ptr() for r in rotations}) == 1


def test_dequantized_cache_changes_speed_not_numbers():
    module = random_experts("qwen2", 4, 40)
    quantize_experts_module(module, MXFP4BlockRotConfig())
    x = torch.randn(6, HIDDEN)
    index, weights = random_routing(6, 4, 2)
    with torch.no_grad():
        ref = module(x, index, weights)
        cache_dequantized_weights(module)
        assert module.gate_up_proj.dequantized.shape == (4, 80, 64)
        assert module.down_proj.dequantized.shape == (4, 64, 64)  # padded width
        assert torch.equal(module(x, index, weights), ref)
        assert torch.equal(torch.compile(module, fullgraph=True, backend="eager")(x, index, weights), ref)
        cache_dequantized_weights(module, enabled=False)
        assert module.down_proj.dequantized is None and torch.equal(module(x, index, weights), ref)


def test_state_dict_save_load_round_trip():
    config = MXFP4BlockRotConfig()
    a, b = random_experts("qwen3", 4, 40, seed=1), random_experts("qwen3", 4, 40, seed=2)
    quantize_experts_module(a, config)
    quantize_experts_module(b, config)
    x = torch.randn(5, HIDDEN)
    index, weights = random_routing(5, 4, 2)
    with torch.no_grad():
        ya = a(x, index, weights)
        assert not torch.equal(ya, b(x, index, weights))
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf)  # weights_only=True
        assert set(state) == {"gate_up_proj", "down_proj"} and isinstance(state["down_proj"], RotatedMXFP4Tensor)
        b.load_state_dict(state)
        assert torch.equal(b(x, index, weights), ya)


def test_bfloat16_module():
    module = random_experts("qwen3", 4, 64)
    quantize_experts_module(module, MXFP4BlockRotConfig(scale_rule="floor"))
    x = torch.randn(6, HIDDEN)
    index, weights = random_routing(6, 4, 2)
    with torch.no_grad():
        y32 = module(x, index, weights)
        qdata = module.gate_up_proj.qdata.clone()
        module.to(torch.bfloat16)
        assert module.gate_up_proj.dtype == torch.bfloat16 and torch.equal(module.gate_up_proj.qdata, qdata)
        y16 = module(x.bfloat16(), index, weights.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05 * y32.abs().max().item(), rtol=0.05)


def test_clear_errors_and_filter():
    module = random_experts("qwen3", 4, 64)
    assert is_fused_experts(module, "model.layers.0.mlp.experts")
    assert not is_fused_experts(torch.nn.Linear(4, 4), "lm_head")
    with torch.no_grad():
        module.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_experts_module(module, MXFP4Config())
    ok = random_experts("qwen3", 4, 64)
    quantize_experts_module(ok, MXFP4Config())
    with pytest.raises(TypeError, match="already MXFP4-quantized"):
        quantize_experts_module(ok, MXFP4Config())
    with pytest.raises(TypeError, match="not a fused experts module"):
        quantize_experts_module(torch.nn.Linear(4, 4), MXFP4Config())
    transposed = random_experts("qwen3", 4, 64)
    transposed.is_transposed = True
    with pytest.raises(NotImplementedError, match="transposed"):
        quantize_experts_module(transposed, MXFP4Config())


# -- whole models -------------------------------------------------------------------------------
def tiny_model(arch, inter):
    torch.manual_seed(0)
    config = tiny_config(arch, num_experts=4, inter=inter)
    return ARCHS[arch][2](config).eval()


@pytest.mark.parametrize("arch,inter", [("qwen3", 40), ("qwen2", 64), ("mixtral", 96)])
def test_whole_model_forward(arch, inter):
    model = tiny_model(arch, inter)
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        fp = model(ids).logits
    config = MXFP4BlockRotConfig()
    quantize_(model, config, filter_fn=is_fused_experts)
    experts = [m for m in model.modules() if is_fused_experts(m)]
    assert len(experts) == 2 and all(isinstance(m.down_proj, RotatedMXFP4Tensor) for m in experts)
    assert not any(isinstance(m.weight, RotatedMXFP4Tensor) for m in model.modules() if isinstance(m, torch.nn.Linear))
    quantize_(model, config)  # the linears (the experts are not nn.Linear: the default filter skips them)
    assert isinstance(model.lm_head.weight, RotatedMXFP4Tensor)
    with torch.no_grad():
        q = model(ids).logits
        # the model-wide backend setting cannot route MXFP4 experts elsewhere
        for backend in ("grouped_mm", "batched_mm"):
            model.set_experts_implementation(backend)
            assert torch.equal(model(ids).logits, q)
    assert torch.isfinite(q).all()
    cos = F.cosine_similarity(q.flatten(), fp.flatten(), dim=0)
    assert cos > 0.9, cos  # quantized, so not equal; random tiny models say nothing about accuracy


def test_registered_backend_runs_unquantized_experts():
    assert EXPERTS_BACKEND in ALL_EXPERTS_FUNCTIONS
    model = tiny_model("qwen3", 40)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        ref = model(ids).logits
        model.set_experts_implementation(EXPERTS_BACKEND)
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_ungated_experts_up_proj_only():
    """NemotronH-style experts (has_gate=False: up_proj [E, I, H], act, down_proj)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    config = NemotronHConfig(hidden_size=HIDDEN, moe_intermediate_size=40, n_routed_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    module = NemotronHExperts(config)
    with torch.no_grad():
        module.up_proj.normal_(0, 0.2)
        module.down_proj.normal_(0, 0.2)
    x = torch.randn(7, HIDDEN)
    index = torch.randint(0, 4, (7, 2))  # NemotronH's eager path has no sentinel skip
    weights = torch.rand(7, 2)
    with torch.no_grad():
        ref = module(x, index, weights)
        torch.testing.assert_close(ALL_EXPERTS_FUNCTIONS[EXPERTS_BACKEND](module, x, index, weights), ref)
        quantize_experts_module(module, MXFP4BlockRotConfig())
        assert isinstance(module.up_proj, RotatedMXFP4Tensor) and module.up_proj.shape == (4, 40, HIDDEN)
        y = module(x, index, weights)
    assert (y - ref).norm() / ref.norm() < 0.5  # quantized (W4A4), not broken


def test_eager_drops_pruned_pairs_before_any_gemm(monkeypatch):
    # Pruning must save work, not only zero it: in eager, the GEMMs see the valid pairs only.
    import torchao_mx_ext.moe.experts as experts_mod

    module = random_experts("qwen3", 4, 64)
    quantize_experts_module(module, MXFP4BlockRotConfig())
    x = torch.randn(9, HIDDEN)
    index, weights = random_routing(9, 4, 2, seed=1)
    rows, real = [], experts_mod.grouped_gemm
    monkeypatch.setattr(experts_mod, "grouped_gemm", lambda a, w, o: rows.append(a.shape[0]) or real(a, w, o))
    with torch.no_grad():
        module(x, index, weights)
    valid = int((index < 4).sum())
    assert 0 < valid < index.numel() and rows == [valid, valid]


def test_quantized_moe_model_pickles_whole():
    import io
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _router_tiny_models import build_tiny
    from torchao_mx_ext.configs import quantize_linears

    model = quantize_linears(build_tiny("qwen3_moe"), MXFP4BlockRotConfig())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    experts = loaded.model.layers[0].mlp.experts
    assert type(experts) is type(model.model.layers[0].mlp.experts)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
