"""Faults around checkpoints: files of the user kept, interrupted and concurrent saves, a full disk,
tampered files, symlinks and ``.`` as targets. Killed saves run in subprocesses (SIGKILL leaves no
chance to clean up), so these tests check what a real interruption leaves behind."""

import os
import resource
import shutil
import signal
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
from torchao_mx_ext.hf import CheckpointError, save_pretrained
from torchao_mx_ext.hf.saving import clean_interrupted_saves

from checkpoint_checks import assert_same_weights

TOKENS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
REPO = Path(__file__).resolve().parents[2]


def quantized_llama(seed: int, tie: bool = False):
    """A random one-layer Llama (seeded), every linear but lm_head MXFP4 with block rotation."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    quantize_(model, tme.MXFP4BlockRotConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
    return model


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def hidden_entries(folder: Path):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def model_a():
    return quantized_llama(0)


@pytest.fixture(scope="module")
def model_b():
    return quantized_llama(1)


# -- files of the user, targets -------------------------------------------------------------------

def test_saving_over_a_folder_keeps_files_that_are_not_the_checkpoint(model_a, model_b, tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(model_a, target)
    (target / "NOTES.txt").write_text("notes")
    (target / "evals").mkdir()
    (target / "evals" / "wikitext.json").write_text("{}")
    os.symlink("NOTES.txt", target / "README.link")
    save_pretrained(model_b, target)
    assert (target / "NOTES.txt").read_text() == "notes"
    assert (target / "evals" / "wikitext.json").read_text() == "{}"
    assert os.readlink(target / "README.link") == "NOTES.txt"
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(target)), logits(model_b))
    assert hidden_entries(target) == []


def test_a_new_save_removes_the_shards_of_the_old_one(model_a, tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(model_a, target, max_shard_size="20KB")
    assert (target / "model.safetensors.index.json").exists()
    save_pretrained(model_a, target)
    assert sorted(p.name for p in target.glob("model*")) == ["model.safetensors"]
    assert_same_weights(AutoModelForCausalLM.from_pretrained(target), model_a)


def test_save_follows_a_symlink_and_keeps_it(model_a, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "NOTES.txt").write_text("notes")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    save_pretrained(model_a, link)
    assert link.is_symlink() and (real / "config.json").is_file() and (real / "NOTES.txt").exists()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(link)), logits(model_a))


def test_save_to_the_working_directory(model_a, model_b, tmp_path, monkeypatch):
    target = tmp_path / "here"
    save_pretrained(model_a, target)
    monkeypatch.chdir(target)
    save_pretrained(model_b, ".")
    assert Path.cwd() == target and Path("config.json").is_file()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(".")), logits(model_b))
    assert hidden_entries(target) == []


def test_save_refuses_a_file_as_target(model_a, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_pretrained(model_a, tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


# -- interruptions (subprocesses killed with SIGKILL), concurrency, full disk ---------------------

SAVE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from hf.test_save_faults import quantized_llama
    from torchao_mx_ext import atomic
    from torchao_mx_ext.hf import save_pretrained
    target, seed, fault = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if fault == "kill-while-writing":
        import transformers.modeling_utils as mu
        def write_then_die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        mu.safe_save_file = write_then_die
    elif fault == "kill-between-renames":
        atomic._exchange = lambda a, b: False  # a system without renameat2: two renames
        replace = os.replace
        def replace_then_die(src, dst):
            replace(src, dst)
            if ".old-" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        atomic.os.replace = replace_then_die
    elif fault == "file-size-limit":
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write raises EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        save_pretrained(quantized_llama(seed), target)
    except Exception as e:  # safetensors wraps the OSError in its own error type
        print("FAILED", type(e).__name__, e)
        sys.exit(3)
    print("saved")
""")


def run_save(target: Path, seed: int, fault: str = "none", wait: bool = True):
    script = SAVE_SCRIPT.format(tests=str(REPO / "tests"))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(target), str(seed), fault],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_kill_while_writing_keeps_the_old_checkpoint_and_next_save_cleans_up(model_a, model_b, tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(model_a, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    rc, _, err = run_save(target, 1, "kill-while-writing")
    assert rc == -signal.SIGKILL, err[-2000:]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert len(hidden_entries(target)) == 1  # the killed save's temporary folder
    save_pretrained(model_b, target)
    assert hidden_entries(target) == []
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(target)), logits(model_b))


def test_kill_between_the_two_renames_is_repaired(model_a, tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(model_a, target)
    rc, _, err = run_save(target, 1, "kill-between-renames")
    assert rc == -signal.SIGKILL, err[-2000:]
    assert not target.exists() and any(".old-" in n for n in hidden_entries(target))
    clean_interrupted_saves(target)  # what the next save to this target does first
    assert hidden_entries(target) == []
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(target)), logits(model_a))


def test_full_disk_fails_cleanly_and_keeps_the_old_checkpoint(model_a, tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained(model_a, target)
    rc, out, err = run_save(target, 1, "file-size-limit")
    assert rc == 3 and "File too large" in out, (out, err[-2000:])  # EFBIG, as ENOSPC would be
    assert hidden_entries(target) == []
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(target)), logits(model_a))


def test_concurrent_saves_to_one_folder_leave_one_complete_checkpoint(model_a, tmp_path):
    target = tmp_path / "ckpt"
    procs = [run_save(target, seed, wait=False) for seed in (0, 1)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    loaded = AutoModelForCausalLM.from_pretrained(target)
    candidates = [logits(quantized_llama(seed)) for seed in (0, 1)]
    assert any(torch.equal(logits(loaded), c) for c in candidates)
    assert hidden_entries(target) == []


# -- tampered files -------------------------------------------------------------------------------

def _drop_tensor(folder: Path, name: str) -> None:
    path = folder / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != name}
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("name", ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"])
def test_a_deleted_plain_tensor_is_refused(model_a, tmp_path, name):
    save_pretrained(model_a, tmp_path / "ckpt")
    _drop_tensor(tmp_path / "ckpt", name)
    with pytest.raises(CheckpointError, match=f"{name}.*missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_a_tied_weight_may_be_absent(tmp_path):
    model = quantized_llama(0, tie=True)
    save_pretrained(model, tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers writes one of the tied pair
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")), logits(model))


def test_load_report_without_our_package_names_the_import(model_a, tmp_path):
    save_pretrained(model_a, tmp_path / "ckpt")
    code = f"from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert run.returncode != 0
    assert "import_torchao_mx_ext_before_from_pretrained" in run.stdout + run.stderr
