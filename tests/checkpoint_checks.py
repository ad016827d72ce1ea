"""Checks shared by the checkpoint tests (dense and MoE): weights equal field by field."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors import safe_open

import torchao_mx_ext as tme


def quantized_params(model):
    return {n: p for n, p in model.named_parameters() if isinstance(p, tme.RotatedMXFP4Tensor)}


def assert_same_weights(a, b):
    """Same parameter names, same plain tensors, same codes/scales/rotation/metadata for quantized ones."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name, x in sa.items():
        y = sb[name]
        assert type(x) is type(y), name
        if isinstance(x, tme.RotatedMXFP4Tensor):
            assert torch.equal(x.qdata, y.qdata) and torch.equal(x.scale, y.scale), name
            assert (x.rotation is None) == (y.rotation is None), name
            assert x.rotation is None or torch.equal(x.rotation, y.rotation), name
            assert (x.block_size, x.scale_rule, x.act_scale_rule, x.in_features, x.dtype, x.shape) == (
                y.block_size, y.scale_rule, y.act_scale_rule, y.in_features, y.dtype, y.shape
            ), name
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name


def load_without_our_package(folder):
    """``from_pretrained(folder)`` in a fresh interpreter that never imports torchao_mx_ext (no
    PYTHONPATH, cwd /); asserts the package stayed unimported and returns the finished process."""
    code = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r})
        except Exception as e:
            print("RAISED", type(e).__name__)
        else:
            print("LOADED")
        print("IMPORTED", any(m.startswith("torchao_mx_ext") for m in sys.modules))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "IMPORTED False" in run.stdout
    return run


def file_tensors(folder):
    """{name: tensor} and the metadata of every safetensors file in a folder."""
    tensors, metas = {}, []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            metas.append(h.metadata())
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    return tensors, metas
