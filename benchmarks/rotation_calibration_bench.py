"""Rotation calibration cost: DartQuant's QR-Orth vs Cayley SGD (SpinQuant), same loss, same steps.

    python benchmarks/rotation_calibration_bench.py [--steps 200] [--threads 1] [--synthetic]
        [--json benchmarks/results/rotation_calibration_bench.json]

Both optimisers minimise DartQuant's whip loss ``mean_rows sum_i exp(-|(x R)_i|)`` from the same
random-Hadamard start, over the same sequence of mini-batches (64 rows), with SGD momentum 0.9 and
the same learning rate, for the same number of steps. Sizes: SmolLM2-135M's R1 (576 x 576, the
residual stream: q_proj/up_proj inputs of all layers pooled, norms folded) and R2 (64 x 64 per
head: one layer's o_proj inputs), each full width and as 32-wide blocks (``dartquant-block``).
Activations come from SmolLM2 on WikiText-2 *validation* text (never the test split); with
``--synthetic`` (or without SmolLM2) from heavy-tailed random rows with a few outlier channels.

Reported: optimisation time for the steps (median over ``--repeats`` interleaved runs; the loss is
not evaluated inside the timed loop), ratio = Cayley time / QR time, the whip loss over all rows
before and after, and how far each matrix is from orthogonal (max |R^T R - I|, float32).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchao_mx_ext.calibration.dartquant import collect_activations, random_hadamard_blocks  # noqa: E402
from torchao_mx_ext.calibration.orthogonal import (  # noqa: E402
    evaluate, make_optimiser, orthogonality_error,
)


def smollm2_activations(n_seq: int, seq_len: int, r2_layer: int):
    from torchao_mx_ext.zoo import data_dir, load_model

    model, tok = load_model("smollm2-135m")
    text = (data_dir() / "wikitext2" / "wt2_tokenized_valid.txt").read_text()[: 40 * n_seq * seq_len]
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n_seq * seq_len:
        raise RuntimeError("not enough calibration text")
    ids = ids[: n_seq * seq_len].reshape(n_seq, seq_len)
    acts = collect_activations(model, ids, r1_max_rows=65536, r2_max_tokens=n_seq * seq_len)
    return acts.r1, acts.r2[r2_layer], f"SmolLM2-135M, WikiText-2 valid {n_seq}x{seq_len} tokens, R2 of layer {r2_layer}"


def synthetic_activations(rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def make(n, d):
        x = torch.distributions.Laplace(0.0, 1.0).sample((n, d))
        x[:, torch.randperm(d, generator=gen)[:4]] *= 20  # outlier channels, as in LLM activations
        return x / x.pow(2).mean(-1, keepdim=True).sqrt()

    return make(rows, 576), make(rows // 8, 9 * 64).reshape(-1, 9, 64), "synthetic Laplace rows with outlier channels"


def run(method, data, init, batches, lr, momentum):
    opt = make_optimiser(method, init, lr, momentum)
    start = time.perf_counter()
    for idx in batches:
        opt.step(data[idx])
    elapsed = time.perf_counter() - start
    return elapsed, opt.current()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="both optimisers (DartQuant: 1e-3..1.5e-3)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a shared CPU: 1 is the steadiest)")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--calib", default="8x256", help="SmolLM2 calibration sequences x tokens")
    p.add_argument("--json", default="benchmarks/results/rotation_calibration_bench.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    source = None
    if not args.synthetic:
        try:
            n_seq, seq_len = (int(v) for v in args.calib.split("x"))
            r1_data, r2_data, source = smollm2_activations(n_seq, seq_len, r2_layer=15)
        except (FileNotFoundError, ModuleNotFoundError, OSError) as e:
            print(f"SmolLM2 unavailable ({e}); using synthetic activations")
    if source is None:
        r1_data, r2_data, source = synthetic_activations(32768)

    cases = [("R1 576x576", r1_data, None), ("R1 576, 32-blocks", r1_data, 32),
             ("R2 64x64", r2_data, None), ("R2 64, 32-blocks", r2_data, 32)]
    rows = []
    for name, data, block in cases:
        width = data.shape[-1]
        init = random_hadamard_blocks(width, block, seed=1)
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, data.shape[0], (args.batch,), generator=gen) for _ in range(args.steps)]
        row = {"case": name, "width": width, "block": block or width, "rows": data.shape[0], "steps": args.steps,
               "loss_init": evaluate(data, init.float())}
        times = {"qr": [], "cayley": []}
        for _ in range(args.repeats):  # interleaved, so a load change on a shared machine hits both
            for method in ("qr", "cayley"):
                elapsed, _ = run(method, data, init, batches, args.lr, args.momentum)
                times[method].append(elapsed)
        for method in ("qr", "cayley"):
            t = statistics.median(times[method])
            row[method] = {"time_s": t, "ms_per_step": 1e3 * t / args.steps, "times_s": times[method]}
        for method in ("qr", "cayley"):  # losses from one more (deterministic) run
            _, final = run(method, data, init, batches, args.lr, args.momentum)
            row[method].update(loss_final=evaluate(data, final), orthogonality_error=orthogonality_error(final))
        row["ratio_cayley_over_qr"] = row["cayley"]["time_s"] / row["qr"]["time_s"]
        rows.append(row)

    print(f"data: {source}; {args.steps} steps of {args.batch} rows, lr {args.lr}, momentum {args.momentum}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'case':<18} {'rows':>6} | {'QR ms/step':>10} {'Cayley ms/step':>14} {'ratio':>6} | "
          f"{'loss init':>9} {'QR final':>9} {'Cay final':>9} | {'QR orth':>8} {'Cay orth':>8}")
    for r in rows:
        q, c = r["qr"], r["cayley"]
        print(f"{r['case']:<18} {r['rows']:>6} | {q['ms_per_step']:>10.2f} {c['ms_per_step']:>14.2f} "
              f"{r['ratio_cayley_over_qr']:>5.2f}x | {r['loss_init']:>9.3f} {q['loss_final']:>9.3f} {c['loss_final']:>9.3f} | "
              f"{q['orthogonality_error']:>8.1e} {c['orthogonality_error']:>8.1e}")
    print("ratio = Cayley time / QR-Orth time (> 1: QR-Orth is faster)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "data": source,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": rows,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
