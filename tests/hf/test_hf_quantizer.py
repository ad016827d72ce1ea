"""transformers integration: quantize-on-load, save/reload, the not-imported guard, bad checkpoints."""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import torchao_mx_ext as tme
from torchao_mx_ext.hf import (
    FORMAT_VERSION,
    QUANT_METHOD,
    CheckpointError,
    MXFP4HfConfig,
    MXFP4HfQuantizer,
    register,
    save_pretrained,
)
from torchao_mx_ext.hf.serialization import METADATA_KEY, ROTATION_PREFIX, SCALE_SUFFIX
from torchao_mx_ext.zoo import load_model, model_path

from checkpoint_checks import assert_same_weights, file_tensors, load_without_our_package, quantized_params

TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


def not_lm_head(module, fqn):
    # The filter of torchao-mx compare (recipes.is_quantizable_linear): every linear but lm_head.
    return isinstance(module, torch.nn.Linear) and fqn.split(".")[-1] != "lm_head"


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def tiny_llama(folder, layers=1, dtype=torch.float32):
    """A random Llama, saved plainly and loaded back in ``dtype`` (as transformers builds it: its
    rotary buffers stay float32, which ``.to(dtype)`` would not do)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


@pytest.fixture(scope="module")
def fp_path():
    return model_path("stories260k")


@pytest.fixture(scope="module")
def onload(fp_path):
    """stories260k quantized on load with MXFP4BlockRotConfig()."""
    return AutoModelForCausalLM.from_pretrained(fp_path, quantization_config=MXFP4HfConfig(tme.MXFP4BlockRotConfig()))


@pytest.fixture(scope="module")
def saved(onload, tmp_path_factory):
    return save_pretrained(onload, tmp_path_factory.mktemp("hf") / "stories-brq")


@pytest.fixture
def saved_copy(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "copy"))


# -- registration and config ----------------------------------------------------------------------

def test_registered_under_our_own_name():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

    assert QUANT_METHOD not in {"mxfp4", "mxfp8", "nvfp4", "fp_quant", "torchao"}
    assert AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is MXFP4HfConfig
    assert AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is MXFP4HfQuantizer
    register()  # idempotent
    config = AutoQuantizationConfig.from_dict(MXFP4HfConfig(tme.MXFP4Config()).to_dict())
    assert isinstance(config, MXFP4HfConfig) and config.quant_config == tme.MXFP4Config()


@pytest.mark.parametrize("inner", [
    tme.MXFP4BlockRotConfig(),
    tme.MXFP4Config(scale_rule="floor", act_quant=False),
    tme.MXFP4BlockRotConfig(rotation="random_hadamard", rotation_size=None, seed=7, act_scale_rule="rceil"),
    tme.MXFP4GPTQConfig(base=tme.MXFP4BlockRotConfig(scale_rule="even"), step="convert"),
    None,
])
def test_config_round_trips_through_json(inner):
    config = MXFP4HfConfig(inner, modules_to_not_convert=["mlp.down_proj"])
    data = json.loads(json.dumps(config.to_dict()))
    assert data["quant_method"] == QUANT_METHOD and data["format_version"] == FORMAT_VERSION
    back = MXFP4HfConfig.from_dict(data)
    assert back == config and back.quant_config == inner and back.modules_to_not_convert == ["mlp.down_proj"]


def test_config_from_a_newer_format_is_refused():
    data = MXFP4HfConfig(tme.MXFP4Config()).to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}.*upgrade torchao_mx_ext"):
        MXFP4HfConfig.from_dict(data)


def test_config_with_unknown_inner_config_is_refused():
    data = MXFP4HfConfig(tme.MXFP4Config()).to_dict()
    data["quant_config"]["_type"] = "MXFP9Config"
    with pytest.raises(ValueError, match="unknown torchao_mx_ext config 'MXFP9Config'"):
        MXFP4HfConfig.from_dict(data)
    data["quant_config"]["_type"] = "Int4WeightOnlyConfig"  # torchao's, not ours
    with pytest.raises(ValueError, match="unknown torchao_mx_ext config 'Int4WeightOnlyConfig'"):
        MXFP4HfConfig.from_dict(data)


def test_config_rejects_foreign_configs_and_fields():
    from torchao.quantization import Int8WeightOnlyConfig

    with pytest.raises(TypeError, match="quant_config must be one of torchao_mx_ext's configs"):
        MXFP4HfConfig(Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match="unknown fields"):
        MXFP4HfConfig.from_dict({**MXFP4HfConfig().to_dict(), "surprise": 1})


# -- quantize on load -----------------------------------------------------------------------------

@pytest.mark.parametrize("inner", [
    tme.MXFP4BlockRotConfig(),
    tme.MXFP4Config(scale_rule="floor", act_quant=False),
    tme.MXFP4BlockRotConfig(rotation="random_hadamard", rotation_size=None, seed=3),
])
def test_quantize_on_load_equals_quantize_on_the_loaded_model(fp_path, inner):
    ref, _ = load_model("stories260k")
    quantize_(ref, inner, filter_fn=not_lm_head)
    model = AutoModelForCausalLM.from_pretrained(fp_path, quantization_config=MXFP4HfConfig(inner))
    assert_same_weights(ref, model)
    q = quantized_params(model)
    assert len(q) == 5 * 7 and not any(n.startswith("lm_head") for n in q)
    assert all(not p.requires_grad for p in q.values())
    assert torch.equal(logits(model), logits(ref))


def test_quantize_on_load_skips_modules_to_not_convert(fp_path):
    model = AutoModelForCausalLM.from_pretrained(
        fp_path, quantization_config=MXFP4HfConfig(tme.MXFP4Config(), modules_to_not_convert=["mlp.down_proj"])
    )
    q = quantized_params(model)
    assert len(q) == 5 * 6 and not any("down_proj" in n for n in q)
    assert type(model.model.layers[0].mlp.down_proj.weight) is torch.nn.Parameter


def test_quantize_on_load_also_quantizes_linears_missing_from_the_checkpoint(fp_path, tmp_path):
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(fp_path, tmp_path / "fp"))
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=MXFP4HfConfig(tme.MXFP4Config()))
    # Initialised by transformers (it warns), then quantized like the others: no plain linear is left.
    assert isinstance(model.model.layers[3].mlp.up_proj.weight, tme.RotatedMXFP4Tensor)
    assert len(quantized_params(model)) == 35


def test_quantize_on_load_needs_a_data_free_recipe(fp_path):
    with pytest.raises(ValueError, match="needs a quant_config"):
        AutoModelForCausalLM.from_pretrained(fp_path, quantization_config=MXFP4HfConfig())
    gptq = tme.MXFP4GPTQConfig(base=tme.MXFP4Config(), step="convert")
    with pytest.raises(ValueError, match="MXFP4GPTQConfig cannot quantize on load"):
        AutoModelForCausalLM.from_pretrained(fp_path, quantization_config=MXFP4HfConfig(gptq))


# -- save and reload ------------------------------------------------------------------------------

def test_saved_files_hold_plain_tensors_only(onload, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    tensors, metas = file_tensors(saved)
    meta = json.loads(metas[0][METADATA_KEY])
    assert meta["format_version"] == FORMAT_VERSION
    for name, w in quantized_params(onload).items():
        codes, scale = tensors[name], tensors[name + SCALE_SUFFIX]
        assert codes.dtype == scale.dtype == torch.uint8
        # One more dimension than the linear weight: a plain load cannot take it for the weight.
        assert codes.dim() == 3 and torch.equal(codes.reshape(w.qdata.shape), w.qdata)
        assert torch.equal(scale, w.scale)
        assert meta["weights"][name]["scale_rule"] == w.scale_rule
    # One shared Hadamard block, stored once for the 35 linears.
    rotations = [k for k in tensors if k.startswith(ROTATION_PREFIX)]
    assert rotations == [ROTATION_PREFIX + "0"] and tensors[rotations[0]].shape == (32, 32)
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == QUANT_METHOD and config["quant_config"]["_type"] == "MXFP4BlockRotConfig"


def test_reload_gives_identical_weights_and_logits(onload, saved):
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert isinstance(model.hf_quantizer, MXFP4HfQuantizer) and model.hf_quantizer.pre_quantized
    assert_same_weights(onload, model)
    q = quantized_params(model)
    assert len(q) == 35 and all(not p.requires_grad for p in q.values())
    assert all(p.dequantized is None for p in q.values())
    # The loaded layers share one rotation block in memory, like quantize_'s.
    assert len({p.rotation.untyped_storage().data_ptr() for p in q.values()}) == 1
    assert torch.equal(logits(model), logits(onload))


def test_save_reload_save_is_a_fixed_point(onload, saved, tmp_path):
    first = AutoModelForCausalLM.from_pretrained(saved)
    again = save_pretrained(first, tmp_path / "again")
    (t1, m1), (t2, m2) = file_tensors(saved), file_tensors(again)
    assert m1 == m2 and sorted(t1) == sorted(t2)
    assert all(t1[k].dtype == t2[k].dtype and torch.equal(t1[k], t2[k]) for k in t1)
    assert json.loads((saved / "config.json").read_text()) == json.loads((again / "config.json").read_text())
    second = AutoModelForCausalLM.from_pretrained(again)
    assert_same_weights(first, second)
    assert torch.equal(logits(second), logits(onload))


def test_dequantized_cache_is_not_saved(fp_path, saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved)
    tme.cache_dequantized_weights(model)
    assert all(p.dequantized is not None for p in quantized_params(model).values())
    out = save_pretrained(model, tmp_path / "cached")
    (t1, m1), (t2, m2) = file_tensors(saved), file_tensors(out)
    assert m1 == m2 and sorted(t1) == sorted(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_sharded_save_reloads_identically(onload, tmp_path):
    out = save_pretrained(onload, tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    metas = [m[METADATA_KEY] for m in file_tensors(out)[1]]
    assert len(set(metas)) == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_same_weights(onload, model)
    assert torch.equal(logits(model), logits(onload))


def test_base_model_loads_from_the_causal_lm_checkpoint(onload, saved):
    from transformers import AutoModel

    base = AutoModel.from_pretrained(saved)  # keys lose their "model." prefix on the way in
    assert len(quantized_params(base)) == 35
    with torch.no_grad():
        assert torch.equal(base(TOKENS).last_hidden_state, onload.model(TOKENS).last_hidden_state)


def test_reload_in_another_dtype_keeps_the_codes(onload, saved):
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    for name, w in quantized_params(model).items():
        ref = onload.get_parameter(name)
        assert w.dtype == torch.bfloat16 and torch.equal(w.qdata, ref.qdata) and torch.equal(w.scale, ref.scale)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert logits(model).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_then_save_mixed_recipes(dtype, tmp_path):
    """A model quantize_d directly, with different recipes per linear (as model-level recipes do)."""
    model = tiny_llama(tmp_path / "fp", layers=2, dtype=dtype)
    quantize_(model, tme.MXFP4BlockRotConfig(rotation="random_hadamard", rotation_size=None, seed=5),
              filter_fn=lambda m, fqn: fqn.endswith("down_proj"))
    quantize_(model, tme.MXFP4Config(scale_rule="floor", act_quant=False), filter_fn=lambda m, fqn: fqn.endswith("v_proj"))
    quantize_(model, tme.MXFP4BlockRotConfig(scale_rule="even"),
              filter_fn=lambda m, fqn: not_lm_head(m, fqn) and not isinstance(m.weight, tme.RotatedMXFP4Tensor))
    out = save_pretrained(model, tmp_path / "mixed", quant_config=None)
    tensors, _ = file_tensors(out)
    # The full-width (96) random Hadamard of down_proj and the 32-wide Hadamard: two blocks stored.
    assert sorted(tensors[k].shape[0] for k in tensors if k.startswith(ROTATION_PREFIX)) == [32, 96]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == dtype
    assert_same_weights(model, reloaded)
    tokens = TOKENS[:, :10]
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))


def test_reloaded_model_compiles_fullgraph(tmp_path):
    model = tiny_llama(tmp_path / "fp", layers=1)
    quantize_(model, tme.MXFP4BlockRotConfig(), filter_fn=not_lm_head)
    reloaded = AutoModelForCausalLM.from_pretrained(save_pretrained(model, tmp_path / "c"))
    tokens = TOKENS[:1, :8]
    torch._dynamo.reset()
    try:
        # fullgraph=True fails on any graph break; aot_eager also runs the subclass through AOT
        # autograd (Inductor gives the same graph, only slower to build on CPU).
        compiled = torch.compile(reloaded, fullgraph=True, backend="aot_eager")
        assert torch.equal(logits(compiled, tokens), logits(model, tokens))
    finally:
        torch._dynamo.reset()


# -- the guard: our checkpoint without our package --------------------------------------------------

def test_plain_transformers_refuses_our_checkpoint(saved):
    run = load_without_our_package(saved)
    assert "RAISED RuntimeError" in run.stdout, run.stdout + run.stderr[-3000:]
    assert "size mismatch" in run.stderr and "q_proj.weight" in run.stderr


def test_importing_the_package_alone_registers_the_method(saved):
    code = textwrap.dedent(f"""
        import torchao_mx_ext
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(saved)!r})
        w = m.model.layers[0].self_attn.q_proj.weight
        print("TYPE", type(w).__name__, w.requires_grad)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TYPE RotatedMXFP4Tensor False" in run.stdout


# -- bad checkpoints ------------------------------------------------------------------------------

def _data_offset(path, key):
    """Byte offset in the file of tensor ``key``'s data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n + header[key]["data_offsets"][0]


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _rewrite(path, edit_metadata):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file(tensors, str(path), metadata=edit_metadata(dict(meta)))


def test_truncated_file_is_refused(saved_copy):
    f = saved_copy / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        AutoModelForCausalLM.from_pretrained(saved_copy)


@pytest.mark.parametrize("key", [
    "model.layers.2.mlp.down_proj.weight",                 # codes
    "model.layers.0.self_attn.q_proj.weight" + SCALE_SUFFIX,  # scales
    ROTATION_PREFIX + "0",                                   # the shared rotation
    "model.norm.weight",                                     # an ordinary tensor
])
def test_modified_tensor_bytes_are_refused(saved_copy, key):
    f = saved_copy / "model.safetensors"
    _flip_byte(f, _data_offset(f, key) + 3)
    with pytest.raises(CheckpointError, match=f"tensor '{key}' does not match its recorded digest"):
        AutoModelForCausalLM.from_pretrained(saved_copy)


def _edit_weights(field, value):
    def edit(meta):
        ours = json.loads(meta[METADATA_KEY])
        ours["weights"]["model.layers.1.mlp.up_proj.weight"][field] = value
        meta[METADATA_KEY] = json.dumps(ours)
        return meta
    return edit


def _edit_version(meta):
    ours = json.loads(meta[METADATA_KEY])
    ours["format_version"] = FORMAT_VERSION + 1
    meta[METADATA_KEY] = json.dumps(ours)
    return meta


@pytest.mark.parametrize("edit,message", [
    (lambda m: {k: v for k, v in m.items() if k != METADATA_KEY}, "no 'torchao_mx_ext' metadata"),
    (lambda m: {**m, METADATA_KEY: m[METADATA_KEY][:-5]}, "not valid JSON"),
    (_edit_version, "upgrade torchao_mx_ext"),
    (_edit_weights("scale_rule", "bogus"), "unknown MXFP4 scale rule 'bogus'"),
    (_edit_weights("rotation", ROTATION_PREFIX + "9"), "refers to rotation"),
    (_edit_weights("in_features", 65), "bad shape/in_features"),
])
def test_modified_metadata_is_refused(saved_copy, edit, message):
    _rewrite(saved_copy / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(saved_copy)


def test_metadata_that_disagrees_with_the_tensors_is_refused(saved_copy):
    # Self-consistent metadata (shape and in_features agree) that does not fit the stored codes.
    def edit(meta):
        ours = json.loads(meta[METADATA_KEY])
        ours["weights"]["model.layers.1.mlp.up_proj.weight"].update(shape=[172, 100], in_features=100)
        meta[METADATA_KEY] = json.dumps(ours)
        return meta

    _rewrite(saved_copy / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match="up_proj.weight: codes have shape/dtype"):
        AutoModelForCausalLM.from_pretrained(saved_copy)


def test_pickle_checkpoints_are_refused(saved_copy):
    from safetensors.torch import load_file

    tensors = load_file(saved_copy / "model.safetensors")
    (saved_copy / "model.safetensors").unlink()
    torch.save(tensors, saved_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        AutoModelForCausalLM.from_pretrained(saved_copy)


@pytest.mark.parametrize("edit,message", [
    (lambda q: q["quant_config"].update(_type="MXFP9Config"), "unknown torchao_mx_ext config 'MXFP9Config'"),
    (lambda q: q.update(format_version=FORMAT_VERSION + 1), "upgrade torchao_mx_ext"),
])
def test_bad_quantization_config_in_config_json_is_refused(saved_copy, edit, message):
    path = saved_copy / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved_copy)


# -- atomic save ----------------------------------------------------------------------------------

def _failing_writer(monkeypatch):
    import transformers.modeling_utils as mu

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(mu, "safe_save_file", write_half_then_fail)


def test_failed_save_leaves_nothing_behind(onload, tmp_path, monkeypatch):
    _failing_writer(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(onload, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_checkpoint(onload, saved_copy, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved_copy.iterdir()}
    _failing_writer(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(onload, saved_copy)
    assert {p.name: p.read_bytes() for p in saved_copy.iterdir()} == before
    assert sorted(p.name for p in saved_copy.parent.iterdir()) == ["copy"]


def test_save_replaces_the_checkpoint_of_an_existing_folder(onload, fp_path, saved_copy):
    from transformers import AutoTokenizer

    (saved_copy / "NOTES.txt").write_text("the user's own file")
    save_pretrained(onload, saved_copy, tokenizer=AutoTokenizer.from_pretrained(fp_path))
    assert (saved_copy / "NOTES.txt").read_text() == "the user's own file"
    assert (saved_copy / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in saved_copy.parent.iterdir()) == ["copy"]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(saved_copy)), logits(onload))


# -- kernel preference and older format versions ---------------------------------------------------

def test_kernel_preference_is_saved_and_reloaded(fp_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        fp_path, quantization_config=MXFP4HfConfig(tme.MXFP4BlockRotConfig(kernel_preference="emulated"))
    )
    assert {p.kernel_preference for p in quantized_params(model).values()} == {"emulated"}
    save_pretrained(model, tmp_path / "ckpt")
    _, metas = file_tensors(tmp_path / "ckpt")
    weights = json.loads(metas[0][METADATA_KEY])["weights"]
    assert {w["kernel_preference"] for w in weights.values()} == {"emulated"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert {p.kernel_preference for p in quantized_params(reloaded).values()} == {"emulated"}


def test_a_version_2_checkpoint_loads_with_the_auto_kernel(onload, saved_copy):
    # A version-2 file: no kernel_preference per weight (metadata edits keep every tensor digest valid).
    def to_version_2(meta):
        ours = json.loads(meta[METADATA_KEY])
        ours["format_version"] = 2
        for w in ours["weights"].values():
            del w["kernel_preference"]
        meta[METADATA_KEY] = json.dumps(ours)
        return meta

    _rewrite(saved_copy / "model.safetensors", to_version_2)
    config = json.loads((saved_copy / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (saved_copy / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(saved_copy)
    assert {p.kernel_preference for p in quantized_params(reloaded).values()} == {"auto"}
    assert torch.equal(logits(reloaded), logits(onload))
