"""GGUF export (torchao_mx_ext.export.gguf): read back with gguf.GGUFReader, every MXFP4 tensor decoded by
gguf.quants equals our weight.dequantize() bit for bit, the metadata llama.cpp needs is there, other
tensors are the model's, what GGUF cannot express is refused before anything is written, and an
interrupted write leaves nothing. Where a llama.cpp source tree is present (scripts/build_llama_cpp.sh
unpacks one into .cache/llama.cpp/src), the file is also compared with llama.cpp's own converter's."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

gguf = pytest.importorskip("gguf")

from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config, share_input_quantization  # noqa: E402
from torchao_mx_ext.configs import DEFAULT_SCALE_RULE, quantize_linears  # noqa: E402
from torchao_mx_ext.export import GGUFExportError, to_gguf  # noqa: E402
from torchao_mx_ext.export.gguf import ggml_mxfp4_blocks  # noqa: E402
from torchao_mx_ext.mx import mxfp4_fake_quantize  # noqa: E402
from torchao_mx_ext.mx.packing import pack_uint4  # noqa: E402
from torchao_mx_ext.recipes import METHODS, QuantSettings  # noqa: E402
from torchao_mx_ext.tensors import RotatedMXFP4Tensor  # noqa: E402
from torchao_mx_ext.zoo import load_model, model_path, shared_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LLAMA_CPP_SRC = Path(__file__).resolve().parents[2] / ".cache" / "llama.cpp" / "src"
MXFP4 = gguf.GGMLQuantizationType.MXFP4
RULE = DEFAULT_SCALE_RULE


# ---------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def stories_tokenizer():
    return AutoTokenizer.from_pretrained(shared_dir() / "models" / "stories260k")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """A GPT-2 BPE tokenizer llama.cpp knows (pre-tokenizer "smollm")."""
    return AutoTokenizer.from_pretrained(model_path("smollm2-135m"))


def tiny_llama(vocab=512, tie=True, seed=0, dtype=torch.float32, cls=LlamaForCausalLM, config_cls=LlamaConfig, **extra):
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, **extra,
    )
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def rtn(model, weight_only=True, scale_rule=RULE):
    METHODS["rtn"].apply(model, QuantSettings(scale_rule, None, weight_only, 0, None))
    return model


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def decoded(t) -> torch.Tensor:
    """A GGUF tensor as float32 torch, [rows, cols] as in the model."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def bits(x: torch.Tensor) -> torch.Tensor:
    """float32 bits with -0 as +0 (our code 8, -0, reads back as ggml's +0: the same value)."""
    return (x.to(torch.float32) + 0.0).view(torch.int32)


def llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute (q/k rows into its rope layout)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")  # model.layers.<i>.<block>.<proj>.weight
    return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:5])]}.{parts[5]}"


def assert_mxfp4_weights_equal(model, tensors, permute=True):
    cfg = model.config
    seen = 0
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, RotatedMXFP4Tensor):
            continue
        t = tensors[gguf_name(f"{name}.weight")]
        assert t.tensor_type == MXFP4 and list(t.shape) == [w.shape[1], w.shape[0]], name
        ours = w.dequantize(torch.float32)
        if permute and name.endswith("q_proj"):
            ours = llama_permute(ours, cfg.num_attention_heads)
        elif permute and name.endswith("k_proj"):
            ours = llama_permute(ours, cfg.num_key_value_heads)
        assert torch.equal(bits(decoded(t)), bits(ours)), name
        seen += 1
    assert seen == 7 * cfg.num_hidden_layers


# ---------------------------------------------------------------------------------------------------
# the block layout


def ggml_reference_decode(blocks: np.ndarray) -> np.ndarray:
    """dequantize_row_mxfp4 (ggml/src/ggml-quants.c) transcribed: kvalues_fp4 (ggml-common.h, doubled E2M1)
    times ggml_e8m0_to_fp32_half (ggml-impl.h), element j from the low nibble of byte j, j + 16 from the high."""
    kvalues = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)
    rows = blocks.reshape(-1, 17)
    e = rows[:, 0].astype(np.uint32)
    half = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32).view(np.float32)
    qs = rows[:, 1:]
    out = np.empty((rows.shape[0], 32), dtype=np.float32)
    out[:, :16] = kvalues[qs & 0x0F] * half[:, None]
    out[:, 16:] = kvalues[qs >> 4] * half[:, None]
    return out.reshape(blocks.shape[0], -1)


def test_blocks_are_ggml_block_mxfp4_for_every_code_and_scale():
    # every code at every position of a block (16 rows, code (row + j) % 16 at element j), each row with its
    # own scale byte per block, the extremes included (0: 2^-127, ggml's half scale subnormal; 254: 2^127)
    scale_bytes = torch.tensor([0, 1, 2, 3, 60, 100, 126, 127, 128, 129, 150, 200, 252, 253, 254, 127], dtype=torch.uint8)
    rows, n_blocks = 16, 3
    codes = torch.stack([(torch.arange(32 * n_blocks) + r) % 16 for r in range(rows)]).to(torch.uint8)
    scale = torch.stack([scale_bytes.roll(r)[:n_blocks] for r in range(rows)])
    w = RotatedMXFP4Tensor(pack_uint4(codes), scale, 32, RULE, None, 32 * n_blocks, torch.float32)
    blocks = ggml_mxfp4_blocks(w)
    assert blocks.dtype == torch.uint8 and blocks.shape == (rows, n_blocks * 17)
    b = blocks.reshape(rows, n_blocks, 17)
    c = codes.reshape(rows, n_blocks, 32)
    assert torch.equal(b[..., 0], scale)  # the E8M0 byte first, unchanged
    assert torch.equal(b[..., 1:] & 0x0F, c[..., :16]) and torch.equal(b[..., 1:] >> 4, c[..., 16:])
    ours = w.dequantize(torch.float32)  # 4 and 6 times 2^127 overflow to inf: in ggml too
    with np.errstate(over="ignore"):
        theirs = gguf.quants.dequantize(blocks.numpy(), MXFP4)
        reference = ggml_reference_decode(blocks.numpy())
    assert torch.equal(bits(torch.from_numpy(theirs)), bits(ours))
    assert torch.equal(bits(torch.from_numpy(reference)), bits(ours))


# ---------------------------------------------------------------------------------------------------
# whole models


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_llama_weights_metadata_and_tensors(tmp_path, stories_tokenizer, method):
    model = tiny_llama()
    embed = model.model.embed_tokens.weight.detach().clone()
    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0)) if method == "gptq" else None
    METHODS[method].apply(model, QuantSettings(RULE, None, True, 0, calib))
    out = to_gguf(model, stories_tokenizer, tmp_path / "m.gguf")
    assert out == tmp_path / "m.gguf" and sorted(os.listdir(tmp_path)) == ["m.gguf"]
    fields, tensors = read(out)
    assert_mxfp4_weights_equal(model, tensors)

    cfg = model.config
    expected = {
        "general.architecture": "llama",
        "general.file_type": gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.block_count": cfg.num_hidden_layers,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.attention.key_length": 16,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 512,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.tokens"] == [stories_tokenizer.convert_ids_to_tokens(i) for i in range(512)]
    # weight-only: llama.cpp must not quantize these tensors' activations to 4 bits
    mx = sorted(n for n, t in tensors.items() if t.tensor_type == MXFP4)
    assert sorted(fields["general.tensor_extra.name"]) == mx and fields["general.tensor_extra.prec_a4"] == [False] * len(mx)

    # other tensors: the model's, in its float type (float32 here); the tied lm_head is not written
    assert "output.weight" not in tensors
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(decoded(tensors["token_embd.weight"]), embed)
    for i, layer in enumerate(model.model.layers):
        assert torch.equal(decoded(tensors[f"blk.{i}.attn_norm.weight"]), layer.input_layernorm.weight.detach())
        assert torch.equal(decoded(tensors[f"blk.{i}.ffn_norm.weight"]), layer.post_attention_layernorm.weight.detach())
    assert torch.equal(decoded(tensors["output_norm.weight"]), model.model.norm.weight.detach())
    assert len(tensors) == 1 + 9 * cfg.num_hidden_layers + 1


def test_bf16_model_untied_head_and_outtype(tmp_path, stories_tokenizer):
    model = rtn(tiny_llama(tie=False, dtype=torch.bfloat16))
    _, tensors = read(to_gguf(model, stories_tokenizer, tmp_path / "bf16.gguf"))
    assert_mxfp4_weights_equal(model, tensors)
    for gname, p in (("token_embd.weight", model.model.embed_tokens.weight), ("output.weight", model.lm_head.weight)):
        assert tensors[gname].tensor_type == gguf.GGMLQuantizationType.BF16, gname
        assert torch.equal(decoded(tensors[gname]), p.detach().float()), gname  # bf16 values are exact
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    _, tensors = read(to_gguf(model, stories_tokenizer, tmp_path / "f16.gguf", outtype="f16"))
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen(tmp_path, stories_tokenizer, arch):
    if arch == "qwen2":
        model = tiny_llama(cls=Qwen2ForCausalLM, config_cls=Qwen2Config)  # q/k/v biases
    else:
        model = tiny_llama(cls=Qwen3ForCausalLM, config_cls=Qwen3Config)  # q/k norms
    rtn(model)
    fields, tensors = read(to_gguf(model, stories_tokenizer, tmp_path / "q.gguf"))
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.attention.head_count_kv"] == 2 and fields["tokenizer.ggml.model"] == "llama"
    assert_mxfp4_weights_equal(model, tensors, permute=False)  # llama.cpp's qwen2/qwen3 use NEOX rope: no permutation
    attn = model.model.layers[1].self_attn
    if arch == "qwen2":
        for proj in ("q", "k", "v"):
            t = tensors[f"blk.1.attn_{proj}.bias"]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(decoded(t), getattr(attn, f"{proj}_proj").bias.detach())
    else:
        assert torch.equal(decoded(tensors["blk.1.attn_q_norm.weight"]), attn.q_norm.weight.detach())
        assert torch.equal(decoded(tensors["blk.1.attn_k_norm.weight"]), attn.k_norm.weight.detach())


def test_gpt2_bpe_tokenizer(tmp_path, smollm2_tokenizer, monkeypatch):
    model = rtn(tiny_llama(vocab=49152))
    fields, _ = read(to_gguf(model, smollm2_tokenizer, tmp_path / "bpe.gguf"))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert len(fields["tokenizer.ggml.tokens"]) == 49152 and len(fields["tokenizer.ggml.merges"]) > 0
    assert fields["tokenizer.ggml.add_bos_token"] is False  # llama.cpp's rule for 49152-token vocabularies
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    # a pre-tokenizer llama.cpp does not know is refused (its converter refuses it too), nothing written
    monkeypatch.setattr("torchao_mx_ext.export.gguf._BPE_PRE_BY_HASH", {})
    refuse(tmp_path, model, smollm2_tokenizer, "does not know this tokenizer's BPE pre-tokenizer")


def test_rotation_fused_offline_exports(tmp_path, stories_tokenizer):
    """R1/R2 fused into plain weights (QuaRot's structure without its online R4): nothing online, so it exports."""
    from torchao_mx_ext.rotation.fusion import block_diagonal, fuse_rotations, head_dim_of

    model = tiny_llama()
    fuse_rotations(model, block_diagonal("hadamard", 64, 32, 0), block_diagonal("hadamard", head_dim_of(model), 32, 1))
    quantize_linears(model, MXFP4Config(act_quant=False))
    _, tensors = read(to_gguf(model, stories_tokenizer, tmp_path / "fused.gguf"))
    assert_mxfp4_weights_equal(model, tensors)
    # fusion unties the embeddings: the rotated head is written (in float, it is not quantized)
    assert torch.equal(decoded(tensors["output.weight"]), model.lm_head.weight.detach())
    assert torch.equal(decoded(tensors["token_embd.weight"]), model.model.embed_tokens.weight.detach())


def test_shared_input_mode_exports_the_per_linear_weights(tmp_path, stories_tokenizer):
    model = rtn(tiny_llama())
    plain = to_gguf(model, stories_tokenizer, tmp_path / "plain" / "m.gguf").read_bytes()
    share_input_quantization(model)
    assert to_gguf(model, stories_tokenizer, tmp_path / "shared" / "m.gguf").read_bytes() == plain
    # a rotated model stays refused in shared mode (its members' weights there carry no rotation)
    rotated = tiny_llama()
    quantize_linears(rotated, MXFP4BlockRotConfig(act_quant=False))
    share_input_quantization(rotated)
    with pytest.raises(GGUFExportError, match="rotate their input online"):
        to_gguf(rotated, stories_tokenizer, tmp_path / "rotated.gguf")


def test_w4a4_model_exports_its_weights_with_a_warning(tmp_path, stories_tokenizer):
    model = rtn(tiny_llama(), weight_only=False)
    with pytest.warns(UserWarning, match="W4A4"):
        _, tensors = read(to_gguf(model, stories_tokenizer, tmp_path / "w4a4.gguf"))
    assert_mxfp4_weights_equal(model, tensors)


# ---------------------------------------------------------------------------------------------------
# refusals: clear errors, nothing written


def refuse(tmp_path, model, tokenizer, match, exc=GGUFExportError, **kw):
    out = tmp_path / "refused" / "m.gguf"
    with pytest.raises(exc, match=match):
        to_gguf(model, tokenizer, out, **kw)
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("method", ["block-rot", "global-rot", "quarot", "brq"])
def test_online_rotations_are_refused_naming_the_methods_that_export(tmp_path, stories_tokenizer, method):
    model = tiny_llama()
    METHODS[method].apply(model, QuantSettings(RULE, None, True, 0, None))
    with pytest.raises(GGUFExportError) as info:
        to_gguf(model, stories_tokenizer, tmp_path / "m.gguf")
    message = str(info.value)
    assert "rotate their input online" in message and "rtn, gptq" in message and "down_proj" in message
    if method in ("quarot", "brq"):  # R1/R2 fused, R4 online on down_proj only
        assert "q_proj" not in message
    assert not any(tmp_path.iterdir())


def test_fp_quant_block_size_and_widths_are_refused(tmp_path, stories_tokenizer):
    refuse(tmp_path, rtn(tiny_llama(), scale_rule="fp_quant"), stories_tokenizer, "fp_quant scales, whose 4/3")
    model = tiny_llama()
    quantize_linears(model, MXFP4Config(act_quant=False, block_size=64))
    refuse(tmp_path, model, stories_tokenizer, "blocks are 32 wide; block size of model.layers.0")


def test_stories260k_mlp_width_is_refused(tmp_path):
    model, tokenizer = load_model("stories260k")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our padding warning
        rtn(model, scale_rule="fp_quant")
    with pytest.raises(GGUFExportError) as info:
        to_gguf(model, tokenizer, tmp_path / "s.gguf")
    message = str(info.value)
    # every problem in one message, before anything is written
    assert "model.layers.0.mlp.down_proj.weight (172, stored zero-padded to 192)" in message
    assert "not a multiple of 32" in message and "fp_quant" in message
    assert not any(tmp_path.iterdir())


def test_other_architectures_and_bad_arguments_are_refused(tmp_path, stories_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=1, n_head=2, n_positions=64)).eval()
    refuse(tmp_path, gpt2, stories_tokenizer, "architecture GPT2LMHeadModel is not supported.*LlamaForCausalLM as llama.cpp 'llama'")
    model = rtn(tiny_llama())
    refuse(tmp_path, model, None, "needs the model's Hugging Face tokenizer", exc=ValueError)
    refuse(tmp_path, model, stories_tokenizer, "outtype must be one of f32, f16, bf16", exc=ValueError, outtype="q8_0")
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        to_gguf(model, stories_tokenizer, existing)
    with pytest.raises(IsADirectoryError):
        to_gguf(model, stories_tokenizer, tmp_path)
    assert existing.read_bytes() == b"old"


# ---------------------------------------------------------------------------------------------------
# atomic write


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing(tmp_path, stories_tokenizer, monkeypatch, error):
    model = rtn(tiny_llama())
    old = tmp_path / "old.gguf"
    old.write_bytes(b"old model")

    def fail(self, *, progress=False):
        self.fout[0].write(b"partial tensor data")
        raise error("interrupted")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(error, match="interrupted"):
        to_gguf(model, stories_tokenizer, tmp_path / "new.gguf")
    with pytest.raises(error, match="interrupted"):
        to_gguf(model, stories_tokenizer, old, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["old.gguf"] and old.read_bytes() == b"old model"
    monkeypatch.undo()
    to_gguf(model, stories_tokenizer, old, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["old.gguf"] and read(old)[0]["general.architecture"] == "llama"


def test_temporaries_of_killed_writes_are_removed(tmp_path, stories_tokenizer):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.gguf.{dead.pid}.abc123.gguf-tmp"
    stale.write_bytes(b"partial")
    live = tmp_path / f".m.gguf.{os.getpid()}.abc123.gguf-tmp"  # ours, e.g. another thread's write
    live.write_bytes(b"partial")
    to_gguf(rtn(tiny_llama()), stories_tokenizer, tmp_path / "m.gguf")
    assert sorted(os.listdir(tmp_path)) == sorted(["m.gguf", live.name])


# ---------------------------------------------------------------------------------------------------
# llama.cpp's converter as the reference (where its sources are present)


def convert_with_llama_cpp(folder: Path, out: Path) -> None:
    script = LLAMA_CPP_SRC / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip(f"no llama.cpp sources in {LLAMA_CPP_SRC} (bash scripts/build_llama_cpp.sh unpacks them)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), "--outtype", "f32", "--outfile", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("arch,tokenizer", [("llama", "stories"), ("qwen2", "stories"), ("llama", "smollm2")])
def test_same_file_as_llama_cpp_converter(tmp_path, arch, tokenizer, request):
    """The converter writes the unquantized model (float32); ours must have the same metadata (naming and
    the MXFP4 entries aside), the same other tensors, and MXFP4 tensors that decode to the MXFP4
    quantization of the converter's float32 tensors (which pins names, shapes and the q/k permutation)."""
    tokenizer = request.getfixturevalue(f"{tokenizer}_tokenizer")
    vocab = len(tokenizer.get_vocab())
    if arch == "llama":
        model = tiny_llama(vocab=vocab)
    else:
        model = tiny_llama(vocab=vocab, cls=Qwen2ForCausalLM, config_cls=Qwen2Config)
    # the model folder llama.cpp's converter reads: as saved by transformers, with the original
    # SentencePiece model where the tokenizer has one
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if (Path(tokenizer.name_or_path) / "tokenizer.model").is_file():
        shutil.copyfile(Path(tokenizer.name_or_path) / "tokenizer.model", folder / "tokenizer.model")
    convert_with_llama_cpp(folder, tmp_path / "ref.gguf")
    ref_fields, ref = read(tmp_path / "ref.gguf")
    ours_fields, ours = read(to_gguf(rtn(model), tokenizer, tmp_path / "tiny.gguf"))

    ours_only = {"general.tensor_extra.name", "general.tensor_extra.prec_a4"}
    assert set(ours_fields) - set(ref_fields) == ours_only and set(ref_fields) <= set(ours_fields)
    for key in ref_fields:
        if key != "general.file_type":
            assert ours_fields[key] == ref_fields[key], key
    assert ours_fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    assert set(ours) == set(ref)
    for name, r in ref.items():
        o = ours[name]
        assert list(o.shape) == list(r.shape), name
        if o.tensor_type == MXFP4:
            expected = mxfp4_fake_quantize(decoded(r), 32, RULE)
            assert torch.equal(bits(decoded(o)), bits(expected)), name
        else:
            assert o.tensor_type == r.tensor_type and np.array_equal(np.asarray(o.data), np.asarray(r.data)), name
    assert sum(t.tensor_type == MXFP4 for t in ours.values()) == 14


def test_llama_cpp_bench_skips_without_llama_cpp(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import llama_cpp_bench
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(llama_cpp_bench, "BIN", tmp_path / "no-bin")
    assert llama_cpp_bench.main(["--json", str(tmp_path / "r.json")]) is None
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "r.json").exists()
    with pytest.raises(SystemExit, match="unknown rows"):
        llama_cpp_bench.main(["--rows", "bf16,q2"])
