"""compressed-tensors (vLLM) export: bytes, config, compressed-tensors' own decompressor and loaders.

No GPU and no vLLM: compressed-tensors' decompressor, transformers without our package, and
``scripts/load_like_vllm.py`` (vLLM's online transforms and compressed-tensors' W4A4 emulation) are
the references.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme  # noqa: E402
from compressed_tensors.transform import TransformConfig  # noqa: E402
from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import torchao_mx_ext as tme  # noqa: E402
from torchao_mx_ext.export import compressed_tensors as ct_export  # noqa: E402
from torchao_mx_ext.export.compressed_tensors import (  # noqa: E402
    CompressedTensorsExportError,
    hadamard_transform_size,
    to_compressed_tensors,
)
from torchao_mx_ext.recipes import quantize_linears  # noqa: E402
from torchao_mx_ext.rotation import rotation_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "load_like_vllm.py"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(intermediate: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # extreme rows: E8M0 scales near both ends of the range
        model.model.layers[0].mlp.up_proj.weight[0].mul_(1e-30)
        model.model.layers[0].mlp.up_proj.weight[1].mul_(1e30)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from torchao_mx_ext.zoo import model_path

    return AutoTokenizer.from_pretrained(model_path("stories260k"))


def export(model, tokenizer, out, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_compressed_tensors(model, tokenizer, out, **kw)
    return [str(w.message) for w in caught]


def quantized(model):
    return {n[: -len(".weight")]: p for n, p in model.named_parameters() if isinstance(p, tme.RotatedMXFP4Tensor)}


def no_leftovers(out: Path):
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


CASES = {
    "rtn-w4a4": (lambda: tme.MXFP4Config(act_scale_rule="even"), "MXFP4", None),
    "rtn-weight-only": (lambda: tme.MXFP4Config(act_quant=False), "MXFP4A16", None),
    "block-rot-w4a4": (lambda: tme.MXFP4BlockRotConfig(), "MXFP4", 32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_and_bytes_decompress_to_our_weights_bit_for_bit(case, tokenizer, tmp_path):
    make_config, preset, head_dim = CASES[case]
    model = quantize_linears(tiny_llama(), make_config())
    out = tmp_path / "ct"
    messages = export(model, tokenizer, out)
    no_leftovers(out)
    assert any("transform_config" in m for m in messages) == (head_dim is not None)

    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "mxfp4-pack-quantized"
    assert q["ignore"] == ["lm_head"] and q["quantization_status"] == "compressed"
    assert config["architectures"] == ["LlamaForCausalLM"]
    (group,) = q["config_groups"].values()
    scheme = preset_name_to_scheme(preset, ["Linear"])
    # exactly what compressed-tensors' preset writes
    assert group == json.loads(scheme.model_dump_json())
    expected = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
                "dynamic": False, "scale_dtype": "torch.uint8"}
    assert {k: group["weights"][k] for k in expected} == expected
    assert (group["input_activations"] is not None) == (preset == "MXFP4")
    if preset == "MXFP4":
        assert group["input_activations"]["dynamic"] is True and group["input_activations"]["group_size"] == 32
    QuantizationConfig.model_validate({k: v for k, v in q.items() if k in QuantizationConfig.model_fields})

    if head_dim is None:
        assert not q["transform_config"]
    else:
        (t,) = TransformConfig.model_validate(q["transform_config"]).config_groups.values()
        assert t.type == "hadamard" and t.head_dim == head_dim and not t.randomize
        locations = {(a.location, a.inverse, tuple(a.targets), tuple(a.ignore)) for a in t.apply}
        assert locations == {("weight_input", True, ("Linear",), ("lm_head",)), ("input", False, ("Linear",), ("lm_head",))}

    tensors = load_file(str(out / "model.safetensors"))
    compressor = BaseCompressor.get_value_from_registry("mxfp4-pack-quantized")
    weights = quantized(model)
    assert len(weights) == 2 * len(LINEARS)
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.weight)  # unquantized, dense (not tied here)
    for name, w in weights.items():
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert packed.dtype == scale.dtype == torch.uint8
        assert packed.shape == (w.shape[0], w.shape[1] // 2) and scale.shape == (w.shape[0], w.shape[1] // 32)
        assert torch.equal(packed, w.qdata) and torch.equal(scale, w.scale)
        dense = compressor.decompress({"weight_packed": packed, "weight_scale": scale}, scheme)["weight"]
        assert torch.equal(dense.float(), w.dequantize(torch.float32)), name
        assert f"{name}.weight" not in tensors
    up = weights["model.layers.0.mlp.up_proj"].scale
    assert int(up.min()) < 40 and int(up.max()) > 200  # the extreme rows reached both ends
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(tensors[key], model.state_dict()[key])


def test_our_hadamard_is_compressed_tensors_and_vllm_hadamard():
    for b in (2, 4, 8, 16, 32, 64, 128, 256):
        ours = rotation_block("hadamard", b)
        theirs = deterministic_hadamard_matrix(b, torch.float64) / math.sqrt(b)
        assert torch.allclose(ours.double(), theirs, rtol=0, atol=1e-7)  # same signs, same order
        assert torch.equal(ours, theirs.float())
        assert hadamard_transform_size(ours) == b
    assert hadamard_transform_size(None) is None
    with pytest.raises(CompressedTensorsExportError, match="not the normalised Sylvester"):
        hadamard_transform_size(rotation_block("random_hadamard", 32, seed=3))
    with pytest.raises(CompressedTensorsExportError, match="power-of-two"):
        hadamard_transform_size(rotation_block("hadamard", 12))


PLAIN_LOAD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if sys.argv[4] == "dequantize" else {}
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs).eval()
    with torch.inference_mode():
        logits = model(torch.load(sys.argv[2])).logits
    torch.save(logits, sys.argv[3])
    print("IMPORTED", any(m.startswith("torchao_mx_ext") for m in sys.modules))
""")


def plain_transformers_logits(folder: Path, ids: torch.Tensor, tmp_path: Path, how: str) -> torch.Tensor:
    """Logits of ``from_pretrained(folder)`` in a fresh interpreter that never imports torchao_mx_ext
    (no PYTHONPATH, cwd /), the ``load_without_our_package`` pattern of ``tests/checkpoint_checks.py``."""
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"), how],
        capture_output=True, text=True, timeout=600, cwd="/", env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "IMPORTED False" in run.stdout
    return torch.load(tmp_path / "logits.pt")


PLAIN = {
    # compressed-tensors decompresses MXFP4 to bfloat16 whatever the model dtype, so a float32 export
    # loads plainly only dequantized at load time (then cast to float32); bfloat16 ones load as they are.
    "float32-weight-only-dequantized": (torch.float32, tme.MXFP4Config(act_quant=False), "dequantize", 1e-5),
    "bfloat16-weight-only": (torch.bfloat16, tme.MXFP4Config(act_quant=False), "plain", 0.0),
    # W4A4: compressed-tensors' own forward quantizes the inputs dynamically, with our "even" rule (the same)
    "bfloat16-w4a4-ct": (torch.bfloat16, tme.MXFP4Config(act_scale_rule="even"), "plain", 0.0),
}


@pytest.mark.parametrize("case", list(PLAIN))
def test_plain_transformers_loads_the_rotation_free_export(case, tokenizer, tmp_path):
    """transformers + compressed-tensors, without our package, computes our logits."""
    dtype, config, how, tol = PLAIN[case]
    model = quantize_linears(tiny_llama(seed=1).to(dtype), config)
    out = tmp_path / "ct"
    messages = export(model, tokenizer, out)
    assert any("decompresses MXFP4 weights to bfloat16" in m for m in messages) == (dtype != torch.bfloat16)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(ids).logits
    theirs = plain_transformers_logits(out, ids, tmp_path, how)
    assert theirs.dtype == ours.dtype == dtype
    torch.testing.assert_close(theirs, ours, rtol=tol, atol=tol)


def test_load_like_vllm_perplexity_on_stories260k_rotated_export(tokenizer, tmp_path, shared_data):
    """Block-rotated W4A4 stories260k (down_proj, 172 wide, left dense): the vLLM-like loader's
    perplexity is ours with compressed-tensors' activation rule (our ``even``) to float rounding, and within
    5% of ours with the default ``mse`` activation rule (which the format cannot carry)."""
    import copy

    from torchao_mx_ext.eval.perplexity import perplexity, tokenize_for_perplexity, wikitext2_test_text
    from torchao_mx_ext.zoo import load_model

    base, tok = load_model("stories260k")
    ids = tokenize_for_perplexity(tok, wikitext2_test_text(shared_data))
    ours = {}
    for act in ("mse", "even"):
        model = copy.deepcopy(base)
        config = tme.MXFP4BlockRotConfig(act_scale_rule=act)
        quantize_linears(model, lambda short: None if short == "down_proj" else config)
        ours[act] = perplexity(model, ids, 512, 2, progress=False)["ppl"]
    out = tmp_path / "stories-ct"
    export(model, tok, out)  # the "even" model: the export is the same bytes for both
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(q["ignore"]) == sorted(["lm_head"] + [f"model.layers.{i}.mlp.down_proj" for i in range(5)])
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied to the embedding (tie_word_embeddings)
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.weight"], model.model.layers[0].mlp.down_proj.weight)
    (t,) = q["transform_config"]["config_groups"].values()
    assert {tuple(a["targets"]) for a in t["apply"]} == {("Linear",)} and {tuple(a["ignore"]) for a in t["apply"]} == {tuple(q["ignore"])}

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result_path = tmp_path / "vllm_like.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--eval-windows", "2", "--json", str(result_path),
         "--data-dir", str(shared_data)],
        capture_output=True, text=True, timeout=900, cwd="/", env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert json.loads(run.stdout.strip().splitlines()[-1])["ppl"] == result["ppl"]
    assert result["imported_torchao_mx_ext"] is False
    assert result["windows"] == 2 and result["seq_len"] == 512
    assert result["transformed_linears"] == result["act_quantized_linears"] == 5 * 6
    assert result["ppl"] == pytest.approx(ours["even"], rel=1e-4)
    assert result["ppl"] == pytest.approx(ours["mse"], rel=0.05)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_existing_folder_is_refused_unless_overwrite(tokenizer, tmp_path):
    model = quantize_linears(tiny_llama(), tme.MXFP4Config())
    out = tmp_path / "ct"
    out.mkdir()
    to_compressed_tensors(model, tokenizer, out)  # an empty folder is fine
    (out / "old-note.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        to_compressed_tensors(model, tokenizer, out)
    assert (out / "old-note.txt").exists()
    to_compressed_tensors(model, tokenizer, out, overwrite=True)
    assert not (out / "old-note.txt").exists() and (out / "model.safetensors").is_file()
    no_leftovers(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        to_compressed_tensors(model, tokenizer, tmp_path / "file", overwrite=True)


def _padded_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the padding notice
        return quantize_linears(tiny_llama(intermediate=80), tme.MXFP4Config())


def _full_width_96():
    model = tiny_llama(intermediate=96)  # down_proj is 96 wide: no power-of-two Hadamard
    return quantize_linears(model, lambda s: tme.MXFP4BlockRotConfig(rotation_size=None) if s == "down_proj" else tme.MXFP4Config())


def _biased_block_rot():
    model = tiny_llama()
    attn = model.model.layers[1].self_attn
    attn.q_proj.bias = torch.nn.Parameter(torch.randn(attn.q_proj.out_features))  # as Qwen2's q/k/v have
    return quantize_linears(model, tme.MXFP4BlockRotConfig())


BAD = {
    "not-our-model": (lambda: tiny_llama(), "no MXFP4-quantized linear"),
    "fp_quant": (lambda: quantize_linears(tiny_llama(), tme.MXFP4Config(scale_rule="fp_quant")), "fp_quant scales"),
    "random_hadamard": (
        lambda: quantize_linears(tiny_llama(), tme.MXFP4BlockRotConfig(rotation="random_hadamard", seed=1)),
        "not the normalised Sylvester Hadamard.*What exports: rotation='hadamard'",
    ),
    "global-rot": (
        lambda: quantize_linears(tiny_llama(), tme.MXFP4BlockRotConfig(rotation="random_hadamard", rotation_size=None)),
        "cannot apply online",
    ),
    "full-width-non-power-of-two": (_full_width_96, "down_proj: a 96 x 96 rotation block.*power-of-two"),
    "bias-with-online-rotation": (_biased_block_rot, "model.layers.1.self_attn.q_proj have a bias and an online rotation.*assert bias is None"),
    "padded-width": (_padded_model, "input width not a multiple of 32: model.layers.0.mlp.down_proj \\(80, stored zero-padded to 96\\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_clear_errors_and_write_nothing(case, tokenizer, tmp_path):
    make, message = BAD[case]
    model = make()
    out = tmp_path / "ct"
    with pytest.raises(CompressedTensorsExportError, match=message):
        to_compressed_tensors(model, tokenizer, out)
    assert not out.exists()
    no_leftovers(out)
    with pytest.raises(CompressedTensorsExportError, match=message):
        ct_export.check_exportable(model)


def test_bad_inputs_report_every_reason_at_once(tokenizer, tmp_path):
    bad = tiny_llama(intermediate=80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_linears(bad, lambda s: tme.MXFP4Config(scale_rule="fp_quant") if s == "q_proj" else tme.MXFP4Config())
    with pytest.raises(CompressedTensorsExportError, match="fp_quant.*input width"):
        to_compressed_tensors(bad, tokenizer, tmp_path / "ct")


def test_an_interrupted_write_leaves_no_folder_and_keeps_the_old_one(tokenizer, tmp_path, monkeypatch):
    model = quantize_linears(tiny_llama(), tme.MXFP4BlockRotConfig())

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    out = tmp_path / "ct"
    monkeypatch.setattr(ct_export, "_write_config", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        to_compressed_tensors(model, tokenizer, out)
    assert not out.exists()
    no_leftovers(out)

    monkeypatch.undo()
    export(model, tokenizer, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(ct_export, "_write_weights", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        to_compressed_tensors(model, tokenizer, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    no_leftovers(out)


def test_partial_rotation_and_mixed_modes_get_exact_targets(tokenizer, tmp_path):
    """brq-like: only down_proj rotated (one leaf regex); W4A4 and weight-only layers (two groups)."""
    model = tiny_llama()

    def config(short):
        if short == "down_proj":
            return tme.MXFP4BlockRotConfig(act_scale_rule="even")
        return tme.MXFP4Config(act_quant=short not in ("q_proj", "k_proj", "v_proj"), act_scale_rule="even")

    quantize_linears(model, config)
    out = tmp_path / "ct"
    export(model, tokenizer, out)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = q["config_groups"]
    assert sorted(groups) == ["group_0", "group_1"]
    w4a4, weight_only = groups["group_0"], groups["group_1"]
    assert w4a4["input_activations"] is not None and weight_only["input_activations"] is None
    assert sorted(weight_only["targets"]) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj"))
    assert len(w4a4["targets"]) == 2 * 4
    (t,) = q["transform_config"]["config_groups"].values()
    assert {tuple(a["targets"]) for a in t["apply"]} == {("re:(.*\\.)?down_proj$",)}

    # compressed-tensors' own matching selects exactly the rotated modules
    from compressed_tensors.utils import match_named_modules

    tc = TransformConfig.model_validate(q["transform_config"])
    (scheme,) = tc.config_groups.values()
    matched = {n for n, _ in match_named_modules(model, scheme.apply[0].targets, scheme.apply[0].ignore)}
    assert matched == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}


def test_shared_input_mode_exports_the_per_linear_weights(tokenizer, tmp_path):
    model = quantize_linears(tiny_llama(), tme.MXFP4BlockRotConfig(act_scale_rule="even"))
    export(model, tokenizer, tmp_path / "a")
    tme.share_input_quantization(model)
    export(model, tokenizer, tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()


def test_a_plain_module_is_refused(tokenizer, tmp_path):
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    from torchao.quantization import quantize_

    quantize_(lin, tme.MXFP4Config())
    with pytest.raises(CompressedTensorsExportError, match="not a transformers model"):
        to_compressed_tensors(lin, tokenizer, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
