"""Tutorial 2: why a block rotation beats a global rotation under MXFP4.

    python tutorials/02_block_vs_global_rotation.py            # SmolLM2-135M, layer 10 q_proj
    python tutorials/02_block_vs_global_rotation.py --fast     # stories260k, a few tokens (CI)

MXFP4 gives every 32 values one power-of-two scale, set by the block's largest magnitude. LLM
activations have a few outlier channels. Rotations (QuaRot, SpinQuant) were invented for INT4 with one
scale per token: spreading the outliers over all channels lowers that single scale. Under MXFP4 the
picture flips. A *global* rotation spreads the outliers' energy into every block, so blocks that were
well-behaved ("regular": amax <= 4 rms) get a larger exponent and a coarser grid. A *block* rotation
(a 32x32 Hadamard inside each MX block, BRQ arXiv 2511.04214) only mixes values inside a block: the
outlier block gets flattened, and regular blocks stay regular.

This script takes a real activation (the input of one linear), measures per block the shared
exponent and the squared quantization error before and after each rotation, prints the numbers and
draws them (PNG).
"""

import argparse
from pathlib import Path

import torch

from torchao_mx_ext.calibration.data import calibration_ids
from torchao_mx_ext.eval.rotation_analysis import capture_linear_input, compare_rotations, standard_rotations
from torchao_mx_ext.zoo import load_model


def plot(res: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regular = res["regular"]
    base = res["base"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    shifts = range(-3, 6)
    width = 0.38
    for i, (name, color) in enumerate((("global", "tab:red"), ("block", "tab:blue"))):
        st = res["rotations"][name]["stats"]
        d = (st["exp"] - base["exp"])[regular]
        counts = [(d == s).float().mean().item() * 100 for s in shifts]
        axes[0].bar([s + (i - 0.5) * width for s in shifts], counts, width, color=color, label=f"{name} rotation")
        ratio = (st["err"][regular] / base["err"][regular].clamp_min(1e-30)).clamp(1e-2, 1e3)
        axes[1].hist(ratio.log10().numpy(), bins=60, alpha=0.55, color=color, label=f"{name} rotation")
    axes[0].set_xlabel("change of the block's E8M0 exponent")
    axes[0].set_ylabel("% of regular MX blocks")
    axes[0].set_title("Exponent shift of regular blocks")
    axes[0].legend()
    axes[1].axvline(0, color="k", lw=0.8)
    axes[1].set_xlabel("log10(block error after / before)")
    axes[1].set_ylabel("regular MX blocks")
    axes[1].set_title("Quantization error of regular blocks")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")  # exactly this path, whatever its suffix
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="stories260k and a few tokens (CI)")
    p.add_argument("--out", default=None, help="PNG path (default tutorials/figures/<model>_rotation_mechanism.png)")
    args = p.parse_args()
    model_name, layer, linear, samples, seq = ("stories260k", 2, "mlp.down_proj", 1, 64) if args.fast else ("smollm2-135m", 10, "self_attn.q_proj", 2, 512)
    torch.manual_seed(0)

    # 1. A real activation: the input of one linear on WikiText-2 *validation* text.
    model, tok = load_model(model_name)
    ids = calibration_ids(tok, "wikitext2", samples, seq, seed=0, max_positions=model.config.max_position_embeddings)
    x = capture_linear_input(model, f"model.layers.{layer}.{linear}", ids)
    width = x.shape[-1] - x.shape[-1] % 32  # whole MX blocks only (stories260k's MLP is 172 wide)
    x = x[:, :width]

    # 2. The two rotations and their effect on each MX block.
    res = compare_rotations(x, standard_rotations(width))
    print(f"{model_name}, layer {layer} {linear}: {x.shape[0]} tokens x {width} channels, "
          f"{100 * res['regular_block_fraction']:.0f}% regular MX blocks")
    for name, r in res["rotations"].items():
        print(f"  {name:>6} rotation: exponent up in {100 * r['regular_exp_up']:.0f}% / down in "
              f"{100 * r['regular_exp_down']:.0f}% of regular blocks; error x{r['regular_err_ratio']:.2f} on regular, "
              f"x{r['outlier_err_ratio']:.2f} on outlier blocks, x{r['total_err_ratio']:.2f} overall")

    # 3. The picture.
    out = Path(args.out or f"tutorials/figures/{model_name}_rotation_mechanism.png")
    plot(res, f"{model_name} layer {layer} {linear} input under MXFP4 (floor scales)", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
