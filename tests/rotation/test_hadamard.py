import logging

import pytest
import torch

from reference import ref_hadamard
from torchao_mx_ext.rotation import (
    apply_block_rotation,
    hadamard_matrix,
    orthogonal_block,
    paley_hadamard,
    rotation_block,
    sylvester_hadamard,
)


@pytest.mark.parametrize("n", [1, 2, 32, 256])
def test_sylvester_matches_closed_form(n):
    assert torch.equal(sylvester_hadamard(n) / n**0.5, ref_hadamard(n))


@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 96, 192, 576, 1536])
def test_non_power_of_two_hadamard_is_a_hadamard_matrix(n):
    h = hadamard_matrix(n)
    assert h is not None and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("q", [3, 7, 11, 5, 13, 17])
def test_paley_orders(q):
    h = paley_hadamard(q)
    n = q + 1 if q % 4 == 3 else 2 * (q + 1)
    assert h.shape == (n, n) and torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_width_without_construction_gets_logged_random_orthogonal(caplog):
    assert hadamard_matrix(172) is None
    with caplog.at_level(logging.WARNING):
        r = orthogonal_block("hadamard", 172, seed=3)
    assert "random orthogonal" in caplog.text
    torch.testing.assert_close(r @ r.T, torch.eye(172, dtype=torch.float64), atol=1e-12, rtol=0)
    assert not torch.allclose(r, torch.eye(172, dtype=torch.float64))


def test_random_hadamard_is_seeded_signs_times_hadamard():
    a, b, c = (orthogonal_block("random_hadamard", 32, s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    signs = a[:, 0] / ref_hadamard(32)[:, 0]
    assert torch.equal(signs.abs(), torch.ones(32, dtype=torch.float64))
    assert torch.equal(a, signs.unsqueeze(1) * ref_hadamard(32))
    assert orthogonal_block("identity", 32) is None
    with pytest.raises(ValueError, match="unknown rotation"):
        orthogonal_block("givens", 32)


def test_rotation_block_is_shared_and_block_diagonal_application_is_exact():
    b1 = rotation_block("hadamard", 32)
    assert b1 is rotation_block("hadamard", 32)
    x = torch.randn(3, 5, 128, dtype=torch.float64)
    h = ref_hadamard(32)
    ref = x @ torch.block_diag(h, h, h, h)
    torch.testing.assert_close(apply_block_rotation(x, h), ref, atol=1e-12, rtol=0)
