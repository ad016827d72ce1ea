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


def test_effective_errors_folding_a_massive_channel_costs_every_folded_variant():
    # SmolLM2's picture after RMSNorm folding: one channel of the normalised residual is massive and
    # its norm weight is tiny, so the linear never sees it, unless the weight is folded away.
    from torchao_mx_ext.eval.rotation_analysis import effective_errors

    torch.manual_seed(0)
    x = torch.randn(128, 256)
    x[:, 5] = 60.0
    gamma = torch.ones(256)
    gamma[5] = 1e-3
    rots = standard_rotations(256)
    res = effective_errors(x, gamma, {
        "rtn": (False, None), "global-rot": (False, rots["global"]), "block-rot": (False, rots["block"]),
        "quarot": (True, rots["global"]), "brq": (True, rots["block"]), "fold only": (True, None),
    })
    v = res["variants"]
    assert v["rtn"]["total_err_ratio"] == 1.0
    # folded, the massive value sets the exponent of its block (no rotation, block rotation) or of
    # every block (global rotation): the other channels round on a grid made for it, whose error the
    # tiny norm weight no longer scales away
    for name in ("quarot", "brq", "fold only"):
        assert v[name]["total_err_ratio"] > 5
    # unfolded, the input has no outlier and both rotations keep the error near RTN's
    assert 0.5 < v["global-rot"]["total_err_ratio"] < 2 and 0.5 < v["block-rot"]["total_err_ratio"] < 2


def test_effective_errors_are_invariant_to_trivial_variants():
    from torchao_mx_ext.eval.rotation_analysis import effective_errors

    torch.manual_seed(1)
    x = torch.randn(16, 96) * torch.rand(96) * 5
    ones = torch.ones(96)
    perm = torch.eye(96)[torch.cat([torch.arange(32, 64), torch.arange(0, 32), torch.arange(64, 96)])]
    res = effective_errors(x, ones, {"plain": (False, None), "folded": (True, None), "block permutation": (False, perm)})
    for name in ("folded", "block permutation"):  # same blocks, same values: the same error
        assert abs(res["variants"][name]["total_err_ratio"] - 1.0) < 1e-12
