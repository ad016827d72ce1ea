"""Whole-model methods (``recipes.METHODS``) on a tiny random Llama, against float64 references.

For every method: each quantized linear stores the float64 reference quantization (``reference.py``,
written from the OCP spec) of the weight it was given, rotated by the rotation the method names (checked
against the closed-form Hadamard); each linear computes ``Q_a(x R) Q(W R)^T`` in a forward pass; the output
head, embeddings and norms stay in high precision. Model-level methods (QuaRot, BRQ, DartQuant) are
checked before quantization too: the fused weights follow QuaRot's formulas in float64 and the fp model's
logits are unchanged up to float rounding.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from reference import ref_fake_quantize, ref_hadamard
from torchao_mx_ext import RotatedMXFP4Tensor
from torchao_mx_ext import recipes
from torchao_mx_ext.recipes import METHODS, QuantSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, INTER, VOCAB, LAYERS = 64, 32, 2, 1, 172, 128, 2
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Tied embeddings (QuaRot must untie them), GQA (2 query heads per kv head), an MLP width that is no
    multiple of 32 (172, padded to 192) and non-trivial RMSNorm weights (folding must show)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=64,
        tie_word_embeddings=True, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() == 1 else 0.08)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def fp_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def block_diag(block: torch.Tensor, copies: int) -> torch.Tensor:
    return torch.block_diag(*[block.double()] * copies)


def is_signed_hadamard(r: torch.Tensor, n: int) -> torch.Tensor:
    """``r = D H_n / sqrt(n)`` with ``D`` a diagonal of signs: return the signs (asserting the form)."""
    h = ref_hadamard(n)
    d = r.double() @ h.T
    signs = torch.diagonal(d).round()
    assert torch.equal(signs.abs(), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(d, torch.diag(signs), rtol=0, atol=1e-5)
    return signs


def assert_orthogonal_hadamard_like(r: torch.Tensor) -> None:
    """An orthogonal matrix whose entries all have magnitude 1/sqrt(n): a normalised Hadamard matrix."""
    n = r.shape[0]
    r = r.double()
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(r.abs(), torch.full_like(r, n**-0.5), rtol=0, atol=1e-7)


def check_quantized_model(model, given: dict, ids, rule: str, act_rule, rotation_of) -> None:
    """Every decoder linear stores ``ref Q(fl32(W_pad R))`` of the weight it was ``given`` (float32,
    ``fqn -> tensor``) with ``R`` checked by ``rotation_of(fqn, block)``, and in a forward pass computes
    ``ref Q_a(x R) Q(W R)^T`` from its actual input; the output head is not quantized."""
    assert not isinstance(model.lm_head.weight, RotatedMXFP4Tensor)
    linears = {f"model.layers.{i}.{n}": model.get_submodule(f"model.layers.{i}.{n}") for i in range(LAYERS) for n in LINEARS}
    seen = {}

    def record(module, args, out, fqn):
        seen.setdefault(fqn, (args[0].detach(), out.detach()))  # returns None: the output is kept

    hooks = [lin.register_forward_hook(lambda m, a, out, fqn=fqn: record(m, a, out, fqn)) for fqn, lin in linears.items()]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    for fqn, lin in linears.items():
        w = lin.weight
        assert isinstance(w, RotatedMXFP4Tensor), fqn
        assert (w.scale_rule, w.act_scale_rule, w.block_size) == (rule, act_rule, 32), fqn
        width = given[fqn].shape[1]
        assert w.in_features == width and w.padded_in_features == -(-width // 32) * 32, fqn
        rotation_of(fqn, w.rotation)
        src = F.pad(given[fqn].double(), (0, w.padded_in_features - width))
        if w.rotation is not None:
            src = src @ block_diag(w.rotation, w.padded_in_features // w.rotation.shape[0])
        w_q = ref_fake_quantize(src.float(), rule)
        # float32 storage: the reference rounded once (fp_quant's 4/3 is not a float32 number)
        assert torch.equal(w.dequantize(torch.float32), w_q.float()), fqn
        x, y = seen[fqn]
        xr = w.rotate_input(x.reshape(-1, width))
        a = xr.double() if act_rule is None else ref_fake_quantize(xr, act_rule)
        expected = a @ w_q.T
        torch.testing.assert_close(y.reshape(expected.shape).double(), expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item(), msg=fqn)


def r4_only(name: str):
    """Model-level methods: R4 online before down_proj (32-wide Hadamard blocks for the block variants,
    a full-width 192 = padded 172 Hadamard otherwise); every other linear reads already-rotated inputs."""
    def rotation_of(fqn, r):
        if not fqn.endswith("down_proj"):
            assert r is None, fqn
        elif name in ("brq", "dartquant-block", "mxrot-block"):
            torch.testing.assert_close(r.double(), ref_hadamard(32), rtol=0, atol=1e-7)
        else:
            assert r.shape == (192, 192)
            assert_orthogonal_hadamard_like(r)

    return rotation_of


def unquantized_given(state) -> dict:
    return {f"model.layers.{i}.{n}": state[f"model.layers.{i}.{n}.weight"] for i in range(LAYERS) for n in LINEARS}


# -- per-linear methods ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name,rule,act_rule", [("rtn", "floor", None), ("block-rot", "mse", "floor"), ("global-rot", "even", "rceil")]
)
def test_per_linear_methods_store_the_reference_quantization(name, rule, act_rule, ids):
    model = tiny_llama()
    fp = fp_state(model)
    METHODS[name].apply(model, QuantSettings(rule, act_scale_rule=act_rule, seed=3))
    signs = {}

    def rotation_of(fqn, r):
        if name == "rtn":
            assert r is None
        elif name == "block-rot":
            torch.testing.assert_close(r.double(), ref_hadamard(32), rtol=0, atol=1e-7)
        elif fqn.endswith("down_proj"):  # global: full padded width 192 (not a power of two)
            assert r.shape == (192, 192)
            assert_orthogonal_hadamard_like(r)
        else:  # global: D H_64, the same seeded signs for every 64-wide input
            s = is_signed_hadamard(r, HIDDEN)
            assert torch.equal(signs.setdefault("64", s), s) and 0 < int((s < 0).sum()) < HIDDEN

    check_quantized_model(model, unquantized_given(fp), ids, rule, act_rule or rule, rotation_of)
    state = model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(state[key], fp[key]), key  # per-linear methods change the linears only


def test_weight_only_settings_leave_activations_unquantized(ids):
    model = tiny_llama()
    captured = _capture_fused(model, "brq", QuantSettings("mse", weight_only=True), ids)
    assert all(m.weight.act_scale_rule is None for m in model.modules() if isinstance(getattr(m, "weight", None), RotatedMXFP4Tensor))
    # weight-only linears compute (x R) Q(W R)^T, checked per linear against the reference
    check_quantized_model(model, captured["given"], ids, "mse", None, r4_only("brq"))


# -- model-level methods -----------------------------------------------------------------------------

def _capture_fused(model, name, settings, ids):
    """Apply ``METHODS[name]`` and record, just before quantization, the fused fp weights and logits."""
    real, captured = recipes.quantize_linears, {}

    def spy(m, config):
        captured["state"] = fp_state(m)
        captured["logits"] = logits(m, ids)
        captured["given"] = unquantized_given(captured["state"])
        return real(m, config)

    recipes.quantize_linears = spy
    try:
        METHODS[name].apply(model, settings)
    finally:
        recipes.quantize_linears = real
    return captured


def recover_rotations(fp: dict, fused: dict):
    """R1 from the embeddings (``E' = E R1``) and the per-head R2 block from layer 0's o_proj
    (``W_o' = R1^T W_o diag(R2, ...)``), by float64 least squares."""
    r1 = torch.linalg.lstsq(fp["model.embed_tokens.weight"].double(), fused["model.embed_tokens.weight"].double()).solution
    w_o = r1.T @ fp["model.layers.0.self_attn.o_proj.weight"].double()
    r2_full = torch.linalg.solve(w_o, fused["model.layers.0.self_attn.o_proj.weight"].double())
    r2 = r2_full[:HEAD_DIM, :HEAD_DIM]
    torch.testing.assert_close(r2_full, block_diag(r2, HEADS), rtol=0, atol=1e-5)  # one R2 for every head
    return r1, r2


def check_fusion(fp: dict, fused: dict, r1: torch.Tensor, r2s) -> None:
    """QuaRot's fusion in float64: norms folded into their readers, R1 on the residual stream (embeddings
    and readers ``W R1``, writers ``R1^T W``), R2 per head between v_proj and o_proj, lm_head untied."""
    def close(key, expected):
        got = fused[key].double()
        torch.testing.assert_close(got, expected, rtol=0, atol=3e-6 * expected.abs().max().item(), msg=key)

    emb = fp["model.embed_tokens.weight"].double()
    close("model.embed_tokens.weight", emb @ r1)
    close("lm_head.weight", emb * fp["model.norm.weight"].double() @ r1)  # tied in fp: lm_head = E
    for i, r2 in zip(range(LAYERS), r2s):
        p = f"model.layers.{i}."
        g_in, g_post = fp[p + "input_layernorm.weight"].double(), fp[p + "post_attention_layernorm.weight"].double()
        w = {n: fp[p + n + ".weight"].double() for n in LINEARS}
        for n in ("self_attn.q_proj", "self_attn.k_proj"):
            close(p + n + ".weight", w[n] * g_in @ r1)
        close(p + "self_attn.v_proj.weight", block_diag(r2, KV_HEADS).T @ (w["self_attn.v_proj"] * g_in) @ r1)
        close(p + "self_attn.o_proj.weight", r1.T @ w["self_attn.o_proj"] @ block_diag(r2, HEADS))
        for n in ("mlp.gate_proj", "mlp.up_proj"):
            close(p + n + ".weight", w[n] * g_post @ r1)
        close(p + "mlp.down_proj.weight", r1.T @ w["mlp.down_proj"])
    for key, value in fused.items():
        if key.endswith("norm.weight"):
            assert torch.equal(value, torch.ones_like(value)), key


def assert_same_function(fused_logits, fp_logits):
    """Equal up to float32 rounding (an error in any fused rotation moves logits by O(their size))."""
    torch.testing.assert_close(fused_logits, fp_logits, rtol=0, atol=1e-5 * fp_logits.abs().max().item())


@pytest.mark.parametrize("name,rule,act_rule", [("quarot", "fp_quant", None), ("brq", "mse", "even")])
def test_model_level_methods_fuse_exactly_then_quantize_to_the_reference(name, rule, act_rule, ids):
    model = tiny_llama()
    fp = fp_state(model)
    fp_logits = logits(model, ids)
    captured = _capture_fused(model, name, QuantSettings(rule, act_scale_rule=act_rule, seed=5), ids)
    assert_same_function(captured["logits"], fp_logits)
    r1, r2 = recover_rotations(fp, captured["state"])
    if name == "brq":  # 32-wide Sylvester blocks, deterministic
        torch.testing.assert_close(r1, block_diag(ref_hadamard(32), HIDDEN // 32), rtol=0, atol=1e-5)
        torch.testing.assert_close(r2, ref_hadamard(HEAD_DIM), rtol=0, atol=1e-5)
        r1, r2 = block_diag(ref_hadamard(32), HIDDEN // 32), ref_hadamard(HEAD_DIM)
    else:  # full-width randomised Hadamards D H: recover the signs, then use the exact matrices
        s1, s2 = is_signed_hadamard(r1, HIDDEN), is_signed_hadamard(r2, HEAD_DIM)
        assert 0 < int((s1 < 0).sum()) < HIDDEN and 0 < int((s2 < 0).sum()) < HEAD_DIM
        r1, r2 = torch.diag(s1) @ ref_hadamard(HIDDEN), torch.diag(s2) @ ref_hadamard(HEAD_DIM)
    check_fusion(fp, captured["state"], r1, [r2] * LAYERS)
    check_quantized_model(model, captured["given"], ids, rule, act_rule or rule, r4_only(name))


@pytest.mark.parametrize("name", ["dartquant", "dartquant-block", "mxrot-block"])
def test_dartquant_methods_fuse_learned_rotations(name, ids):
    model = tiny_llama()
    fp = fp_state(model)
    fp_logits = logits(model, ids)
    calib = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    captured = _capture_fused(model, name, QuantSettings("floor", calib_ids=calib), ids)
    assert_same_function(captured["logits"], fp_logits)
    r1, r2 = recover_rotations(fp, captured["state"])
    eye = torch.eye(HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(r1 @ r1.T, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(r2 @ r2.T, eye[:HEAD_DIM, :HEAD_DIM], rtol=0, atol=1e-5)
    block = HIDDEN if name == "dartquant" else 32
    mask = block_diag(torch.ones(block, block), HIDDEN // block).bool()
    assert bool((r1[~mask].abs() < 1e-5).all())  # dartquant-block: no value crosses an MX block
    # learned from the calibration activations: no longer the randomised Hadamard it started from
    assert (r1[mask].abs() - block**-0.5).abs().max() > 1e-3
    check_quantized_model(model, captured["given"], ids, "floor", "floor", r4_only(name))
    with pytest.raises(ValueError, match="calibration data"):
        METHODS[name].apply(tiny_llama(), QuantSettings("floor"))


# -- the one-line recipe -----------------------------------------------------------------------------

def test_quantize_model_runs_the_named_method_and_checks_first(ids):
    """``tme.quantize_model`` = ``METHODS[method].apply`` with those settings (bit-identical weights);
    bad arguments are refused before the model changes."""
    import torchao_mx_ext as tme

    calib = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    # the defaults: recipes.DEFAULT_METHOD (W4A4) and recipes.DEFAULT_WEIGHT_ONLY_METHOD
    for weight_only, default in [(False, recipes.DEFAULT_METHOD), (True, recipes.DEFAULT_WEIGHT_ONLY_METHOD)]:
        assert recipes.default_method(weight_only) == default
        model = tme.quantize_model(tiny_llama(), calib, weight_only=weight_only)
        reference = tiny_llama()
        METHODS[default].apply(reference, QuantSettings("mse", calib_ids=calib, weight_only=weight_only))
        for (name, w), (_, w_ref) in zip(model.state_dict().items(), reference.state_dict().items()):
            if isinstance(w, RotatedMXFP4Tensor):
                assert torch.equal(w.qdata, w_ref.qdata) and torch.equal(w.scale, w_ref.scale), name
                assert (w.act_scale_rule is None) == weight_only, name
            else:
                assert torch.equal(w, w_ref), name
        assert isinstance(model.model.layers[0].mlp.down_proj.weight, RotatedMXFP4Tensor)

    fresh = tiny_llama()
    before = fp_state(fresh)
    for kwargs, err in [
        (dict(method="nope"), ValueError), (dict(method="fp"), ValueError), (dict(), ValueError),  # no calib_ids
        (dict(method="brq", scale_rule="round"), ValueError), (dict(method="brq", weight_only=1), TypeError),
        (dict(method="brq", seed=-1), ValueError), (dict(method="brq", seed=1.5), TypeError),
        (dict(method="brq", gptaq_alpha=1.5), ValueError), (dict(method="brq", gptaq_alpha="1"), TypeError),
    ]:
        with pytest.raises(err):
            tme.quantize_model(fresh, **kwargs)
    after = fp_state(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_default_falls_back_to_per_linear_where_smoothing_cannot_fold(caplog):
    """W4A4's default smooths first (recipes.DEFAULT_METHOD); a decoder smoothing cannot fold into (an
    MoE) gets the per-linear default with one log line, and weight-only never smooths."""
    from transformers import MixtralConfig, MixtralForCausalLM

    assert recipes.DEFAULT_METHOD.startswith("smooth+") and not recipes.DEFAULT_PER_LINEAR_METHOD.startswith("smooth")
    assert recipes.default_method(False, tiny_llama()) == recipes.DEFAULT_METHOD
    moe = MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    ))
    with caplog.at_level("WARNING", logger="torchao_mx_ext.recipes"):
        assert recipes.default_method(False, moe) == recipes.DEFAULT_PER_LINEAR_METHOD
    assert len(caplog.records) == 1 and "MixtralForCausalLM" in caplog.records[0].getMessage()
    assert recipes.default_method(True, moe) == recipes.default_method(True, tiny_llama()) == recipes.DEFAULT_WEIGHT_ONLY_METHOD


def test_gptaq_alpha_reaches_the_calibration(ids):
    """``gptaq_alpha`` is GPTAQ's ``asymmetric_alpha``: the default is 0.25, and another value gives other
    weights (0: no asymmetric correction at all)."""
    import torchao_mx_ext as tme

    calib = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))

    def codes(**kw):
        model = tme.quantize_model(tiny_llama(), calib, method="gptaq-block-rot", **kw)
        return [w.qdata for w in model.state_dict().values() if isinstance(w, RotatedMXFP4Tensor)]

    default, quarter, none, full = codes(), codes(gptaq_alpha=0.25), codes(gptaq_alpha=0.0), codes(gptaq_alpha=1.0)
    assert all(torch.equal(a, b) for a, b in zip(default, quarter))
    assert not all(torch.equal(a, b) for a, b in zip(default, none))
    assert not all(torch.equal(a, b) for a, b in zip(default, full))
