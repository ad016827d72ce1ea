"""Per-architecture MoE adapters: discovery, router facts, sentinel slots in the experts backends.

Expectations come from transformers, not from the adapters: the routers transformers builds beside
its fused (3-D) experts modules, the experts' own inputs during a forward, and a float64 re-derivation
of each family's routing rule from the router's weights."""
import pytest
import torch
import transformers

from _router_tiny_models import ARCHS, NUM_EXPERTS, TOP_K, VOCAB, build_tiny
from torchao_mx_ext.moe.adapters import (
    disable_sentinel_slots,
    enable_sentinel_slots,
    find_moe_blocks,
    is_moe_router,
    supported_adapters,
    supported_router_names,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch", ARCHS)
def test_find_moe_blocks_reads_every_architecture(arch):
    model = build_tiny(arch)
    found = find_moe_blocks(model)
    assert [fqn for fqn, _, _ in found] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for fqn, block, adapter in found:
        assert adapter.name == arch
        assert block is model.get_submodule(fqn) and isinstance(block, adapter.block_class)
        assert adapter.num_experts(block.gate) == NUM_EXPERTS == block.experts.num_experts
        assert adapter.top_k(block.gate) == TOP_K[arch]
        assert adapter.score_function == ("sigmoid" if arch == "deepseek_v3" else "softmax")
        assert adapter.flattens_before_gate == (not arch.startswith("deepseek"))
        for name in adapter.shared_expert_names:
            assert isinstance(getattr(block, name), torch.nn.Module)
        assert is_moe_router(block.gate, f"{fqn}.gate")
        assert not is_moe_router(block) and not is_moe_router(block.experts)


def test_dense_layers_of_a_deepseek_model_are_skipped():
    model = build_tiny("deepseek_v3", first_k_dense_replace=1)
    assert [fqn for fqn, _, _ in find_moe_blocks(model)] == ["model.layers.1.mlp"]


def _fused_moe_layers(model):
    """``{(block class, router class)}`` found structurally: a module whose ``experts`` child holds 3-D
    ``gate_up_proj``/``down_proj`` weights [E, ., .] (transformers 5.x fused experts) and whose ``gate``
    child routes them."""
    found = set()
    for module in model.modules():
        experts, gate = getattr(module, "experts", None), getattr(module, "gate", None)
        weights = [getattr(experts, n, None) for n in ("gate_up_proj", "down_proj")]
        if gate is not None and all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights):
            found.add((type(module), type(gate)))
    return found


def test_supported_routers_are_the_ones_transformers_builds_beside_fused_experts():
    """One supported router per family, each the class transformers' own model of that family
    instantiates next to its fused experts (and the adapter's block class is that layer's class)."""
    expected = {}
    for arch in ARCHS:
        model = build_tiny(arch)
        assert model.config.model_type == arch
        layers = _fused_moe_layers(model)
        assert len(layers) == 1, (arch, layers)  # every MoE layer of a family: one block and router class
        (block_class, router_class), = layers
        assert router_class.__module__ == f"transformers.models.{arch}.modeling_{arch}"
        expected[arch] = (block_class, router_class)
    assert sorted(supported_router_names()) == sorted(r.__name__ for _, r in expected.values())
    adapters = {a.name: a for a in supported_adapters()}
    assert set(adapters) == set(ARCHS)
    for arch, (block_class, router_class) in expected.items():
        assert adapters[arch].router_class is router_class and adapters[arch].block_class is block_class


def test_a_transformers_moe_family_without_an_adapter_is_reported_not_skipped():
    """GLM-4-MoE also has fused experts and a top-k router, but no adapter: an error naming it."""
    config = transformers.Glm4MoeConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=128, intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, first_k_dense_replace=0, n_group=1, topk_group=1,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    (_, router_class), = _fused_moe_layers(model)
    assert router_class.__name__ not in supported_router_names()
    with pytest.raises(ValueError, match=rf"unsupported router.*{router_class.__name__}.*supported routers: "
                                         + ", ".join(supported_router_names())):
        find_moe_blocks(model)
    assert not any(is_moe_router(m) for m in model.modules())


def _reference_top_k(x, router, score_function, arch):
    """float64 top-k expert sets per token from the router's weights: scores by ``score_function``, then
    the family's published choice rule (DeepSeek: group-limited; V3 adds its correction bias)."""
    logits = x.double().reshape(-1, x.shape[-1]) @ router.weight.double().T
    scores = logits.sigmoid() if score_function == "sigmoid" else logits.softmax(-1)
    n, k = NUM_EXPERTS, TOP_K[arch]
    if not arch.startswith("deepseek"):
        return [set(row) for row in scores.topk(k, -1).indices.tolist()]
    per_group = n // router.num_group
    if arch == "deepseek_v3":  # groups ranked by the sum of their two best biased scores
        scores = scores + router.e_score_correction_bias.double()
        group_score = scores.view(-1, router.num_group, per_group).topk(2, -1).values.sum(-1)
    else:  # DeepSeek-V2 group-limited greedy: groups ranked by their best score
        group_score = scores.view(-1, router.num_group, per_group).amax(-1)
    groups = group_score.topk(router.topk_group, -1).indices
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, groups, True).repeat_interleave(per_group, -1)
    return [set(row) for row in scores.masked_fill(~allowed, float("-inf")).topk(k, -1).indices.tolist()]


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_routing_facts_match_the_models_own_routing(arch):
    """In a forward pass, the router the adapter names is the one whose indices reach the experts; its
    input is flattened as the adapter says; K and N are the routing's; the chosen sets are the float64
    reference's (softmax or sigmoid scores, as the adapter says, with the family's group rule)."""
    model = build_tiny(arch)
    found = find_moe_blocks(model)
    seen = {}
    handles = []
    for fqn, block, adapter in found:
        def gate_hook(module, args, output, fqn=fqn):
            seen.setdefault(fqn, {})["gate"] = (args[0].detach(), output[2].detach())

        def experts_hook(module, args, fqn=fqn):
            seen.setdefault(fqn, {})["experts"] = args[1].detach()

        handles += [adapter.router_of(block).register_forward_hook(gate_hook),
                    adapter.experts_of(block).register_forward_pre_hook(experts_hook)]
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == sorted(fqn for fqn, _, _ in found)
    for fqn, block, adapter in found:
        router = adapter.router_of(block)
        x, index = seen[fqn]["gate"]
        assert torch.equal(seen[fqn]["experts"], index)  # this router's choice is what the experts run
        assert x.dim() == (2 if adapter.flattens_before_gate else 3) and x.shape[-1] == 64
        assert index.shape == (18, adapter.top_k(router)) and int(index.max()) < adapter.num_experts(router)
        assert [set(row) for row in index.tolist()] == _reference_top_k(x, router, adapter.score_function, arch)


@pytest.mark.parametrize("backend", ["batched_mm", "grouped_mm"])
def test_sentinel_slots_are_skipped_by_every_experts_backend(backend):
    """transformers' batched_mm indexes the weights with index N unless the experts module is marked."""
    model = build_tiny("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 64)
    index = torch.tensor([[0, 1], [2, 8], [8, 5], [6, 7], [3, 8]])
    weight = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [1.0, 0.0]])
    reference = experts(x, index, weight)  # eager loop: skips index N by itself
    # the same as dropping the sentinel slots by hand
    manual = experts(x, index.clamp(max=NUM_EXPERTS - 1), weight * (index < NUM_EXPERTS))
    torch.testing.assert_close(reference, manual)

    model.set_experts_implementation(backend)
    enable_sentinel_slots(experts)
    torch.testing.assert_close(experts(x, index, weight), reference)
    disable_sentinel_slots(experts)
    assert experts._is_expert_parallel is False
    if backend == "batched_mm":
        with pytest.raises(IndexError):
            experts(x, index, weight)
