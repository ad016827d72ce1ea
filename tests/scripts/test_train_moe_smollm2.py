"""scripts/train_moe_smollm2.py on stories260k (the script itself is for SmolLM2-135M): the shared-expert
MoE's trainable parameters, its active size, and one training step."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import train_moe_smollm2 as train  # noqa: E402

from torchao_mx_ext.experiments.moefy import moefy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_EXPERTS, TOP_K, SHARED = 4, 2, 12  # stories260k: 172 neurons; 160 routed -> 4 experts of 40


@pytest.fixture(scope="module")
def shared_moe(one_torch_thread):
    from torchao_mx_ext.calibration.data import calibration_ids
    from torchao_mx_ext.zoo import load_model

    torch.manual_seed(0)
    dense, tokenizer = load_model("stories260k")
    calib = calibration_ids(tokenizer, "tinystories", n_samples=4, seq_len=128, seed=0)
    model, result = moefy(dense, calib, num_experts=NUM_EXPERTS, top_k=TOP_K, shared_neurons=SHARED,
                          dense_layers=[0], return_result=True)
    train.normalise_top_k_weights(model)
    return model, result, calib, dense.config.intermediate_size


def test_active_neurons_counts_the_real_neurons_a_token_uses(shared_moe):
    model, result, _, intermediate = shared_moe
    layer = 1  # a MoE layer
    real_per_expert = [(row >= 0).sum().item() for row in result.expert_neurons[layer]]
    assert len(set(real_per_expert)) == 1  # 160 neurons split evenly
    expected = len(result.shared_neurons[layer]) + TOP_K * real_per_expert[0]
    assert train.active_neurons(intermediate, NUM_EXPERTS, TOP_K, SHARED) == expected == 12 + 2 * 40
    assert train.active_neurons(1536, 32, 3, 256) == 256 + 3 * 40  # the SmolLM2 recipe in docs/results.md


@pytest.mark.parametrize("shared", [8, 224, -128])
def test_active_neurons_refuses_shapes_that_need_padding(shared):
    # 172 - 8 = 164 -> 41 per expert; 1536 - 224 -> 82 per expert: both padded; a negative size is nonsense.
    intermediate = 172 if shared == 8 else 1536
    with pytest.raises(ValueError, match="multiple of 8 neurons per expert"):
        train.active_neurons(intermediate, 4 if shared == 8 else 16, 2, shared)


def test_shared_expert_and_its_gate_are_trained_everything_else_frozen(shared_moe):
    model = shared_moe[0]
    experts, routers = train.moe_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    expert_names = {names[id(p)] for p in experts}
    router_names = {names[id(p)] for p in routers}
    assert any(".mlp.shared_expert.down_proj" in n for n in expert_names)
    assert any(".mlp.experts." in n for n in expert_names)
    assert any(".mlp.shared_expert_gate." in n for n in router_names)
    assert any(n.endswith(".mlp.gate.weight") for n in router_names)
    trained = expert_names | router_names
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.requires_grad == (n in trained) for n, p in model.named_parameters())
    assert any("self_attn" in n for n in frozen) and any("embed_tokens" in n for n in frozen)
    assert not any(".layers.0.mlp." in n for n in trained)  # the dense first layer stays frozen


def test_one_step_moves_the_shared_expert_gate_and_router(shared_moe):
    model, result, calib, _ = shared_moe
    experts, routers = train.moe_parameters(model)
    layer = model.model.layers[1].mlp
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW([{"params": experts, "lr": 1e-3}, {"params": routers, "lr": 1e-3}], weight_decay=0.0)
    model.train()
    batch = calib[:2]
    model(batch, labels=batch).loss.backward()
    opt.step()
    model.eval()
    moved = {n for n, p in layer.named_parameters() if not torch.equal(p, before[n])}
    assert {"shared_expert.down_proj.weight", "shared_expert_gate.weight", "gate.weight",
            "experts.down_proj"} <= moved
    assert not (model.model.layers[0].mlp.up_proj.weight.requires_grad)
