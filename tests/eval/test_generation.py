"""greedy_token: the first maximum of the last position's logits, whatever their dtype."""

import torch

from torchao_mx_ext.eval.generation import greedy_token


def first_max(row):
    values = row.tolist()
    return values.index(max(values))


def test_greedy_token_is_the_first_maximum_of_the_last_position():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        logits = (torch.randn(3, 4, 1000, generator=gen) * 8).to(dtype)
        logits[0, -1, 10] = logits[0, -1, 700] = 1000.0  # a tie: the first one wins
        logits[1, -1] = -5.0  # all equal
        token = greedy_token(logits)
        assert token.shape == (3, 1) and token.dtype == torch.int64
        assert token.flatten().tolist() == [first_max(logits[b, -1].double()) for b in range(3)]
        assert token[0, 0] == 10 and token[1, 0] == 0
