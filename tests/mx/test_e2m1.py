import torch

from torchao_mx_ext.mx import code_to_e2m1, e2m1_to_code, pack_uint4, round_to_e2m1, unpack_uint4

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_grid_values_are_fixed_points():
    g = torch.tensor(GRID + [-v for v in GRID])
    assert torch.equal(round_to_e2m1(g), g)


def test_ties_round_to_even_mantissa():
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    assert torch.equal(round_to_e2m1(v), expected)
    assert torch.equal(round_to_e2m1(-v), -expected)


def test_saturates_at_six():
    v = torch.tensor([6.9, 7.0, 7.5, 100.0, float("inf"), -1e30])
    assert torch.equal(round_to_e2m1(v), torch.tensor([6.0, 6.0, 6.0, 6.0, 6.0, -6.0]))


def test_nearest_between_grid_points():
    v = torch.tensor([0.2, 0.3, 1.3, 2.4, 2.6, 3.4, 4.9, 5.1])
    assert torch.equal(round_to_e2m1(v), torch.tensor([0.0, 0.5, 1.5, 2.0, 3.0, 3.0, 4.0, 6.0]))


def test_codes_round_trip_all_sixteen():
    codes = torch.arange(16, dtype=torch.uint8)
    values = code_to_e2m1(codes)
    assert values[:8].tolist() == GRID
    assert values[8:].abs().tolist() == GRID and bool(torch.signbit(values[8:]).all())
    assert torch.equal(e2m1_to_code(values), codes)


def test_pack_low_nibble_first_and_round_trip():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_uint4(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    random = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_uint4(pack_uint4(random)), random)
