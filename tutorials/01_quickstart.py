"""Tutorial 1: quantize a model to rotated MXFP4, compile it, save it, load it back.

    python tutorials/01_quickstart.py           # SmolLM2-135M
    python tutorials/01_quickstart.py --fast    # stories260k (CI)

One ``quantize_`` call turns every linear layer (but ``lm_head``) into W4A4 MXFP4 with a 32-wide
block Hadamard: weights are stored rotated and packed (4.25 bits each), activations are rotated and
quantized on the fly. The model still is a plain transformers model: it generates, compiles with
``torch.compile(fullgraph=True)``, and saves to safetensors through our quantization method.
"""

import argparse
import time
from pathlib import Path

import torch
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM

import torchao_mx_ext as tme
from torchao_mx_ext.eval import perplexity, tokenize_for_perplexity, wikitext2_test_text
from torchao_mx_ext.hf import save_pretrained
from torchao_mx_ext.configs import quantizable_filter
from torchao_mx_ext.zoo import data_dir, load_model


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="stories260k, one window (CI)")
    p.add_argument("--out", default="tutorials/output/quickstart", help="where the quantized checkpoint goes")
    args = p.parse_args()
    name, seq_len, windows = ("stories260k", 256, 1) if args.fast else ("smollm2-135m", 2048, 2)
    torch.manual_seed(0)

    # 1. Load a model and measure it.
    model, tok = load_model(name)
    ids = tokenize_for_perplexity(tok, wikitext2_test_text(data_dir()))
    fp_ppl = perplexity(model, ids, seq_len, windows, progress=False)["ppl"]

    # 2. One call: W4A4 MXFP4 with a block Hadamard, lm_head kept in high precision.
    quantize_(model, tme.MXFP4BlockRotConfig(), filter_fn=quantizable_filter(model))
    w = model.model.layers[0].mlp.up_proj.weight
    print(f"up_proj weight: {type(w).__name__}, codes {tuple(w.qdata.shape)} uint8, scales {tuple(w.scale.shape)} uint8, "
          f"rotation block {tuple(w.rotation.shape)}")
    q_ppl = perplexity(model, ids, seq_len, windows, progress=False)["ppl"]
    print(f"WikiText-2 perplexity ({windows} x {seq_len} tokens): fp {fp_ppl:.2f} -> W4A4 MXFP4 block-rot {q_ppl:.2f}")

    # 3. Compile: the activation's rotate + quantize becomes one fused kernel per linear input.
    #    (--fast compiles one MLP block only: compiling a whole model takes minutes on 2 CPU cores.)
    sample = ids[:, :64]
    target = model.model.layers[0].mlp if args.fast else model
    with torch.no_grad():
        x = model.model.embed_tokens(sample) if args.fast else sample
        eager = target(x) if args.fast else target(x).logits
        t0 = time.perf_counter()
        out = torch.compile(target, fullgraph=True)(x)
        compiled = out if args.fast else out.logits
    print(f"compiled {'one MLP block' if args.fast else 'the model'} in {time.perf_counter() - t0:.0f} s; "
          f"max |compiled - eager| = {(compiled - eager).abs().max():.2e}")

    # 4. Save (safetensors, atomically) and load back with plain transformers.
    out = Path(args.out)
    save_pretrained(model, out, tokenizer=tok)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        same = torch.equal(reloaded(sample).logits, model(sample).logits)
    print(f"saved {folder_mb(out):.1f} MB of safetensors; reloaded logits identical: {same}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
