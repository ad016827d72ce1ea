"""DartQuant learned rotations: the optimisers (QR-Orth, Cayley SGD), activation collection on the
folded model, and the whole flow learn_rotations -> fuse_rotations on stories260k and tiny Llamas."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torchao_mx_ext.calibration.dartquant import (
    collect_activations, learn_rotations, random_hadamard_blocks,
)
from torchao_mx_ext.calibration.orthogonal import (
    CayleySGD, QROrth, block_diag, mxfp4_error_loss, orthogonality_error, rotate, sign_fixed_qr, train_rotation,
    whip_loss,
)
from torchao_mx_ext.rotation.fusion import fold_rms_norms, fuse_rotations, untie_embeddings

from reference import ref_fake_quantize

# few tokens, few epochs, a larger lr and sample fraction than DartQuant's defaults: fast and
# still enough steps to see the loss fall
FAST = dict(epochs=4, sample_fraction=0.25, r1_lr=1e-2, r2_lr=1e-2)


def _tiny_llama(hidden=128, heads=2, kv_heads=1, tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-unit norm weights, so a folding mistake would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stories():
    from torchao_mx_ext.zoo import load_model

    model, _ = load_model("stories260k")
    gen = torch.Generator().manual_seed(0)
    return model, torch.randint(3, 512, (4, 64), generator=gen)


@pytest.fixture(scope="module")
def learned(stories):
    model, ids = stories
    return {block: learn_rotations(model, ids, block=block, **FAST) for block in (None, 32)}


def _max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# optimisers
# ---------------------------------------------------------------------------------------------
def test_whip_loss_is_mean_over_rows_of_sum_exp_minus_abs():
    o = torch.randn(5, 3, 4, dtype=torch.float64)
    ref = sum(torch.exp(-o[i].abs()).sum() for i in range(5)) / 5
    assert torch.allclose(whip_loss(o), ref)


def test_sign_fixed_qr_is_unique_and_identity_on_orthogonal_input():
    z = torch.randn(3, 8, 8, dtype=torch.float64)
    q = sign_fixed_qr(z)
    u = q.transpose(-2, -1) @ z  # the triangular factor
    assert (torch.diagonal(u, dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(torch.triu(u), u, atol=1e-12)
    # positive column scaling of Z does not change Q; an orthogonal Z is its own Q
    assert torch.allclose(sign_fixed_qr(z * torch.rand(3, 1, 8, dtype=torch.float64).add(0.5)), q, atol=1e-12)
    h = random_hadamard_blocks(64, 32, seed=3)
    assert torch.allclose(sign_fixed_qr(h), h, atol=1e-12)


def test_block_rotation_equals_dense_block_diagonal():
    blocks = random_hadamard_blocks(96, 32, seed=1)
    x = torch.randn(7, 2, 96, dtype=torch.float64)
    assert torch.allclose(rotate(x, blocks), x @ block_diag(blocks))
    full = random_hadamard_blocks(96, None, seed=1)
    assert torch.allclose(rotate(x, full), x @ full[0])


def _hidden_rotation_rows(n, d, block=None, seed=0):
    """Rows ``x = u Q0^T`` with ``|u_i|`` near 1 (the whip loss's optimum for a fixed energy) behind a
    hidden random orthogonal ``Q0`` (block-diagonal for ``block``): ``R = Q0`` reaches ~``d/e``."""
    from torchao_mx_ext.rotation.hadamard import random_orthogonal

    gen = torch.Generator().manual_seed(seed)
    u = torch.sign(torch.randn(n, d, generator=gen)) * (1 + 0.1 * torch.randn(n, d, generator=gen))
    size = d if block is None else block
    q0 = torch.block_diag(*[random_orthogonal(size, seed + k).float() for k in range(d // size)])
    return u @ q0.T


@pytest.mark.parametrize("method", ["qr", "cayley"])
@pytest.mark.parametrize("block", [None, 16])
def test_optimisers_stay_orthogonal_and_lower_the_whip_loss(method, block):
    torch.manual_seed(0)
    data = _hidden_rotation_rows(4096, 64, block)
    init = random_hadamard_blocks(64, block, seed=0)
    blocks, stats = train_rotation(data, init, method=method, lr=1e-2, epochs=5, seed=0)
    assert blocks.dtype == torch.float64 and blocks.shape == init.shape
    assert orthogonality_error(blocks) < 1e-10  # float64 result
    assert stats.orthogonality_error < 1e-4  # the optimiser's own float32 matrix
    assert stats.loss_final < stats.loss_init
    assert stats.loss_per_epoch[-1] < stats.loss_per_epoch[0]
    assert stats.steps == 5 * (410 // 64 + 1)


def test_mxfp4_error_loss_and_its_gradient_against_float64():
    """The loss is the relative MXFP4 error per row (blocks of 32 over the flattened row, as the
    quantizer lays out an R2 row [heads, head_dim]) against the float64 reference quantizer, and its
    gradient the exact almost-everywhere one, 2 (o - Q(o)) / mean(o^2) / rows."""
    gen = torch.Generator().manual_seed(0)
    o = (torch.randn(6, 2, 32, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 30.0]).view(1, 2, 1))
    o.requires_grad_(True)
    loss = mxfp4_error_loss(o, 32, "floor")
    rows = o.detach().reshape(6, 64)
    q = ref_fake_quantize(rows, "floor").double()
    energy = rows.pow(2).mean(-1)
    ref = ((rows - q).pow(2).sum(-1) / energy).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    loss.backward()
    torch.testing.assert_close(o.grad.reshape(6, 64), 2 * (rows - q) / energy[:, None] / 6, rtol=1e-12, atol=0)


def test_mx_aware_rotation_lowers_the_mxfp4_error_and_stays_orthogonal():
    """Rows with a massive channel per 32-block (the outliers rotations exist for): learning 32-wide
    blocks on the MXFP4 error lowers it below the random-Hadamard start, with orthogonal blocks."""
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(2048, 64, generator=gen) * 0.5
    data[:, 5] *= 40
    data[:, 37] *= 25
    init = random_hadamard_blocks(64, 32, seed=0)
    blocks, stats = train_rotation(data, init, lr=1e-3, epochs=5, seed=0, loss_fn=lambda o: mxfp4_error_loss(o, 32, "floor"))
    assert orthogonality_error(blocks) < 1e-10 and stats.orthogonality_error < 1e-4
    assert stats.loss_per_epoch[-1] < stats.loss_init
    identity = mxfp4_error_loss(data, 32, "floor").item()
    assert stats.loss_final < identity  # and the rotation helps at all against no rotation
    with torch.no_grad():
        rotated = rotate(data, blocks.float())
    assert mxfp4_error_loss(rotated, 32, "floor").item() == pytest.approx(stats.loss_final, rel=1e-5)


def test_cayley_and_qr_start_from_the_same_point():
    init = random_hadamard_blocks(32, None, seed=0)
    assert torch.allclose(QROrth(init, 1e-3).current().double(), init, atol=1e-6)
    assert torch.allclose(CayleySGD(init, 1e-3).current().double(), init, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def _folded_inputs(model, ids):
    """q_proj / up_proj / o_proj inputs of a folded copy (the reference for the hooks)."""
    folded = copy.deepcopy(model)
    untie_embeddings(folded)
    fold_rms_norms(folded)
    seen = {}
    handles = []
    for i, layer in enumerate(folded.model.layers):
        for name, lin in (("q", layer.self_attn.q_proj), ("up", layer.mlp.up_proj), ("o", layer.self_attn.o_proj)):
            handles.append(lin.register_forward_pre_hook(
                lambda m, a, key=(name, i): seen.__setitem__(key, a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        folded(ids)
    for h in handles:
        h.remove()
    return seen


def test_collected_activations_are_the_folded_models_inputs():
    model = _tiny_llama(hidden=64, heads=4, kv_heads=2)
    ids = torch.randint(0, 96, (3, 10))
    # budgets above the token count keep every token, in order
    acts = collect_activations(model, ids, r1_max_rows=10**6, r2_max_tokens=10**6, forward_batch=2)
    ref = _folded_inputs(model, ids)
    expect_r1 = torch.cat([ref[(src, i)] for i in range(2) for src in ("q", "up")])
    assert acts.r1.shape == (2 * 2 * 30, 64) and acts.tokens == 30
    assert torch.allclose(acts.r1, expect_r1, atol=1e-6, rtol=1e-5)
    for i in range(2):
        assert acts.r2[i].shape == (30, 4, 16)
        assert torch.allclose(acts.r2[i].reshape(30, 64), ref[("o", i)], atol=1e-6, rtol=1e-5)


def test_subsampling_bounds_the_rows():
    model = _tiny_llama(hidden=64, heads=4, kv_heads=2)
    ids = torch.randint(0, 96, (4, 32))
    acts = collect_activations(model, ids, r1_max_rows=40, r2_max_tokens=17)
    assert acts.r1.shape == (40, 64)  # 10 rows from each of 2 layers x {q, up}
    assert all(r.shape == (17, 4, 16) for r in acts.r2)


# ---------------------------------------------------------------------------------------------
# learn_rotations on stories260k
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [None, 32])
def test_learned_rotations_are_orthogonal_and_shaped(learned, block):
    r1, r2, _ = learned[block]
    assert r1.dtype == torch.float64 and r1.shape == (64, 64)
    assert len(r2) == 5 and all(r.dtype == torch.float64 and r.shape == (8, 8) for r in r2)
    eye = torch.eye(64, dtype=torch.float64)
    assert (r1.T @ r1 - eye).norm() < 1e-4
    assert all((r.T @ r - torch.eye(8, dtype=torch.float64)).norm() < 1e-4 for r in r2)


def test_block_variant_is_block_diagonal(learned):
    r1, _, stats = learned[32]
    mask = torch.block_diag(*([torch.ones(32, 32)] * 2)).bool()
    assert (r1[~mask] == 0).all()
    assert stats.r1.block == 32 and stats.r1.width == 64
    full, _, _ = learned[None]
    assert (full[~mask] != 0).sum() > 1000  # the full variant really mixes across blocks


@pytest.mark.parametrize("block", [None, 32])
def test_whip_loss_falls_during_calibration(learned, block):
    _, _, stats = learned[block]
    assert stats.r1.loss_per_epoch[-1] < stats.r1.loss_per_epoch[0]
    assert stats.r1.loss_final < stats.r1.loss_init  # better than the random-Hadamard start
    assert len(stats.r1.loss_per_epoch) == FAST["epochs"]
    r2_init = sum(s.loss_init for s in stats.r2)
    r2_final = sum(s.loss_final for s in stats.r2)
    assert r2_final < r2_init
    assert stats.total_time_s > 0 and stats.r1.steps > 0
    record = json.loads(json.dumps(stats.to_dict()))  # callers log it as JSON
    assert record["r1"]["loss_final"] == stats.r1.loss_final and record["settings"]["block"] == block


def test_mx_aware_learning_on_stories260k(stories):
    """``loss="mxfp4"``: the MXFP4 error of the collected activations falls during calibration; the
    result is block-diagonal and orthogonal; bad loss names and scale rules are refused up front."""
    model, ids = stories
    r1, r2, stats = learn_rotations(model, ids, block=32, loss="mxfp4", scale_rule="mse", **FAST)
    assert stats.settings["loss"] == "mxfp4" and stats.settings["scale_rule"] == "mse"
    assert stats.r1.loss_final < stats.r1.loss_init
    assert sum(s.loss_final for s in stats.r2) < sum(s.loss_init for s in stats.r2)
    eye = torch.eye(64, dtype=torch.float64)
    assert (r1.T @ r1 - eye).abs().max() < 1e-10
    mask = torch.block_diag(*([torch.ones(32, 32)] * 2)).bool()
    assert (r1[~mask] == 0).all()
    with pytest.raises(ValueError, match="unknown rotation loss 'mse'"):
        learn_rotations(model, ids, block=32, loss="mse")
    with pytest.raises(ValueError, match="scale"):
        learn_rotations(model, ids, block=32, loss="mxfp4", scale_rule="nearest")


def test_zero_epochs_returns_the_random_hadamard_init(stories):
    model, ids = stories
    r1, r2, stats = learn_rotations(model, ids, epochs=0, seed=5)
    # the sign-fixed QR of the (orthogonal) start is the start itself: a randomised Hadamard
    assert torch.allclose(r1.abs(), torch.full((64, 64), 1 / 8, dtype=torch.float64), atol=1e-12)
    assert all(torch.allclose(r.abs(), torch.full((8, 8), 8**-0.5, dtype=torch.float64), atol=1e-12) for r in r2)
    again, _, _ = learn_rotations(model, ids, epochs=0, seed=5)
    other, _, _ = learn_rotations(model, ids, epochs=0, seed=6)
    assert torch.equal(r1, again) and not torch.equal(r1, other)
    assert stats.r1.loss_per_epoch == [] and stats.r1.loss_final == stats.r1.loss_init


def test_cayley_lowers_the_loss_and_stays_orthogonal(stories):
    model, ids = stories
    r1, r2, stats = learn_rotations(model, ids, method="cayley", **FAST)
    assert stats.r1.loss_final < stats.r1.loss_init
    assert stats.r1.orthogonality_error < 1e-4
    assert (r1.T @ r1 - torch.eye(64, dtype=torch.float64)).norm() < 1e-4


@pytest.mark.parametrize("block", [None, 32])
def test_fused_learned_rotations_keep_the_fp_model_exact(stories, learned, block):
    model, _ = stories
    r1, r2, _ = learned[block]
    ids = torch.randint(0, 512, (1, 96), generator=torch.Generator().manual_seed(1))
    fused = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(ids).logits
        fuse_rotations(fused, r1, r2)
        out = fused(ids).logits
    assert _max_rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("block", [None, 32])
def test_tiny_llama_with_wide_heads_block_r2_and_fusion(block):
    # head_dim 64: the block variant learns two independent 32-wide blocks per R2
    model = _tiny_llama(hidden=128, heads=2, kv_heads=1)
    ids = torch.randint(0, 96, (4, 32))
    r1, r2, stats = learn_rotations(model, ids, block=block, **FAST)
    assert r1.shape == (128, 128) and all(r.shape == (64, 64) for r in r2)
    if block:
        mask = torch.block_diag(torch.ones(32, 32), torch.ones(32, 32)).bool()
        assert all((r[~mask] == 0).all() for r in r2) and stats.r2[0].block == 32
    fused = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(ids).logits
        fuse_rotations(fused, r1, r2)
        assert _max_rel_err(fused(ids).logits, ref) <= 1e-4


def test_learn_rotations_does_not_modify_the_model(stories):
    model, ids = stories
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.train()
    learn_rotations(model, ids, epochs=1)
    assert model.training  # mode restored
    model.eval()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.config.tie_word_embeddings == tied
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bad_calibration_ids_are_clear_errors(stories):
    model, _ = stories
    with pytest.raises(ValueError, match="longer than the model's max_position_embeddings \\(512\\)"):
        learn_rotations(model, torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        learn_rotations(model, torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        learn_rotations(model, torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="shape \\[n, seq_len\\]"):
        learn_rotations(model, torch.zeros(16, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        learn_rotations(model, torch.zeros(1, 16))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        learn_rotations(model, torch.full((1, 16), 512, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown rotation optimiser"):
        learn_rotations(model, torch.zeros(1, 16, dtype=torch.long), method="adam")


def test_block_that_does_not_divide_the_width_is_a_clear_error():
    model = _tiny_llama(hidden=96, heads=2, kv_heads=1)  # 96 = 3 x 32 works; 48 does not divide it
    with pytest.raises(ValueError, match="not a multiple of the rotation block 64"):
        learn_rotations(model, torch.zeros(1, 8, dtype=torch.long), block=64, epochs=0)
