"""Per-architecture MoE adapters: discovery, router facts, sentinel slots in the experts backends."""
import pytest
import torch

from _router_tiny_models import ARCHS, NUM_EXPERTS, TOP_K, build_tiny
from torchao_mx_ext.moe.adapters import (
    disable_sentinel_slots,
    enable_sentinel_slots,
    find_moe_blocks,
    is_moe_router,
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


def test_supported_router_names():
    assert supported_router_names() == [
        "Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter", "MixtralTopKRouter", "OlmoeTopKRouter",
        "DeepseekV2TopkRouter", "DeepseekV3TopkRouter",
    ]


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
