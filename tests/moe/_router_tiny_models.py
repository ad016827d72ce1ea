"""Tiny, randomly initialised models of every MoE architecture the router passes support (plus a dense
one): hidden 64, 2 layers, 8 experts, vocab 96. Random weights say nothing about accuracy; they cover
the code paths (router math, block wiring, shared experts, groups, sigmoid scores)."""
import torch
import transformers

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3")
VOCAB = 96
NUM_EXPERTS = 8
TOP_K = {"qwen3_moe": 2, "qwen2_moe": 4, "mixtral": 2, "olmoe": 3, "deepseek_v2": 3, "deepseek_v3": 4}

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
               max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# DeepSeek MLA: tiny LoRA ranks and head dims; 8 experts in 4 groups of 2, 2 groups kept per token.
_DEEPSEEK = dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=NUM_EXPERTS,
                 n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                 v_head_dim=16, first_k_dense_replace=0, n_group=4, topk_group=2)


def build_tiny(arch: str, seed: int = 0, experts_implementation: str = "eager", **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(_COMMON, num_experts_per_tok=TOP_K.get(arch, 2))
    if arch == "qwen3_moe":
        kw.update(num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                  num_experts=NUM_EXPERTS, norm_topk_prob=True)
        cls, cfg_cls = transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
    elif arch == "qwen2_moe":  # norm_topk_prob False (the Qwen1.5-MoE default): raw softmax weights
        kw.update(num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32, num_experts=NUM_EXPERTS,
                  shared_expert_intermediate_size=48)
        cls, cfg_cls = transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig
    elif arch == "mixtral":
        kw.update(num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=NUM_EXPERTS)
        cls, cfg_cls = transformers.MixtralForCausalLM, transformers.MixtralConfig
    elif arch == "olmoe":
        kw.update(num_key_value_heads=2, intermediate_size=32, num_experts=NUM_EXPERTS)
        cls, cfg_cls = transformers.OlmoeForCausalLM, transformers.OlmoeConfig
    elif arch == "deepseek_v2":  # softmax scores, group-limited greedy, scaled weights
        kw.update(_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5)
        cls, cfg_cls = transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config
    elif arch == "deepseek_v3":  # sigmoid scores, correction bias, groups, normalised and scaled weights
        kw.update(_DEEPSEEK, routed_scaling_factor=2.5, norm_topk_prob=True)
        cls, cfg_cls = transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config
    elif arch == "llama":
        kw.update(num_key_value_heads=2, intermediate_size=96)
        kw.pop("num_experts_per_tok")
        cls, cfg_cls = transformers.LlamaForCausalLM, transformers.LlamaConfig
    else:
        raise ValueError(arch)
    kw.update(overrides)
    model = cls(cfg_cls(**kw)).eval()
    if arch != "llama":
        with torch.no_grad():
            for layer in model.model.layers:
                if not hasattr(layer.mlp, "experts"):  # a dense layer (DeepSeek first_k_dense_replace)
                    continue
                # logits with a spread like a trained router's (~1.5 std) instead of ~0.15 at init
                layer.mlp.gate.weight.normal_(0, 0.2)
                if arch == "deepseek_v3":  # a nonzero correction bias: choice and weights differ in V3
                    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    if arch != "llama":
        model.set_experts_implementation(experts_implementation)
    return model
