"""transformers integration for MoE models: fused 3-D experts quantized on load, saved, reloaded.

Tiny random models of every supported MoE architecture. Their full-precision checkpoints are written
by transformers' own ``save_pretrained``, i.e. per expert (``experts.<e>.gate_proj.weight`` ...), so
quantize-on-load goes through transformers' conversion mapping (fusing them); our quantized
checkpoints hold the fused tensors, which that mapping must not touch.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM

import torchao_mx_ext as tme
from torchao_mx_ext.hf import FORMAT_VERSION, CheckpointError, MXFP4HfConfig, save_pretrained
from torchao_mx_ext.hf.serialization import IMPORT_NOTE, METADATA_KEY, ROTATION_PREFIX, SCALE_SUFFIX
from torchao_mx_ext.moe.experts import is_fused_experts, mxfp4_experts_forward
from torchao_mx_ext.recipes import quantize_linears
from torchao_mx_ext.zoo import model_path

from checkpoint_checks import assert_same_weights, file_tensors, load_without_our_package, quantized_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
CONFIG = tme.MXFP4BlockRotConfig()

_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)
_DEEPSEEK = dict(
    moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
)
# (config class, model class, config fields): 4 experts, top-2; a dense layer where the architecture has one.
ARCHS = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, eos_token_id=None)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", _DEEPSEEK),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(_DEEPSEEK, n_group=1, topk_group=1)),
}


def tiny_moe(arch: str, folder: Path) -> Path:
    """A random tiny ``arch`` model saved plainly by transformers (per-expert tensors) into ``folder``."""
    config_cls, model_cls, fields = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**_COMMON, **fields))
    model.save_pretrained(folder)
    return folder


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def experts_modules(model):
    return {fqn: m for fqn, m in model.named_modules() if is_fused_experts(m)}


def assert_mxfp4_experts(model, n_layers):
    """Every fused experts module is quantized (3-D, frozen) and runs our backend, not a stock one."""
    experts = experts_modules(model)
    assert len(experts) == n_layers
    for fqn, module in experts.items():
        assert type(module).__name__.startswith("MXFP4") and type(module).forward is mxfp4_experts_forward, fqn
        assert isinstance(module, type(module).__mro__[1])  # still an instance of transformers' class
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(module, name)
            assert isinstance(w, tme.RotatedMXFP4Tensor) and w.dim() == 3 and w.qdata.dim() == 3, (fqn, name)
            assert w.shape[0] == module.num_experts and not w.requires_grad, (fqn, name)


def assert_same_files(a, b):
    (t1, m1), (t2, m2) = file_tensors(a), file_tensors(b)
    assert m1 == m2 and sorted(t1) == sorted(t2)
    assert all(t1[k].dtype == t2[k].dtype and torch.equal(t1[k], t2[k]) for k in t1)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def _edit_metadata(path, edit):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    ours = json.loads(meta[METADATA_KEY])
    edit(ours)
    meta[METADATA_KEY] = json.dumps(ours)
    save_file(tensors, str(path), metadata=meta)


def _set_config_version(folder, version):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format_version"] = version
    path.write_text(json.dumps(config))


# -- per architecture: quantize on load, save, reload, save again -----------------------------------

@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def fp_folder(arch, tmp_path_factory):
    return tiny_moe(arch, tmp_path_factory.mktemp(arch) / "fp")


@pytest.fixture(scope="module")
def reference(fp_folder):
    """The fp model loaded normally, then quantized in memory (linears but lm_head, and the experts)."""
    model = AutoModelForCausalLM.from_pretrained(fp_folder)
    return quantize_linears(model, CONFIG)


@pytest.fixture(scope="module")
def onload(fp_folder):
    return AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=MXFP4HfConfig(CONFIG))


@pytest.fixture(scope="module")
def saved(onload, fp_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path("stories260k"))
    return save_pretrained(onload, fp_folder.parent / "quantized", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def reloaded(saved):
    return AutoModelForCausalLM.from_pretrained(saved)


def test_fp_checkpoint_is_stored_per_expert(fp_folder):
    # What makes quantize-on-load go through transformers' per-expert merge (and saving revert it).
    keys = set(file_tensors(fp_folder)[0])
    assert any(".experts.0." in k for k in keys) and not any(k.endswith(".experts.gate_up_proj") for k in keys)


def test_quantize_on_load_equals_quantize_in_memory(reference, onload):
    n_moe = len(experts_modules(reference))
    assert n_moe >= 1
    assert_mxfp4_experts(onload, n_moe)
    assert_same_weights(reference, onload)
    assert all(not p.requires_grad for p in quantized_params(onload).values())
    assert not any(n.startswith("lm_head") for n in quantized_params(onload))
    assert torch.equal(logits(onload), logits(reference))


def test_saved_checkpoint_holds_fused_experts(onload, saved):
    tensors, metas = file_tensors(saved)
    meta = json.loads(metas[0][METADATA_KEY])
    assert meta["format_version"] == FORMAT_VERSION == 3
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == FORMAT_VERSION
    # Under the model's own names: not split per expert, nor renamed (Mixtral: block_sparse_moe).
    assert not any(".experts.0." in k or "block_sparse_moe" in k for k in tensors)
    assert IMPORT_NOTE in tensors
    assert sorted(k for k in tensors if not k.startswith((ROTATION_PREFIX, IMPORT_NOTE))) == sorted(
        k for name in onload.state_dict() for k in ([name, name + SCALE_SUFFIX] if name in meta["weights"] else [name])
    )
    for fqn, module in experts_modules(onload).items():
        for name in ("gate_up_proj", "down_proj"):
            key, w = f"{fqn}.{name}", getattr(module, name)
            codes, scale = tensors[key], tensors[key + SCALE_SUFFIX]
            e, n, _ = w.shape
            # One more dimension than the [E, N, K] parameter: a plain transformers load cannot take it.
            assert codes.shape == (e, n, w.padded_in_features // 32, 16) and codes.dtype == torch.uint8
            assert torch.equal(codes.reshape(w.qdata.shape), w.qdata) and torch.equal(scale, w.scale)
            assert meta["weights"][key]["shape"] == list(w.shape) and meta["weights"][key]["in_features"] == w.shape[-1]
    # Linears and experts share one 32-wide Hadamard block, stored once.
    assert [k for k in tensors if k.startswith(ROTATION_PREFIX)] == [ROTATION_PREFIX + "0"]
    assert (saved / "tokenizer_config.json").is_file()


def test_reload_gives_identical_weights_and_logits(onload, reloaded):
    assert_mxfp4_experts(reloaded, len(experts_modules(onload)))
    assert_same_weights(onload, reloaded)
    q = quantized_params(reloaded)
    assert all(not p.requires_grad for p in q.values())
    # One rotation block in memory, shared by the linears and the experts.
    assert len({p.rotation.untyped_storage().data_ptr() for p in q.values()}) == 1
    assert torch.equal(logits(reloaded), logits(onload))


def test_save_reload_save_is_a_fixed_point(saved, reloaded, tmp_path):
    again = save_pretrained(reloaded, tmp_path / "again")
    assert_same_files(saved, again)


def test_reload_in_bfloat16_keeps_the_codes(onload, saved):
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    for name, w in quantized_params(model).items():
        ref = onload.get_parameter(name)
        assert w.dtype == torch.bfloat16 and torch.equal(w.qdata, ref.qdata) and torch.equal(w.scale, ref.scale)
    out = logits(model)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


# -- other ways in ---------------------------------------------------------------------------------

def test_model_quantized_in_memory_saves_fused_and_reloads(tmp_path):
    """Mixtral built in memory (no from_pretrained: transformers would derive its conversions, split the
    experts and rename mlp -> block_sparse_moe on save), experts and linears with different recipes."""
    config_cls, model_cls, fields = ARCHS["mixtral"]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**_COMMON, **fields))
    quantize_(model, tme.MXFP4Config(act_quant=False), filter_fn=lambda m, fqn: is_fused_experts(m))
    quantize_(model, CONFIG, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"))
    out = save_pretrained(model, tmp_path / "q", quant_config=None)
    tensors, _ = file_tensors(out)
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors and not any("block_sparse_moe" in k for k in tensors)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert_mxfp4_experts(reloaded, 2)
    assert reloaded.model.layers[0].mlp.experts.down_proj.act_scale_rule is None
    assert_same_weights(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))
    assert_same_files(out, save_pretrained(reloaded, tmp_path / "again"))


def test_quantize_on_load_skips_experts_in_modules_to_not_convert(tmp_path):
    folder = tiny_moe("qwen2_moe", tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=MXFP4HfConfig(CONFIG, modules_to_not_convert=["mlp.experts"])
    )
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "Qwen2MoeExperts" and type(experts.gate_up_proj) is torch.nn.Parameter
    assert isinstance(model.model.layers[0].mlp.shared_expert.down_proj.weight, tme.RotatedMXFP4Tensor)


def test_quantize_on_load_also_quantizes_experts_missing_from_the_checkpoint(tmp_path):
    folder = tiny_moe("qwen3_moe", tmp_path / "fp")
    tensors = load_file(folder / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not (k.startswith("model.layers.0.mlp.experts.") and "down_proj" in k)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=MXFP4HfConfig(CONFIG))
    # down_proj initialised by transformers (it warns), then quantized like the others.
    assert_mxfp4_experts(model, 2)
    assert bool(torch.isfinite(logits(model)).all())


# -- unsupported architectures -----------------------------------------------------------------------

def test_transposed_experts_are_refused_with_a_clear_error(tmp_path):
    cfg = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        sliding_window=16,
    )
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    with pytest.raises(NotImplementedError, match=r"mlp\.experts \(GptOssExperts\) stores its expert weights transposed"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=MXFP4HfConfig(CONFIG))
    # Left in high precision, as the message says, the rest quantizes, saves and reloads.
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=MXFP4HfConfig(CONFIG, modules_to_not_convert=["mlp.experts"])
    )
    assert type(model.model.layers[0].mlp.experts.gate_up_proj) is torch.nn.Parameter
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, tme.RotatedMXFP4Tensor)
    reloaded = AutoModelForCausalLM.from_pretrained(save_pretrained(model, tmp_path / "q"))
    assert_same_weights(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))


# -- format versions and bad files -------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_saved(tmp_path_factory):
    """A quantized Qwen2-MoE checkpoint to copy and damage."""
    folder = tiny_moe("qwen2_moe", tmp_path_factory.mktemp("moe") / "fp")
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=MXFP4HfConfig(CONFIG))
    return save_pretrained(model, folder.parent / "q")


@pytest.fixture
def moe_copy(moe_saved, tmp_path):
    import shutil

    return Path(shutil.copytree(moe_saved, tmp_path / "copy"))


def _as_version_1(meta):
    # Version 1 had no kernel_preference per weight (format versions: hf/serialization.py).
    meta["format_version"] = 1
    for w in meta["weights"].values():
        del w["kernel_preference"]


def test_version_1_checkpoints_still_load(tmp_path):
    """A 2-D checkpoint of format version 1 (same tensors, version 1 in config.json and metadata)."""
    cfg = transformers.LlamaConfig(**_COMMON)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    quantize_linears(model, CONFIG)
    old = save_pretrained(model, tmp_path / "v1")
    _edit_metadata(old / "model.safetensors", _as_version_1)
    _set_config_version(old, 1)
    reloaded = AutoModelForCausalLM.from_pretrained(old)
    assert reloaded.config.quantization_config.format_version == 1
    assert_same_weights(model, reloaded)
    assert torch.equal(logits(reloaded), logits(model))
    # Saved again: the current version, same tensors.
    new = save_pretrained(reloaded, tmp_path / "v2")
    assert json.loads(file_tensors(new)[1][0][METADATA_KEY])["format_version"] == FORMAT_VERSION
    assert json.loads((new / "config.json").read_text())["quantization_config"]["format_version"] == FORMAT_VERSION
    (t1, _), (t2, _) = file_tensors(old), file_tensors(new)
    assert sorted(t1) == sorted(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_version_1_cannot_hold_expert_weights(moe_copy):
    _edit_metadata(moe_copy / "model.safetensors", _as_version_1)
    _set_config_version(moe_copy, 1)
    with pytest.raises(CheckpointError, match=r"experts\.(gate_up|down)_proj: bad shape.*format version 1"):
        AutoModelForCausalLM.from_pretrained(moe_copy)


def test_config_and_files_of_different_versions_are_refused(moe_copy):
    _set_config_version(moe_copy, 1)
    with pytest.raises(CheckpointError, match=f"config.json says torchao_mx_ext format version 1, but the safetensors files say {FORMAT_VERSION}"):
        AutoModelForCausalLM.from_pretrained(moe_copy)


def test_expert_metadata_that_disagrees_with_the_codes_is_refused(moe_copy):
    key = "model.layers.0.mlp.experts.down_proj"

    def edit(meta):
        meta["weights"][key]["shape"][0] = 5  # 5 experts, the codes hold 4

    _edit_metadata(moe_copy / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=f"{key}: codes have shape/dtype"):
        AutoModelForCausalLM.from_pretrained(moe_copy)


def test_plain_transformers_refuses_our_moe_checkpoint(tmp_path):
    """Without our package, the fused experts codes (one dimension more) fail to load loudly."""
    folder = tiny_moe("qwen2_moe", tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(folder)
    quantize_(model, CONFIG, filter_fn=lambda m, fqn: is_fused_experts(m))  # the experts only
    out = save_pretrained(model, tmp_path / "q")
    run = load_without_our_package(out)
    assert "RAISED RuntimeError" in run.stdout, run.stdout + run.stderr[-3000:]
    assert "size mismatch" in run.stderr and "experts.gate_up_proj" in run.stderr
