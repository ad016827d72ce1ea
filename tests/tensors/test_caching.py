"""The subclasses' cache hash: stable for equal metadata, and changed by any edit of the package source
(AOTAutograd's on-disk cache must not hand back a graph that our older dispatch code traced)."""

import torch
from torchao.quantization import quantize_

from torchao_mx_ext import MXFP4BlockRotConfig, MXFP4Config
from torchao_mx_ext.tensors import caching


def weight(config):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    quantize_(lin, config)
    return lin.weight


def test_hash_follows_metadata_and_source(monkeypatch):
    a, b = weight(MXFP4BlockRotConfig()), weight(MXFP4BlockRotConfig())
    assert a._stable_hash_for_caching() == b._stable_hash_for_caching()
    assert a._stable_hash_for_caching() != weight(MXFP4Config(scale_rule="even"))._stable_hash_for_caching()
    assert a._stable_hash_for_caching() != a.with_dequantized_cache()._stable_hash_for_caching()
    before = a._stable_hash_for_caching()
    monkeypatch.setattr(caching, "package_source_digest", lambda: "an edited package")
    assert a._stable_hash_for_caching() != before


def test_source_digest_covers_the_package_files(tmp_path, monkeypatch):
    (tmp_path / "mod.py").write_text("x = 1\n")
    (tmp_path / "kernel.cpp").write_text("int f();\n")
    monkeypatch.setattr(caching, "_PACKAGE", tmp_path)
    caching.package_source_digest.cache_clear()
    try:
        first = caching.package_source_digest()
        caching.package_source_digest.cache_clear()
        (tmp_path / "kernel.cpp").write_text("int g();\n")
        assert caching.package_source_digest() != first
    finally:
        caching.package_source_digest.cache_clear()
