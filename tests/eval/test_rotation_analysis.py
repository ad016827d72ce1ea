import torch

from torchao_mx_ext.eval.rotation_analysis import block_stats, compare_rotations, standard_rotations


def test_global_rotation_spreads_an_outlier_channel_and_block_rotation_contains_it():
    # 256 channels, one outlier channel 100x the others: the classic LLM activation picture
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    x[:, 3] *= 100
    res = compare_rotations(x, standard_rotations(256))
    # the outlier's block is irregular in (almost) every row; the other 7 of 8 blocks are regular
    assert 0.85 < res["regular_block_fraction"] < 0.9
    glob, block = res["rotations"]["global"], res["rotations"]["block"]
    assert glob["regular_exp_up"] > 0.7 and glob["regular_err_ratio"] > 10
    assert block["regular_exp_up"] < 0.2 and block["regular_err_ratio"] < 1.2
    # both rotations help the outlier block itself
    assert glob["outlier_err_ratio"] < 0.2 and block["outlier_err_ratio"] < 0.7


def test_block_stats_exponent_is_the_floor_rule():
    x = torch.zeros(1, 32)
    x[0, 0] = 48.0  # floor(log2 48) - 2 = 3
    assert block_stats(x)["exp"].item() == 3
