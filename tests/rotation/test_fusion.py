import pytest
import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    Qwen3Config, Qwen3ForCausalLM,
)

from torchao_mx_ext.rotation.fusion import block_diagonal, fuse_rotations, head_dim_of

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _randomise_norms(model):
    # trained models have non-unit norm weights; random init has ones, which would hide a folding bug
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=32)),
}


def _max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("block", [None, 32])
def test_fused_rotations_keep_the_fp_model_exact(arch, block):
    torch.manual_seed(0)
    model = _randomise_norms(MODELS[arch]()).eval()
    if arch == "qwen2":  # Qwen2 has q/k/v biases: make them non-zero
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.v_proj.bias.normal_()
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        r1 = block_diagonal("random_hadamard", 64, block, 1)
        r2 = block_diagonal("random_hadamard", head_dim_of(model), block, 2)
        fuse_rotations(model, r1, r2)
        out = model(ids).logits
    assert _max_rel_err(out, ref) <= 1e-4
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert all(bool((layer.input_layernorm.weight == 1).all()) for layer in model.model.layers)
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
        assert _max_rel_err(model(ids).logits, ref) <= 1e-4


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        fuse_rotations(model, torch.eye(32), torch.eye(16))


def test_wrong_rotation_shape_is_a_clear_error():
    model = MODELS["llama"]()
    with pytest.raises(ValueError, match="expected R1 64x64"):
        fuse_rotations(model, torch.eye(32), torch.eye(16))


def test_per_layer_r2_is_exact_and_checked():
    torch.manual_seed(0)
    model = _randomise_norms(MODELS["llama"]()).eval()
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        r2s = [block_diagonal("random_hadamard", 16, None, s) for s in (3, 4)]
        fused = fuse_rotations(model, block_diagonal("hadamard", 64, 32, 0), r2s)
        assert _max_rel_err(model(ids).logits, ref) <= 1e-4
    assert len(fused.r2) == 2 and not torch.equal(fused.r2[0], fused.r2[1])
    with pytest.raises(ValueError, match="one R2 per layer"):
        fuse_rotations(MODELS["llama"](), torch.eye(64), [torch.eye(16)])
