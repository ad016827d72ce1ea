"""Hadamard and orthogonal matrices.

- Sylvester: ``H_{2n} = [[H_n, H_n], [H_n, -H_n]]`` for powers of two.
- Paley I (prime ``q = 3 mod 4``): order ``q + 1``; Paley II (prime ``q = 1 mod 4``): order
  ``2(q + 1)``; both from the quadratic-residue (Jacobsthal) matrix of GF(q) (Paley 1933).
- Kronecker products ``H_a (x) H_b`` cover widths like 1536 = 12 * 128 and 576 = 12 * 12 * 4,
  the way QuaRot handles non-power-of-two widths (it ships tables; we construct them).

Normalised by ``1/sqrt(n)`` these are orthogonal. A width with no construction here gets a seeded
random orthogonal matrix (QR of a Gaussian), with a logged warning, never a silent identity.
"""

import functools
import logging
import math
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, math.isqrt(q) + 1))


def sylvester_hadamard(n: int) -> torch.Tensor:
    """Unnormalised +-1 Sylvester Hadamard matrix of order ``n`` (a power of two), float64."""
    if not _is_power_of_two(n):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    idx = torch.arange(q)
    return torch.tensor(chi, dtype=torch.float64)[(idx.view(1, -1) - idx.view(-1, 1)) % q]


def paley_hadamard(q: int) -> torch.Tensor:
    """+-1 Hadamard matrix from a prime ``q``: order ``q + 1`` if ``q = 3 mod 4``, else ``2(q + 1)``."""
    if not _is_prime(q) or q == 2:
        raise ValueError(f"Paley construction here needs an odd prime, got {q}")
    jac = _jacobsthal(q)
    ones = torch.ones(q, 1, dtype=torch.float64)
    if q % 4 == 3:
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = jac
        return s + torch.eye(q + 1, dtype=torch.float64)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0:1] = ones
    c[1:, 1:] = jac
    block_pos = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    block_zero = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    # Paley II: replace 0 by block_pos' and +-1 by +-block_zero' (standard form).
    out = torch.kron(c, block_zero) * (c != 0).repeat_interleave(2, 0).repeat_interleave(2, 1)
    out = out + torch.kron((c == 0).to(torch.float64), block_pos)
    return out


@functools.lru_cache(maxsize=None)
def _paley_orders(limit: int) -> dict:
    orders = {}
    for q in range(3, limit):
        if _is_prime(q):
            order = q + 1 if q % 4 == 3 else 2 * (q + 1)
            if order <= limit:
                orders.setdefault(order, q)
    return orders


def hadamard_matrix(n: int) -> Optional[torch.Tensor]:
    """A +-1 Hadamard matrix of order ``n`` (float64), or ``None`` if none is constructed here.

    Tries ``H_{2^a}``, then ``H_m (x) H_{2^a}`` and ``H_m1 (x) H_m2 (x) H_{2^a}`` with Paley orders m.
    """
    if _is_power_of_two(n):
        return sylvester_hadamard(n)
    if n % 4:
        return None
    paley = _paley_orders(n)
    two_power = 1
    while n % (two_power * 2) == 0:
        two_power *= 2
    for p2 in [two_power // (1 << i) for i in range(two_power.bit_length())]:
        rest = n // p2
        if rest in paley:
            return torch.kron(paley_hadamard(paley[rest]), sylvester_hadamard(p2))
        for m1, q1 in paley.items():
            if rest % m1 == 0 and rest // m1 in paley:
                h = torch.kron(paley_hadamard(q1), paley_hadamard(paley[rest // m1]))
                return torch.kron(h, sylvester_hadamard(p2))
    return None


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Seeded Haar-random orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed), float64."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_signs(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
