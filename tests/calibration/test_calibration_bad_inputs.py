"""Bad input to the calibration entry points (calibration text, calibration ids, GPTQ and DartQuant
settings): refused up front, with the exact exception type and a message naming the argument, and the
model unchanged. And GPTQ's one silent cost made loud: input channels that saw no calibration signal
(zero Hessian diagonal) get zero weights, with a warning naming the layer and the count."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torchao.quantization import quantize_
from transformers import LlamaConfig, LlamaForCausalLM

from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config, RotatedMXFP4Tensor, configs
from torchao_mx_ext.calibration import MXFP4GPTQConfig, collect_activations, gptq_mxfp4, learn_rotations
from torchao_mx_ext.calibration.data import CalibrationIdsTypeError, calibration_ids
from torchao_mx_ext.calibration.gptq import OBSERVER_ATTR
from torchao_mx_ext.calibration.sequential import capture_first_layer_inputs, sequential_gptq
from torchao_mx_ext.mx import mxfp4_dequantize

from model_state import assert_unchanged, fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 128
GPTQ_LOGGER = "torchao_mx_ext.calibration.gptq"


def tiny_llama(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------------
# calibration text


class CharTokenizer:
    """One token per character (enough to count windows exactly)."""

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % VOCAB for c in text]]))


def test_empty_calibration_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError) as info:  # a ValueError naming the file, not datasets' DatasetGenerationError
        calibration_ids(CharTokenizer(), empty, 2, 8)
    assert type(info.value) is ValueError
    assert str(empty) in str(info.value) and "has no text" in str(info.value)

    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    with pytest.raises(ValueError, match="has no text") as info:
        calibration_ids(CharTokenizer(), blank, 2, 8)
    assert str(blank) in str(info.value)


def test_more_samples_than_the_text_holds_is_a_clear_error(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("abcdefghijklmnopqrstuvwxyz")  # 26 tokens: 26 - 8 = 18 distinct windows of 8
    assert calibration_ids(CharTokenizer(), text, 18, 8).shape == (18, 8)
    # overlapping windows that together hold more tokens than the text stay allowed (GPTQ's loaders)
    assert calibration_ids(CharTokenizer(), text, 5, 20).shape == (5, 20)  # 6 windows, 100 tokens
    with pytest.raises(ValueError, match=r"only 18 distinct calibration windows of 8 tokens, fewer than the 19") as info:
        calibration_ids(CharTokenizer(), text, 19, 8)
    assert str(text) in str(info.value)
    with pytest.raises(ValueError, match="too short for one calibration window of 26"):
        calibration_ids(CharTokenizer(), text, 1, 26)


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(n_samples=0), ValueError, "n_samples must be an integer >= 1"),
    (dict(n_samples=True), TypeError, "n_samples"),
    (dict(n_samples=2.0), TypeError, "n_samples"),
    (dict(seq_len=1), ValueError, "seq_len must be an integer >= 2"),
    (dict(seq_len=8.5), TypeError, "seq_len"),
    (dict(seed=None), TypeError, "seed"),
    (dict(max_positions=0), ValueError, "max_positions"),
])
def test_calibration_ids_refuse_bad_numbers(tmp_path, kwargs, exc, text):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz")
    args = dict(n_samples=2, seq_len=8) | kwargs
    with pytest.raises(exc, match=text) as info:
        calibration_ids(CharTokenizer(), path, **args)
    assert type(info.value) is exc


# ---------------------------------------------------------------------------------------------------
# calibration ids: sequential GPTQ (and the capture it starts with), DartQuant


BAD_IDS = [
    (torch.zeros(0, 8, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty"),
    (torch.randint(0, VOCAB, (8,)), ValueError, "shape [n, seq_len]"),
    (torch.randint(0, VOCAB, (2, 2, 8)), ValueError, "shape [n, seq_len]"),
    (torch.randint(0, VOCAB, (2, 8)).float(), CalibrationIdsTypeError, "dtype torch.float32"),
    (torch.full((2, 8), VOCAB), ValueError, f"outside the vocabulary [0, {VOCAB})"),
    (torch.full((2, 8), -3), ValueError, "outside the vocabulary"),
    ([torch.randint(0, VOCAB, (8,))] * 2, CalibrationIdsTypeError, "got list"),
]
BAD_IDS_IDS = ["empty-rows", "empty-cols", "1d", "3d", "float", "vocab", "negative", "list"]


@pytest.mark.parametrize("ids, exc, text", BAD_IDS, ids=BAD_IDS_IDS)
def test_sequential_gptq_refuses_bad_ids_before_changing_the_model(ids, exc, text):
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(exc) as info:
        sequential_gptq(model, ids, lambda name: MXFP4Config(), progress=False)
    assert type(info.value) is exc and text in str(info.value) and "sequential_gptq" in str(info.value)
    assert isinstance(info.value, ValueError)  # float ids too: a ValueError (and a TypeError)
    assert_unchanged(model, before)


@pytest.mark.parametrize("ids, exc, text", BAD_IDS, ids=BAD_IDS_IDS)
def test_capture_refuses_bad_ids(ids, exc, text):
    model = tiny_llama(layers=1)
    with pytest.raises(exc) as info:
        capture_first_layer_inputs(model, ids)
    assert type(info.value) is exc and text in str(info.value)


def test_sequential_gptq_refuses_bad_settings_before_changing_the_model():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 8))
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"MXFP4GPTQConfig\.damp must be a finite number \(>= 0\), got nan"):
        sequential_gptq(model, ids, lambda name: MXFP4Config(), progress=False, damp=math.nan)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match=r"MXFP4GPTQConfig\.act_order must be True or False"):
        sequential_gptq(model, ids, lambda name: MXFP4Config(), progress=False, act_order="yes")
    assert_unchanged(model, before)
    # a bad config for a linear of the last layer: refused before the first layer is touched
    with pytest.raises(TypeError, match="MXFP4GPTQConfig needs base="):
        sequential_gptq(model, ids, lambda name: "mxfp4" if name == "down_proj" else MXFP4Config(), progress=False)
    assert_unchanged(model, before)


def test_sequential_gptq_still_runs_on_int32_ids():
    model = tiny_llama(layers=1)
    sequential_gptq(model, torch.randint(0, VOCAB, (2, 16), dtype=torch.int32), lambda name: MXFP4Config(), progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj.weight, RotatedMXFP4Tensor)


def test_dartquant_float_ids_are_a_value_error_too():
    model = tiny_llama()
    with pytest.raises(ValueError, match="DartQuant: calib_ids must be an integer"):
        learn_rotations(model, torch.zeros(1, 16), epochs=0)
    with pytest.raises(TypeError, match="integer"):  # a TypeError too (CalibrationIdsTypeError is both)
        learn_rotations(model, torch.zeros(1, 16), epochs=0)


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(epochs=-1), ValueError, "epochs must be an integer >= 0"),
    (dict(epochs=1.5), TypeError, "epochs"),
    (dict(epochs=True), TypeError, "epochs"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(sample_fraction=0.0), ValueError, r"sample_fraction must be in (0, 1]"),
    (dict(sample_fraction=1.5), ValueError, "sample_fraction"),
    (dict(sample_fraction=math.nan), ValueError, "sample_fraction"),
    (dict(r1_lr=0.0), ValueError, "r1_lr must be > 0"),
    (dict(r2_lr=math.inf), ValueError, "r2_lr"),
    (dict(r1_lr=None), TypeError, "r1_lr"),
    (dict(momentum=1.0), ValueError, r"momentum must be in [0, 1)"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(block=True), TypeError, "block"),
    (dict(block=0), ValueError, "block"),
    (dict(r1_max_rows=0), ValueError, "r1_max_rows"),
    (dict(r2_max_tokens=2.5), TypeError, "r2_max_tokens"),
    (dict(forward_batch=0), ValueError, "forward_batch"),
    (dict(seed=0.5), TypeError, "seed"),
    (dict(dtype="float32"), TypeError, "dtype"),
])
def test_learn_rotations_refuses_bad_settings_before_any_forward(kwargs, exc, text):
    model = tiny_llama()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(exc) as info:
        learn_rotations(model, torch.randint(0, VOCAB, (2, 16)), **kwargs)
    assert type(info.value) is exc and text in str(info.value), str(info.value)
    assert calls == []


@pytest.mark.parametrize("kwargs, text", [
    (dict(r1_max_rows=0), "r1_max_rows"), (dict(forward_batch=-2), "forward_batch"), (dict(r2_max_tokens=True), "r2_max_tokens"),
])
def test_collect_activations_refuses_bad_settings(kwargs, text):
    with pytest.raises((TypeError, ValueError), match=text):
        collect_activations(tiny_llama(), torch.randint(0, VOCAB, (2, 16)), **kwargs)


# ---------------------------------------------------------------------------------------------------
# GPTQ settings


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(damp=math.nan), ValueError, "MXFP4GPTQConfig.damp must be a finite number (>= 0)"),
    (dict(damp=math.inf), ValueError, "MXFP4GPTQConfig.damp"),
    (dict(damp=-0.01), ValueError, "MXFP4GPTQConfig.damp must be >= 0"),
    (dict(damp=True), ValueError, "MXFP4GPTQConfig.damp"),
    (dict(damp=None), ValueError, "MXFP4GPTQConfig.damp"),
    (dict(column_block=True), ValueError, "MXFP4GPTQConfig.column_block must be a positive integer"),
    (dict(column_block=64.0), ValueError, "MXFP4GPTQConfig.column_block"),
    (dict(column_block=0), ValueError, "MXFP4GPTQConfig.column_block"),
    (dict(act_order="yes"), TypeError, "MXFP4GPTQConfig.act_order must be True or False"),
    (dict(act_order=1), TypeError, "MXFP4GPTQConfig.act_order"),
    (dict(mse_shrink=None), TypeError, "MXFP4GPTQConfig.mse_shrink"),
])
def test_gptq_config_refuses_bad_values(kwargs, exc, text):
    with pytest.raises(exc) as info:
        MXFP4GPTQConfig(base=MXFP4Config(), **kwargs)
    assert type(info.value) is exc and text in str(info.value)


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(block_size=True), ValueError, "block_size"),
    (dict(column_block=True), ValueError, "column_block"),
    (dict(damp=math.nan), ValueError, "damp"),
    (dict(damp=False), ValueError, "damp"),
    (dict(act_order=0), TypeError, "act_order"),
    (dict(mse_shrink="no"), TypeError, "mse_shrink"),
])
def test_gptq_function_refuses_bad_settings(kwargs, exc, text):
    with pytest.raises(exc) as info:
        gptq_mxfp4(torch.randn(8, 64), torch.eye(64), **kwargs)
    assert type(info.value) is exc and text in str(info.value)


# ---------------------------------------------------------------------------------------------------
# dead input channels: zero weights, and a warning


DEAD = [3, 10, 50]


def _inputs_with_dead_channels(rows=256, width=64, dead=DEAD, seed=0):
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    x[:, dead] = 0.0
    return x


def _dead_warnings(caplog):
    return [r for r in caplog.records if r.name == GPTQ_LOGGER and r.levelno == logging.WARNING
            and "saw no calibration signal" in r.getMessage()]


def test_gptq_function_warns_about_dead_channels_it_zeroes(caplog):
    w = torch.randn(8, 64)
    x = _inputs_with_dead_channels()
    h = 2.0 / x.shape[0] * x.double().T @ x.double()
    with caplog.at_level(logging.WARNING, logger=GPTQ_LOGGER):
        qdata, scale = gptq_mxfp4(w, h, name="probe")
    (record,) = _dead_warnings(caplog)
    assert "probe: 3 of 64 input channels" in record.getMessage()
    values = mxfp4_dequantize(qdata, scale, 32, "floor")
    assert torch.all(values[:, DEAD] == 0) and torch.all(w[:, DEAD] != 0)  # what the warning is about

    caplog.clear()
    w[:, DEAD] = 0.0  # dead channels with zero weights lose nothing: no warning
    with caplog.at_level(logging.WARNING, logger=GPTQ_LOGGER):
        gptq_mxfp4(w, h)
    assert _dead_warnings(caplog) == []


def _gptq_linear(model, batches, base):
    quantize_(model, MXFP4GPTQConfig(base=base, step="prepare"))
    with torch.no_grad():
        for b in batches:
            model(b)
    quantize_(model, MXFP4GPTQConfig(base=base, step="convert"))


def test_quantize_flow_warns_once_per_layer_with_dead_channels(caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 32)).eval()
    batches = list(_inputs_with_dead_channels().reshape(4, 64, 64))
    with caplog.at_level(logging.WARNING, logger=GPTQ_LOGGER):
        _gptq_linear(model, batches, MXFP4Config(act_quant=False))
    records = _dead_warnings(caplog)
    messages = [r.getMessage() for r in records]
    assert len(records) == 1, messages  # model[0]; model[2]'s 16-wide input (padded to 32) is alive
    assert "Linear(weight (16, 64)): 3 of 64 input channels" in messages[0]
    assert isinstance(model[0].weight, RotatedMXFP4Tensor)
    assert torch.all(model[0].weight.dequantize()[:, DEAD] == 0)


def test_quantize_flow_is_silent_without_dead_channels(caplog):
    configs.reset_padding_reports()  # report_padding warns once per width and process
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(80, 16)).eval()  # padded 80 -> 96: zero columns, zero weights
    with caplog.at_level(logging.WARNING, logger=GPTQ_LOGGER):
        _gptq_linear(model, [torch.randn(128, 80)], MXFP4Config(act_quant=False))
    assert _dead_warnings(caplog) == []
    assert "padding" in caplog.text  # the padding itself is reported (configs.report_padding)


def test_block_rotation_spreads_single_dead_channels_but_not_a_dead_block(caplog):
    """Rotated: the Hessian is of x R; a single zero input channel is mixed into live rotated ones,
    a whole dead 32-block stays dead (32 zeroed rotated channels)."""
    torch.manual_seed(0)
    base = MXFP4BlockRotConfig(act_quant=False)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16)).eval()
    with caplog.at_level(logging.WARNING, logger=GPTQ_LOGGER):
        _gptq_linear(model, [_inputs_with_dead_channels()], base)
    assert _dead_warnings(caplog) == []
    model = torch.nn.Sequential(torch.nn.Linear(64, 16)).eval()
    with caplog.at_level(logging.WARNING, logger=GPTQ_LOGGER):
        _gptq_linear(model, [_inputs_with_dead_channels(dead=list(range(32, 64)))], base)
    (record,) = _dead_warnings(caplog)
    assert "32 of 64 input channels" in record.getMessage()


def test_sequential_gptq_names_the_layers_with_dead_channels(caplog):
    model = tiny_llama()
    with torch.no_grad():  # layer 1's attention input is zero on 4 channels for every token
        model.model.layers[1].input_layernorm.weight[[0, 7, 8, 40]] = 0.0
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger=GPTQ_LOGGER):
        sequential_gptq(model, ids, lambda name: MXFP4Config(act_quant=False), progress=False)
    messages = sorted(r.getMessage() for r in _dead_warnings(caplog))
    assert len(messages) == 3, messages  # one per layer: q, k, v of layer 1
    for message, proj in zip(messages, ("k_proj", "q_proj", "v_proj")):
        assert f"model.layers.1.self_attn.{proj}: 4 of 64 input channels" in message
