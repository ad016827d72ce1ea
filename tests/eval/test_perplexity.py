import math

import pytest
import torch

from torchao_mx_ext.eval import Measure, perplexity, tokenize_for_perplexity, wikitext2_test_text
from torchao_mx_ext.zoo import load_model


@pytest.fixture(scope="module")
def stories():
    return load_model("stories260k")


def test_wikitext2_text_is_the_joined_test_rows(shared_data):
    text = wikitext2_test_text(shared_data)
    assert text.startswith("\n\n = Robert Boulter = \n\n") or " = Robert Boulter = " in text[:40]
    assert text.count("\n\n") >= 4357


def test_perplexity_matches_float64_log_softmax(stories, shared_data):
    model, tok = stories
    ids = tokenize_for_perplexity(tok, wikitext2_test_text(shared_data))
    got = perplexity(model, ids, seq_len=128, max_windows=3, progress=False)
    nll = []
    with torch.no_grad():
        for i in range(3):
            w = ids[:, i * 128 : (i + 1) * 128]
            logp = torch.log_softmax(model(w).logits[0, :-1].double(), -1)
            nll.append(-logp.gather(1, w[0, 1:, None]).mean().item())
    assert got["windows"] == 3 and got["seq_len"] == 128
    assert got["ppl"] == pytest.approx(math.exp(sum(nll) / 3), rel=1e-5)


def test_perplexity_bad_inputs(stories):
    model, _ = stories
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(model, torch.zeros(1, 4096, dtype=torch.long), seq_len=4096)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.zeros(1, 100, dtype=torch.long), seq_len=128)


def test_measure_reports_time_and_peak_memory():
    with Measure() as m:
        big = torch.ones(64, 2**20)  # 256 MiB
        del big
    assert m.wall_s > 0 and m.peak_mem_mb > 200
