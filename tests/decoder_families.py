"""Small randomly initialised decoders of every family model-level rotation and smoothing know
(``MODELS``) or refuse (``REFUSED``), built offline from their configs, and helpers to make their
norms and biases non-trivial."""
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig, GemmaForCausalLM,
    GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def randomise_norms(model):
    # trained models have non-unit norm weights; random init has ones, which would hide a folding bug
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


def randomise_biases(model):
    # biases start at zero; a non-zero one checks that output rotations rotate it too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    return model


IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi-3's defaults (32000) exceed the small vocab
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=32)),
    # fused qkv_proj / gate_up_proj; tied and partial rotary as in Phi-4-mini
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**SMALL, **IDS, tie_word_embeddings=True, partial_rotary_factor=0.5)),
    # scalar multipliers of the size Granite 3 uses, and biases on every linear
    "granite": lambda: GraniteForCausalLM(GraniteConfig(
        **SMALL, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
        logits_scaling=8.0, attention_bias=True, mlp_bias=True,
    )),
    # norms scale by 1 + w, embeddings by sqrt(hidden), tied, one KV head, head_dim * heads != hidden
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**{**SMALL, "num_key_value_heads": 1}, head_dim=32)),
}
# decoders whose post-sublayer norms no residual-stream rotation passes (architectures.UNFUSABLE_ARCHITECTURES)
REFUSED = {
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=32)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**{**SMALL, "num_key_value_heads": 1}, head_dim=32)),
}


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()
