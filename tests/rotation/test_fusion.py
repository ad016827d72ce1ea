import pytest
import torch

from torchao_mx_ext.architectures import decoder_layers, high_precision_modules
from torchao_mx_ext.rotation.fusion import (
    block_diagonal, fold_rms_norms, fuse_rotations, head_dim_of, norm_weight_offset, value_rows,
)

from decoder_families import MODELS, REFUSED, SMALL, max_rel_err, randomise_biases, randomise_norms


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("block", [None, 32])
def test_fused_rotations_keep_the_fp_model_exact(arch, block):
    torch.manual_seed(0)
    model = randomise_biases(randomise_norms(MODELS[arch]())).eval()  # Qwen2: q/k/v biases; Granite: all
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        r1 = block_diagonal("random_hadamard", 64, block, 1)
        r2 = block_diagonal("random_hadamard", head_dim_of(model), block, 2)
        fuse_rotations(model, r1, r2)
        out = model(ids).logits
    assert max_rel_err(out, ref) <= 1e-4
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    unit = 1 - norm_weight_offset(model)  # the weight of an unscaled norm: 1, or 0 where it scales by 1 + w
    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(bool((m.weight == unit).all()) for m in norms + [model.model.norm])
    # the rotation really changed the weights
    assert not torch.allclose(model.model.embed_tokens.weight @ r1.T.float(), model.model.embed_tokens.weight)


@pytest.mark.parametrize(
    "alias,vocab,r1,r2",
    [
        ("stories260k", 512, ("random_hadamard", 64), ("hadamard", 8)),
        # the real 135M model (converted once from the PyPI GGUF into the ignored cache), with
        # QuaRot-style full-width rotations (576 = 12*12*4 Hadamard)
        ("smollm2-135m", 49152, ("random_hadamard", 576), ("random_hadamard", 64)),
    ],
)
def test_fusion_exact_on_real_models(alias, vocab, r1, r2):
    from torchao_mx_ext.zoo import load_model

    model, _ = load_model(alias)
    ids = torch.randint(0, vocab, (1, 64))
    with torch.no_grad():
        ref = model(ids).logits
        fuse_rotations(model, block_diagonal(*r1, None, 0), block_diagonal(*r2, None, 1))
        assert max_rel_err(model(ids).logits, ref) <= 1e-4


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    supported = ("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, "
                 "GraniteForCausalLM, GemmaForCausalLM")
    with pytest.raises(NotImplementedError, match=supported):
        fuse_rotations(model, torch.eye(32), torch.eye(16))


@pytest.mark.parametrize("arch", list(REFUSED))
def test_post_sublayer_norms_are_refused_with_the_reason(arch):
    model = REFUSED[arch]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reason = f"cannot be fused exactly into {type(model).__name__}: its post-sublayer RMSNorms"
    for fuse in (lambda: fuse_rotations(model, torch.eye(64), torch.eye(32)), lambda: fold_rms_norms(model)):
        with pytest.raises(NotImplementedError, match=reason):
            fuse()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any change


def test_post_sublayer_norm_does_not_commute_with_a_rotation():
    # why Gemma 2/3 are refused: x / rms(x) * (1 + w) then R1 differs from the same norm of x R1 with any
    # weight, unless 1 + w is constant (here even the best per-channel scale for the rotated input misses)
    torch.manual_seed(0)
    x, s = torch.randn(256, 64, dtype=torch.float64), 1 + 0.5 * torch.randn(64, dtype=torch.float64)
    r1 = block_diagonal("random_hadamard", 64, 32, 0)

    def unit(v):  # the unscaled RMSNorm: unit(v R1) = unit(v) R1
        return v / v.pow(2).mean(-1, keepdim=True).sqrt()

    want, got = (unit(x) * s) @ r1, unit(x @ r1)
    best = (want * got).sum(0) / got.pow(2).sum(0)  # the per-channel scale s' minimising |got * s' - want|
    assert max_rel_err(got * best, want) > 0.2  # 0.41 here; exact fusion would give ~1e-16
    assert max_rel_err(unit(x @ r1) * 1.7, (unit(x) * 1.7) @ r1) < 1e-12  # a constant scale commutes


@pytest.mark.parametrize("arch", ["phi3", "granite", "gemma", *REFUSED])
def test_layers_and_high_precision_modules_of_new_families(arch):
    model = (MODELS.get(arch) or REFUSED[arch])()
    assert decoder_layers(model) is model.model.layers and len(model.model.layers) == 2
    assert high_precision_modules(model) == {"lm_head"}


def test_fused_qkv_value_rows():
    model = MODELS["phi3"]()
    attn = model.model.layers[0].self_attn
    lin, rows = value_rows(attn, head_dim_of(model))
    # q: 4 heads x 16, k and v: 2 heads x 16 each
    assert lin is attn.qkv_proj and (rows.start, rows.stop) == (96, 128)


def test_wrong_rotation_shape_is_a_clear_error():
    model = MODELS["llama"]()
    with pytest.raises(ValueError, match="expected R1 64x64"):
        fuse_rotations(model, torch.eye(32), torch.eye(16))


def test_per_layer_r2_is_exact_and_checked():
    torch.manual_seed(0)
    model = randomise_norms(MODELS["llama"]()).eval()
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        r2s = [block_diagonal("random_hadamard", 16, None, s) for s in (3, 4)]
        fused = fuse_rotations(model, block_diagonal("hadamard", 64, 32, 0), r2s)
        assert max_rel_err(model(ids).logits, ref) <= 1e-4
    assert len(fused.r2) == 2 and not torch.equal(fused.r2[0], fused.r2[1])
    with pytest.raises(ValueError, match="one R2 per layer"):
        fuse_rotations(MODELS["llama"](), torch.eye(64), [torch.eye(16)])
