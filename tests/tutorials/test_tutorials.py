"""Every tutorial runs end to end in its fast mode, and what it prints and writes is right.

Each tutorial runs as a script (``--fast --out``), as a reader would run it; its printed lines are parsed
and checked against what they claim, and against independent references where they are numbers:
perplexities recomputed in float64 from the model (and from the checkpoint the tutorial wrote), stored
weights against the float64 reference quantizer (``reference.py``), the rotation mechanism numbers of
tutorial 2 against a float64 recomputation on the same activation.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reference import ref_fake_quantize, ref_hadamard, ref_quantize

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted(p.name for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
CHECKED = ("01_quickstart.py", "02_block_vs_global_rotation.py", "03_moe_router_passes.py", "04_fast_inference.py")
NUM = r"([-+0-9.eE]+|nan|inf)"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def run_tutorial(name: str, out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tutorials" / name), "--fast", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1] == f"wrote {out}", proc.stdout
    return proc.stdout


def grab(pattern: str, text: str) -> tuple:
    """The groups of the one line of ``text`` that matches ``pattern`` (floats where they parse)."""
    found = re.findall(pattern, text, flags=re.MULTILINE)
    assert len(found) == 1, f"expected one line matching {pattern!r} in:\n{text}"
    groups = found[0] if isinstance(found[0], tuple) else (found[0],)
    out = []
    for g in groups:
        try:
            out.append(float(g))
        except ValueError:
            out.append(g)
    return tuple(out)


@pytest.fixture(scope="module")
def stories():
    from torchao_mx_ext.zoo import load_model

    return load_model


@pytest.fixture(scope="module")
def wikitext_test_ids(stories):
    from torchao_mx_ext.eval import tokenize_for_perplexity, wikitext2_test_text
    from torchao_mx_ext.zoo import data_dir

    _, tok = stories("stories260k")
    return tokenize_for_perplexity(tok, wikitext2_test_text(data_dir()))


@torch.no_grad()
def ref_perplexity(model, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    """exp of the mean over non-overlapping windows of the mean next-token NLL, in float64."""
    nlls = []
    for i in range(windows):
        window = ids[:, i * seq_len:(i + 1) * seq_len]
        logp = model(window).logits[0, :-1].double().log_softmax(-1)
        nlls.append(-logp.gather(1, window[0, 1:, None]).mean().item())
    return math.exp(sum(nlls) / len(nlls))


def load_checkpoint(path: Path, dtype=None):
    import torchao_mx_ext  # noqa: F401 (registers the checkpoint's quantization method)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **({} if dtype is None else {"dtype": dtype})).eval()


def assert_reference_block_rot_weights(quantized, fp) -> None:
    """Every decoder linear of ``quantized`` stores ``ref Q_mse(fl32(W_pad H))`` of ``fp``'s weight (``H`` the
    32-wide block Sylvester Hadamard, the default ``MXFP4BlockRotConfig()``); the output head is untouched."""
    from torchao_mx_ext import MXFP4BlockRotConfig, RotatedMXFP4Tensor

    config = MXFP4BlockRotConfig()
    assert (config.scale_rule, config.rotation, config.rotation_size) == ("mse", "hadamard", 32)
    for i in range(fp.config.num_hidden_layers):
        for name in LINEARS:
            fqn = f"model.layers.{i}.{name}"
            w, w_fp = quantized.get_submodule(fqn).weight, fp.get_submodule(fqn).weight.detach()
            assert isinstance(w, RotatedMXFP4Tensor) and w.dtype == w_fp.dtype, fqn
            assert (w.scale_rule, w.act_scale_rule) == ("mse", "mse"), fqn
            torch.testing.assert_close(w.rotation.double(), ref_hadamard(32), rtol=0, atol=1e-7)
            padded = F.pad(w_fp.double(), (0, w.padded_in_features - w_fp.shape[1]))
            rotated = padded @ torch.block_diag(*[w.rotation.double()] * (padded.shape[1] // 32))
            assert torch.equal(w.dequantize(torch.float32), ref_fake_quantize(rotated.float(), "mse").float()), fqn
    assert not isinstance(quantized.lm_head.weight, RotatedMXFP4Tensor)
    assert torch.equal(quantized.lm_head.weight, fp.lm_head.weight)


def test_every_tutorial_is_checked():
    assert TUTORIALS == sorted(CHECKED)


def test_quickstart(tmp_path, stories, wikitext_test_ids):
    out = tmp_path / "quickstart"
    text = run_tutorial("01_quickstart.py", out)
    fp, _ = stories("stories260k")
    cfg = fp.config
    # the stored layout of up_proj: [intermediate, hidden] as two codes per byte, one scale per 32, 32x32 block
    codes, scales, block = grab(r"^up_proj weight: RotatedMXFP4Tensor, codes \((.*)\) uint8, scales \((.*)\) uint8, "
                                r"rotation block \((.*)\)$", text)
    assert (codes, scales, block) == (f"{cfg.intermediate_size}, {cfg.hidden_size // 2}",
                                      f"{cfg.intermediate_size}, {cfg.hidden_size // 32}", "32, 32")
    fp_ppl, q_ppl = grab(rf"^WikiText-2 perplexity \(1 x 256 tokens\): fp {NUM} -> W4A4 MXFP4 block-rot {NUM}$", text)
    # fp perplexity recomputed in float64; the quantized one from the checkpoint the tutorial saved
    assert fp_ppl == pytest.approx(ref_perplexity(fp, wikitext_test_ids, 256, 1), abs=0.006, rel=1e-5)
    reloaded = load_checkpoint(out)
    assert q_ppl == pytest.approx(ref_perplexity(reloaded, wikitext_test_ids, 256, 1), abs=0.006, rel=1e-5)
    assert q_ppl != pytest.approx(fp_ppl, abs=0.01)  # the checkpoint is not the fp model
    assert_reference_block_rot_weights(reloaded, fp)
    # float32: compiled equals eager up to float32 rounding (README)
    (diff,) = grab(rf"^compiled one MLP block in \d+ s; max \|compiled - eager\| = {NUM}$", text)
    assert 0 <= diff <= 1e-5
    mb, same = grab(rf"^saved {NUM} MB of safetensors; reloaded logits identical: (\w+)$", text)
    assert same == "True"
    assert mb == pytest.approx(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20, abs=0.051)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao_mx_ext"


def test_block_vs_global_rotation(tmp_path, stories):
    """The printed numbers are those of the mechanism the tutorial explains, recomputed in float64 from
    the same activation; the figure is a PNG of the stated size with something drawn on it."""
    out = tmp_path / "mechanism.png"
    text = run_tutorial("02_block_vs_global_rotation.py", out)
    tokens, width, regular_pct = grab(
        rf"^stories260k, layer 2 mlp\.down_proj: {NUM} tokens x {NUM} channels, {NUM}% regular MX blocks$", text)
    assert (tokens, width) == (64, 160)  # one 64-token sample; 172 channels cut to whole MX blocks
    rows = {}
    for name in ("global", "block"):
        rows[name] = dict(zip(("up", "down", "regular", "outlier", "overall"), grab(
            rf"^\s*{name} rotation: exponent up in {NUM}% / down in {NUM}% of regular blocks; error x{NUM} on regular, "
            rf"x{NUM} on outlier blocks, x{NUM} overall$", text)))
    # the claim: a global rotation raises regular blocks' exponents, a block rotation hardly ever does,
    # so the block rotation has the lower error on regular blocks
    assert rows["block"]["regular"] < rows["global"]["regular"]
    assert rows["block"]["up"] < rows["global"]["up"]

    # float64 recomputation on the same activation (the input of layer 2's down_proj, same text)
    from torchao_mx_ext.calibration.data import calibration_ids
    from torchao_mx_ext.eval.rotation_analysis import standard_rotations

    model, tok = stories("stories260k")
    ids = calibration_ids(tok, "wikitext2", 1, 64, seed=0, max_positions=model.config.max_position_embeddings)
    got = []
    hook = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    hook.remove()
    x = torch.cat(got).reshape(-1, 172)[:, :160].double()
    assert x.shape == (64, 160)

    def blocks_stats(v):
        _, e, deq = ref_quantize(v.float(), "floor")
        b = v.reshape(64, 5, 32)
        return e, (deq.reshape(64, 5, 32) - v.float().double().reshape(64, 5, 32)).square().sum(-1), b

    e0, err0, b0 = blocks_stats(x)
    regular = b0.abs().amax(-1) <= 4 * b0.square().mean(-1).sqrt()
    assert abs(100 * regular.double().mean().item() - regular_pct) <= 1
    global_r = standard_rotations(160)["global"].double()
    torch.testing.assert_close(global_r @ global_r.T, torch.eye(160, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(global_r.abs(), torch.full_like(global_r, 160**-0.5), rtol=0, atol=1e-7)
    for name, r in (("block", torch.block_diag(*[ref_hadamard(32)] * 5)), ("global", global_r)):
        e, err, _ = blocks_stats(x @ r)
        assert abs(100 * (e > e0)[regular].double().mean().item() - rows[name]["up"]) <= 1, name
        assert abs(100 * (e < e0)[regular].double().mean().item() - rows[name]["down"]) <= 1, name
        assert err[regular].sum() / err0[regular].sum() == pytest.approx(rows[name]["regular"], abs=0.006), name
        assert err[~regular].sum() / err0[~regular].sum() == pytest.approx(rows[name]["outlier"], abs=0.006), name
        assert err.sum() / err0.sum() == pytest.approx(rows[name]["overall"], abs=0.006), name

    import matplotlib.image

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (462, 1210)  # 11 x 4.2 inches at 110 dpi
    assert image[..., :3].std() > 0.05  # bars and histograms, not a blank canvas


def test_moe_router_passes(tmp_path, wikitext_test_ids):
    out = tmp_path / "moe"
    text = run_tutorial("03_moe_router_passes.py", out)
    assert grab(r"^(\w+): 4 experts per layer, top-2$", text) == ("Qwen2MoeForCausalLM",)
    report = {name: grab(rf"^{re.escape(name)}\s+ppl\s+{NUM}\s+experts per token\s+{NUM}$", text)
              for name in ("baseline", "PESF alpha 0.3", "Ban&Pick (calibrated)", "MXFP4", "MXFP4 + QESC")}
    assert all(math.isfinite(ppl) and ppl > 1 for ppl, _ in report.values())
    assert report["baseline"][1] == 2.0  # no pass: every token uses its top-2
    assert report["MXFP4"][1] == report["MXFP4 + QESC"][1] == 2.0  # quantization keeps two experts a token
    assert report["PESF alpha 0.3"][1] <= 2.0 and report["Ban&Pick (calibrated)"][1] <= 2.0  # passes only prune
    assert grab(r"^passes removed, logits identical to the original: (\w+)$", text) == ("True",)
    agreements = [float(a) for a in re.findall(rf"^\s+top-k agreement with the fp routers {NUM}$", text, re.MULTILINE)]
    assert len(agreements) == 2 and all(0.5 < a <= 1 for a in agreements)
    (diff,) = grab(rf"^compiled a MoE block \(PESF router \+ MXFP4 experts\): max \|compiled - eager\| = {NUM}$", text)
    assert 0 <= diff <= 1e-4
    experts_class, same = grab(r"^reloaded the MXFP4 MoE \(experts (\w+)\): logits identical: (\w+)$", text)
    assert same == "True"

    # the checkpoint holds the model measured last: MXFP4 experts and linears, same perplexity
    from torchao_mx_ext import RotatedMXFP4Tensor

    reloaded = load_checkpoint(out)
    assert (reloaded.config.num_experts, reloaded.config.num_experts_per_tok) == (4, 2)
    moe_layers = [layer.mlp for layer in reloaded.model.layers if hasattr(layer.mlp, "experts")]
    assert moe_layers and all(type(m.experts).__name__ == experts_class for m in moe_layers)
    assert all(isinstance(m.experts.down_proj, RotatedMXFP4Tensor) for m in moe_layers)
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj.weight, RotatedMXFP4Tensor)
    assert not isinstance(reloaded.lm_head.weight, RotatedMXFP4Tensor)
    assert report["MXFP4 + QESC"][0] == pytest.approx(ref_perplexity(reloaded, wikitext_test_ids, 256, 2), abs=6e-4, rel=1e-5)


def test_fast_inference(tmp_path, stories):
    out = tmp_path / "fast"
    text = run_tutorial("04_fast_inference.py", out)
    bf16_prefill, bf16_decode = grab(rf"^bf16 eager:\s+prefill\s+{NUM} tokens/s, decode\s+{NUM} tokens/s$", text)
    (groups,) = grab(r"^MXFP4 W4A4 compiled \((\d+) shared input groups; built and compiled in \d+ s with the timing runs\):$", text)
    fp, _ = stories("stories260k", torch.bfloat16)
    assert groups == 2 * fp.config.num_hidden_layers  # q/k/v and gate/up share their input in every layer
    q_prefill, r_prefill, q_decode, r_decode = grab(
        rf"^\s+prefill\s+{NUM} tokens/s \({NUM}x bf16\), decode\s+{NUM} tokens/s \({NUM}x bf16\)$", text)
    assert min(bf16_prefill, bf16_decode, q_prefill, q_decode) > 0
    assert r_prefill == pytest.approx(q_prefill / bf16_prefill, abs=0.006)
    assert r_decode == pytest.approx(q_decode / bf16_decode, abs=0.006)
    # compile_decoder_layers rounds fused bfloat16 intermediates as eager does: the same logits and tokens
    diff, scale, same_pct = grab(rf"^vs the eager quantized model: prompt logits max \|diff\| {NUM} \(logits up to {NUM}\); "
                                 rf"{NUM}% of the greedy tokens equal$", text)
    assert diff == 0 and scale > 1 and same_pct == 100
    assert grab(r"^reloaded checkpoint \(plain per-linear weights\) generates the same tokens: (\w+)$", text) == ("True",)
    reloaded = load_checkpoint(out, torch.bfloat16)
    for i in range(fp.config.num_hidden_layers):  # plain weights: no dense cache, no shared-input wrappers
        for name in LINEARS:
            assert reloaded.get_submodule(f"model.layers.{i}.{name}").weight.dequantized is None
    assert_reference_block_rot_weights(reloaded, fp)
