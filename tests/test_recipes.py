import pytest
import torch

from torchao_mx_ext import RotatedMXFP4Tensor
from torchao_mx_ext.recipes import METHODS, QuantSettings
from torchao_mx_ext.zoo import load_model


@pytest.fixture(scope="module")
def stories_ids():
    return torch.randint(0, 512, (1, 64))


@pytest.mark.parametrize("name", ["rtn", "block-rot", "global-rot", "quarot", "brq"])
def test_every_method_quantizes_all_linears_but_lm_head(name, stories_ids):
    model, _ = load_model("stories260k")
    with torch.no_grad():
        ref = model(stories_ids).logits
    METHODS[name].apply(model, QuantSettings("floor", seed=1))
    layer = model.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    assert all(isinstance(lin.weight, RotatedMXFP4Tensor) for lin in linears)
    assert not isinstance(model.lm_head.weight, RotatedMXFP4Tensor)
    down = layer.mlp.down_proj.weight
    if name in ("quarot", "brq"):
        # R4 is online on down_proj (full width 192 = padded 172 for QuaRot, 32 blocks for BRQ);
        # the other linears read already-rotated activations
        assert down.rotation.shape[0] == (192 if name == "quarot" else 32)
        assert layer.self_attn.q_proj.weight.rotation is None
    with torch.no_grad():
        out = model(stories_ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5


def test_weight_only_settings_leave_activations_unquantized():
    model, _ = load_model("stories260k")
    METHODS["brq"].apply(model, QuantSettings("mse", weight_only=True))
    assert all(
        m.weight.act_scale_rule is None for m in model.modules() if isinstance(getattr(m, "weight", None), RotatedMXFP4Tensor)
    )


@pytest.mark.parametrize("name", ["dartquant", "dartquant-block"])
def test_dartquant_methods_fuse_learned_rotations(name, stories_ids, shared_data):
    from torchao_mx_ext.calibration.data import calibration_ids

    model, tok = load_model("stories260k")
    with torch.no_grad():
        ref = model(stories_ids).logits
    calib = calibration_ids(tok, "tinystories", 4, 64, data_dir=shared_data)
    METHODS[name].apply(model, QuantSettings("floor", calib_ids=calib))
    down = model.model.layers[0].mlp.down_proj.weight
    assert isinstance(down, RotatedMXFP4Tensor) and down.rotation.shape[0] == (192 if name == "dartquant" else 32)
    with torch.no_grad():
        rel = ((model(stories_ids).logits - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5
    with pytest.raises(ValueError, match="calibration data"):
        METHODS[name].apply(load_model("stories260k")[0], QuantSettings("floor"))
