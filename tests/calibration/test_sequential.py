import pytest
import torch

from torchao_mx_ext import RotatedMXFP4Tensor
from torchao_mx_ext.calibration.data import calibration_ids
from torchao_mx_ext.calibration.sequential import capture_first_layer_inputs, sequential_gptq
from torchao_mx_ext.recipes import METHODS, QuantSettings
from torchao_mx_ext.zoo import load_model


@pytest.fixture(scope="module")
def stories():
    return load_model("stories260k")


def test_calibration_windows_are_seeded_and_from_validation(stories, shared_data):
    _, tok = stories
    a = calibration_ids(tok, "tinystories", 4, 64, seed=1, data_dir=shared_data)
    b = calibration_ids(tok, "tinystories", 4, 64, seed=1, data_dir=shared_data)
    c = calibration_ids(tok, "wikitext2", 4, 64, seed=2, data_dir=shared_data)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_bad_inputs(stories, shared_data, tmp_path):
    _, tok = stories
    with pytest.raises(FileNotFoundError):
        calibration_ids(tok, tmp_path / "missing.txt", 2, 64)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    with pytest.raises(ValueError, match="too short"):
        calibration_ids(tok, short, 2, 64)
    with pytest.raises(ValueError, match="evaluation split"):
        calibration_ids(tok, shared_data / "wikitext2" / "wt2_tokenized_test.txt", 2, 64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        calibration_ids(tok, "tinystories", 2, 1024, data_dir=shared_data, max_positions=512)


def test_captured_inputs_reproduce_the_model(stories, shared_data):
    model, tok = stories
    ids = calibration_ids(tok, "tinystories", 2, 32, data_dir=shared_data)
    hidden, kwargs = capture_first_layer_inputs(model, ids)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
        h = hidden
        for layer in model.model.layers:
            h = torch.cat([layer(h[i : i + 1], **kwargs) for i in range(h.shape[0])])
    assert torch.equal(hidden, ref[0])
    torch.testing.assert_close(model.model.norm(h), ref[-1], atol=1e-5, rtol=1e-5)


# gptaq is not here: with these 1k calibration rows it does not beat RTN (its least-squares fit needs
# many rows per input channel; docs/results.md), which is why it is not the default.
@pytest.mark.parametrize("name,rtn_name", [("gptq", "rtn"), ("brq+gptq", "brq"), ("gptq-block-rot+exp-search", "block-rot")])
def test_sequential_gptq_beats_rtn_on_held_out_text(name, rtn_name, stories, shared_data):
    model_fp, tok = stories
    calib = calibration_ids(tok, "tinystories", 8, 128, seed=0, data_dir=shared_data)
    held_out = calibration_ids(tok, "tinystories", 4, 128, seed=99, data_dir=shared_data)
    with torch.no_grad():
        ref = model_fp(held_out).logits
    errs = {}
    for method in (rtn_name, name):
        model, _ = load_model("stories260k")
        METHODS[method].apply(model, QuantSettings("floor", weight_only=True, calib_ids=calib))
        assert all(isinstance(l.weight, RotatedMXFP4Tensor) for l in model.model.layers[-1].mlp.children() if isinstance(l, torch.nn.Linear))
        with torch.no_grad():
            errs[method] = (model(held_out).logits - ref).norm().item()
    rtn_name, gptq_name = list(errs)
    assert errs[gptq_name] < errs[rtn_name]


def test_gptq_method_without_calibration_is_a_clear_error(stories):
    model, _ = load_model("stories260k")
    with pytest.raises(ValueError, match="calibration data"):
        METHODS["gptq"].apply(model, QuantSettings("floor"))


def test_sequential_gptq_on_a_disk_offloaded_model(stories, shared_data, tmp_path):
    """A model dispatched with accelerate's disk_offload (weights on the meta device, read from disk
    at each forward) is calibrated layer by layer into the same weights as the in-memory model."""
    from accelerate import disk_offload

    _, tok = stories
    calib = calibration_ids(tok, "tinystories", 4, 64, seed=0, data_dir=shared_data)
    in_memory, _ = load_model("stories260k")
    offloaded, _ = load_model("stories260k")
    disk_offload(offloaded, tmp_path / "offload", execution_device="cpu")
    assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    settings = QuantSettings("floor", calib_ids=calib)
    METHODS["gptq"].apply(in_memory, settings)
    METHODS["gptq"].apply(offloaded, settings)
    for a, b in zip(in_memory.model.layers, offloaded.model.layers):
        for name, la in a.named_modules():
            if isinstance(la, torch.nn.Linear):
                lb = b.get_submodule(name)
                assert isinstance(lb.weight, RotatedMXFP4Tensor), name
                assert torch.equal(la.weight.qdata, lb.weight.qdata) and torch.equal(la.weight.scale, lb.weight.scale), name
    assert offloaded.model.embed_tokens.weight.device.type == "meta"  # what is not calibrated stays on disk
    with torch.no_grad():
        ids = calib[:1, :16]
        torch.testing.assert_close(offloaded(ids).logits, in_memory(ids).logits)


def test_sequential_gptq_skips_zero_width_linears():
    """A MoEfied model's empty shared expert (intermediate size 0) has nothing to calibrate: GPTQ
    quantizes the experts and every other linear and leaves the 0-width linears as they are."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    import torchao_mx_ext as tme

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=0,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = Qwen2MoeForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    sequential_gptq(model, ids, lambda short: tme.MXFP4BlockRotConfig(), progress=False)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.weight, RotatedMXFP4Tensor)
    assert isinstance(layer.mlp.experts.down_proj, RotatedMXFP4Tensor)
    assert layer.mlp.shared_expert.down_proj.weight.numel() == 0
    assert not isinstance(layer.mlp.shared_expert.down_proj.weight, RotatedMXFP4Tensor)
    assert torch.isfinite(model(ids).logits).all()


def test_asymmetric_sequential_gptq_pairs_the_full_precision_stream(monkeypatch):
    """With ``asymmetric=True`` the reference rows come from the full-precision model: in the first layer
    (weight-only: nothing drifted yet) C equals H bit for bit; in later layers C is the cross-covariance
    of the drifted inputs with the full-precision model's own, recomputed here in float64. Fused experts
    keep plain GPTQ (their routed rows do not pair) and are still quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    import torchao_mx_ext as tme
    from torchao_mx_ext.calibration import gptq as gptq_module

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    fp = LlamaForCausalLM(config).eval()
    fp.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp_inputs = fp(ids, output_hidden_states=True).hidden_states  # inputs of layer 0, 1

    seen = []
    real = gptq_module.asymmetric_target
    monkeypatch.setattr(gptq_module, "asymmetric_target", lambda w, h, c, damp: seen.append((h, c)) or real(w, h, c, damp))
    sequential_gptq(model, ids, lambda short: tme.MXFP4Config(act_quant=False) if short == "q_proj" else None,
                    progress=False, asymmetric=True)
    assert len(seen) == 2  # one q_proj per layer
    (h0, c0), (h1, c1) = seen
    assert torch.equal(h0, c0)
    x_ref = fp.model.layers[1].input_layernorm(fp_inputs[1]).reshape(-1, 64).double()
    assert not torch.allclose(h1, c1)
    # H1 = 2/n X~^T X~ with X~ the drifted layer-1 q_proj input: C1 must match X~^T X_ref, not X_ref^T X_ref
    torch.testing.assert_close(c1.T.double(), (2.0 / x_ref.shape[0]) * x_ref.T @ _drifted(model, ids), rtol=1e-4, atol=1e-5)

    moe_config = Qwen2MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    moe = Qwen2MoeForCausalLM(moe_config).eval()
    from torchao.quantization import quantize_

    from torchao_mx_ext.moe import is_fused_experts
    with pytest.raises(ValueError, match="do not pair"):  # directly through quantize_: refused
        quantize_(moe, tme.MXFP4GPTQConfig(base=tme.MXFP4BlockRotConfig(), asymmetric=True), filter_fn=is_fused_experts)
    sequential_gptq(moe, ids, lambda short: tme.MXFP4BlockRotConfig(), progress=False, asymmetric=True)
    assert isinstance(moe.model.layers[0].mlp.experts.down_proj, RotatedMXFP4Tensor)
    assert isinstance(moe.model.layers[0].self_attn.q_proj.weight, RotatedMXFP4Tensor)


def _drifted(model, ids):
    """The layer-1 q_proj input of the (layer-0 quantized) ``model``, float64 ``[n, 64]``."""
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1]
        return model.model.layers[1].input_layernorm(hidden).reshape(-1, 64).double()
