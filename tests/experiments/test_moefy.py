"""MoEfication of stories260k into a Qwen2-MoE checkpoint (torchao_mx_ext.experiments.moefy)."""

import pytest
import torch

from torchao_mx_ext.experiments.moefy import (
    balanced_kmeans,
    check_dense_model,
    max_relative_logit_error,
    moefy,
    routing_errors,
    save,
    set_top_k,
)

NUM_EXPERTS = 4  # stories260k: 172 neurons -> 4 experts of 43, padded to 48 (grouped_mm needs a multiple of 8)
TOLERANCE = 1e-4  # the docstring's "reproduces": max |z_moe - z_dense| / max |z_dense| at top_k = E


# Tiny matmuls gain nothing from threads and a busy 2-core CPU makes two threads far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dense(one_torch_thread):
    from torchao_mx_ext.zoo import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model("stories260k")
    return model, tokenizer


@pytest.fixture(scope="module")
def calib(dense):
    from torchao_mx_ext.calibration.data import calibration_ids

    return calibration_ids(dense[1], "tinystories", n_samples=8, seq_len=256, seed=0)


@pytest.fixture(scope="module")
def held_out(dense):
    from torchao_mx_ext.calibration.data import calibration_ids

    # Another seed draws other windows of the validation text: not seen by the fit.
    return calibration_ids(dense[1], "tinystories", n_samples=2, seq_len=256, seed=1)


@pytest.fixture(scope="module")
def moefied(dense, calib):
    model, result = moefy(dense[0], calib, num_experts=NUM_EXPERTS, top_k=2, return_result=True)
    return model, result


def test_top_k_equal_to_num_experts_reproduces_dense_logits(dense, moefied, held_out):
    moe, result = moefied
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert moe.config.norm_topk_prob is False and moe.config.qkv_bias is False
    assert result.top_k_e_rel_error <= TOLERANCE
    set_top_k(moe, NUM_EXPERTS)
    try:
        for impl in ("grouped_mm", "eager"):
            moe.set_experts_implementation(impl)
            err = max_relative_logit_error(dense[0], moe, held_out)
            assert err <= TOLERANCE, (impl, err)
    finally:
        moe.set_experts_implementation("grouped_mm")
        set_top_k(moe, 2)


def test_attention_norms_embeddings_are_exact_copies(dense, moefied):
    dense_state = dense[0].state_dict()
    moe_state = moefied[0].state_dict()
    copied = [n for n in dense_state if ".mlp." not in n]
    assert copied
    for name in copied:
        assert torch.equal(dense_state[name], moe_state[name]), name


def test_experts_partition_the_neurons(dense, moefied):
    _, result = moefied
    assert len(result.expert_neurons) == dense[0].config.num_hidden_layers
    intermediate = dense[0].config.intermediate_size
    for layer_idx, experts in enumerate(result.expert_neurons):
        assert experts.shape[0] == NUM_EXPERTS
        real = experts[experts >= 0]
        # Each dense neuron in exactly one expert; the rest of the slots are zero padding.
        assert torch.equal(real.sort().values, torch.arange(intermediate)), layer_idx
        assert result.shared_neurons[layer_idx].numel() == 0
    # The expert tensors hold exactly those rows (down_proj x E, padding slots all zero).
    moe = moefied[0]
    gate_dense = dense[0].model.layers[0].mlp.gate_proj.weight
    down_dense = dense[0].model.layers[0].mlp.down_proj.weight
    experts = result.expert_neurons[0]
    m = moe.config.moe_intermediate_size
    for e in range(NUM_EXPERTS):
        valid = experts[e] >= 0
        rows = moe.model.layers[0].mlp.experts.gate_up_proj[e, :m]
        cols = moe.model.layers[0].mlp.experts.down_proj[e]
        assert torch.equal(rows[valid], gate_dense[experts[e][valid]])
        assert torch.equal(cols[:, valid], down_dense[:, experts[e][valid]] * NUM_EXPERTS)
        assert not rows[~valid].any() and not cols[:, ~valid].any()


def test_save_and_reload_gives_identical_logits(moefied, held_out, tmp_path):
    from transformers import AutoModelForCausalLM

    moe, result = moefied
    path = save(moe, tmp_path / "moe", result=result)
    assert (path / "moefication_partition.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    assert reloaded.config.num_experts_per_tok == 2
    assert reloaded.config.moefication["router_temperature"] == result.router_temperature
    with torch.no_grad():
        for k in (2, NUM_EXPERTS):
            set_top_k(moe, k)
            set_top_k(reloaded, k)
            assert torch.equal(moe(held_out).logits, reloaded(held_out).logits), k
    set_top_k(moe, 2)


def test_router_beats_random_routing(dense, moefied, held_out):
    moe, result = moefied
    top_k = 2
    # Layer level: relative error of the routed MLP output vs the dense MLP output.
    errors = routing_errors(dense[0], moe, held_out, [top_k])[top_k]
    router = sum(errors["router"]) / len(errors["router"])
    random = sum(errors["random"]) / len(errors["random"])
    oracle = sum(errors["oracle"]) / len(errors["oracle"])
    assert oracle <= router < random, errors
    # End to end: next-token loss with the fitted router vs the same experts under a random router.
    set_top_k(moe, top_k)
    with torch.no_grad():
        targets = held_out[:, 1:].reshape(-1)

        def loss(model):
            logits = model(held_out).logits[:, :-1].reshape(-1, model.config.vocab_size)
            return torch.nn.functional.cross_entropy(logits, targets).item()

        fitted = loss(moe)
        saved = [layer.mlp.gate.weight.clone() for layer in moe.model.layers]
        gen = torch.Generator().manual_seed(0)
        try:
            for layer, w in zip(moe.model.layers, saved):
                layer.mlp.gate.weight.copy_(torch.randn(w.shape, generator=gen) * w.std())
            random_router = loss(moe)
        finally:
            for layer, w in zip(moe.model.layers, saved):
                layer.mlp.gate.weight.copy_(w)
        dense_loss = loss(dense[0])
    assert dense_loss < fitted < random_router, (dense_loss, fitted, random_router)


def test_near_uniform_softmax_keeps_the_router_ranking(dense, moefied, held_out):
    from torchao_mx_ext.experiments.moefy import collect_mlp_inputs

    moe, result = moefied
    inputs = collect_mlp_inputs(dense[0], held_out)
    for layer, x in zip(moe.model.layers, inputs):
        router = layer.mlp.gate
        _, weights, selected = router(x)
        # Weights ~ 1/E (so x E down_proj makes them ~1); the selection = top-k of the fitted scores.
        assert (weights * NUM_EXPERTS - 1).abs().max() < 1e-3
        exact = (x.double() @ router.weight.double().T).topk(router.top_k, dim=1).indices
        agree = (selected.sort(dim=1).values == exact.sort(dim=1).values).all(dim=1).float().mean()
        assert agree > 0.95, agree  # only near-ties (within fp32 softmax resolution) may differ


def test_weights_method_shared_expert_and_dense_layer_are_exact(dense, calib, held_out):
    # Parameter-clustering split, 12 always-on neurons in the shared expert, layer 1 kept dense.
    moe, result = moefy(
        dense[0], calib[:4], num_experts=NUM_EXPERTS, top_k=2, method="weights", shared_neurons=12,
        dense_layers=[1], return_result=True,
    )
    assert moe.config.shared_expert_intermediate_size == 12 and moe.config.mlp_only_layers == [1]
    assert type(moe.model.layers[1].mlp).__name__ == "Qwen2MoeMLP"
    assert torch.equal(moe.model.layers[1].mlp.up_proj.weight, dense[0].model.layers[1].mlp.up_proj.weight)
    assert result.expert_neurons[1] is None
    for layer_idx, (experts, shared) in enumerate(zip(result.expert_neurons, result.shared_neurons)):
        if experts is None:
            continue
        everything = torch.cat([experts[experts >= 0], shared]).sort().values
        assert torch.equal(everything, torch.arange(dense[0].config.intermediate_size)), layer_idx
        assert not moe.model.layers[layer_idx].mlp.shared_expert_gate.weight.any()  # sigmoid(0) = 0.5 exactly
    set_top_k(moe, NUM_EXPERTS)
    assert max_relative_logit_error(dense[0], moe, held_out) <= TOLERANCE
    errors = routing_errors(dense[0], moe, held_out[:1], [2])[2]
    assert errors["router"][1] is None and all(e is not None for e in errors["router"][2:])


def test_balanced_kmeans_equal_sizes_and_deterministic():
    gen = torch.Generator().manual_seed(0)
    # Four well separated blobs of unequal size: balanced k-means must still give 16 per cluster.
    centres = torch.randn(4, 8, generator=gen) * 10
    points = torch.cat([centres[i] + torch.randn(n, 8, generator=gen) for i, n in enumerate((10, 22, 16, 16))])
    labels = balanced_kmeans(points, 4, seed=3)
    assert torch.equal(torch.bincount(labels, minlength=4), torch.full((4,), 16))
    assert torch.equal(labels, balanced_kmeans(points, 4, seed=3))
    # The two exact 16-point blobs come out whole.
    for start in (32, 48):
        assert labels[start : start + 16].unique().numel() == 1


def test_rejects_non_llama_family_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="Llama-family"):
        check_dense_model(model)
    with pytest.raises(ValueError, match="Llama-family"):
        moefy(model, torch.zeros(1, 8, dtype=torch.long), num_experts=2, top_k=1)


def test_qwen2_with_qkv_bias_is_reproduced():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    dense = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    moe = moefy(dense, ids, num_experts=4, top_k=4)
    assert moe.config.qkv_bias is True
    assert max_relative_logit_error(dense, moe, ids[:1]) <= TOLERANCE
