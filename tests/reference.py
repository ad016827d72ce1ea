"""Independent float64 reference for MXFP4 (OCP MX v1.0), written from the spec, not from the package.

Elements: nearest value of the E2M1 grid by distance, ties to the even code index, saturating at 6.
Exponents: from math.frexp (exact), per scale rule, each written in its own terms.
"""

import math

import numpy as np
import torch

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def rne_e2m1(v: np.ndarray) -> np.ndarray:
    a = np.abs(v)
    dist = np.abs(a[..., None] - GRID)
    best = dist.min(-1, keepdims=True)
    candidates = dist == best
    # among equally near grid points, prefer the even code index (even mantissa)
    even = candidates & (np.arange(8) % 2 == 0)
    index = np.where(even.any(-1), even.argmax(-1), candidates.argmax(-1))
    index = np.where(a > 6.0, 7, index)
    return np.copysign(GRID[index], v)


def floor_log2(a: float) -> int:
    m, e = math.frexp(a)  # a = m 2^e, m in [0.5, 1)
    return e - 1


def ref_exponent(amax: float, rule: str) -> int:
    if amax == 0.0:
        return -127
    k = floor_log2(amax)
    if rule in ("floor", "fp_quant", "mse"):
        e = k - 2
    elif rule == "even":  # amax rounded to 1 mantissa bit (half up), then floor
        e = k - 2 + (1 if amax / 2.0**k >= 1.75 else 0)
    elif rule == "rceil":  # smallest e with 6 * 2^e >= amax
        e = k - 4
        while 6.0 * 2.0**e < amax:
            e += 1
    else:
        raise ValueError(rule)
    return max(-127, min(127, e))


def _elements(block: np.ndarray, e: int, rule: str) -> np.ndarray:
    v = block * 2.0**-e
    if rule == "fp_quant":  # grid stretched by 4/3; the scaled value is a float32 (as documented)
        v = (v * 0.75).astype(np.float32).astype(np.float64)
    return rne_e2m1(v)


def ref_quantize(x: torch.Tensor, rule: str, block_size: int = 32):
    """-> (E2M1 values float64 [..., K], exponents int64 [..., K/B], dequantized float64 [..., K])."""
    arr = x.detach().to(torch.float64).numpy()
    blocks = arr.reshape(-1, block_size)
    q = np.zeros_like(blocks)
    exps = np.zeros(blocks.shape[0], dtype=np.int64)
    mult = 4.0 / 3.0 if rule == "fp_quant" else 1.0
    for i, block in enumerate(blocks):
        amax = float(np.abs(block).max())
        e = ref_exponent(amax, rule)
        qi = _elements(block, e, rule)
        if rule == "mse":
            e_up = min(e + 1, 127)
            q_up = _elements(block, e_up, rule)
            err = ((block - qi * 2.0**e) ** 2).sum()
            err_up = ((block - q_up * 2.0**e_up) ** 2).sum()
            if err_up < err:
                e, qi = e_up, q_up
        q[i], exps[i] = qi, e
    deq = q * (2.0 ** exps.astype(np.float64))[:, None] * mult
    shape = arr.shape
    return (
        torch.from_numpy(q.reshape(shape)),
        torch.from_numpy(exps.reshape(*shape[:-1], shape[-1] // block_size)),
        torch.from_numpy(deq.reshape(shape)),
    )


def ref_fake_quantize(x: torch.Tensor, rule: str, block_size: int = 32) -> torch.Tensor:
    return ref_quantize(x, rule, block_size)[2]


def ref_hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard by its closed form H[i, j] = (-1)^popcount(i & j), normalised."""
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    bits = torch.zeros(n, n, dtype=torch.int64)
    x = i & j
    while bool(x.any()):
        bits += x & 1
        x = x >> 1
    return (1.0 - 2.0 * (bits % 2)).to(torch.float64) / math.sqrt(n)
