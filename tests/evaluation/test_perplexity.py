import math

import pytest
import torch

from moecompress.evaluation.perplexity import _ratio_stderr, paired_difference, perplexity

from ..conftest import WIKI, require_shared


def test_the_ratio_stderr_of_equal_windows_is_the_stderr_of_their_means():
    torch.manual_seed(torch.seed() % 2**31)
    means = torch.rand(30, dtype=torch.float64) * 3 + 1
    counts = torch.full((30,), 511.0, dtype=torch.float64)
    expected = float(means.std() / math.sqrt(30))
    assert _ratio_stderr(means * counts, counts) == pytest.approx(expected, rel=1e-12)
    assert _ratio_stderr(means[:1] * 511, counts[:1]) == 0.0


def test_windows_add_up_and_pair_on_the_same_windows(tiny_text_path):
    from transformers import AutoTokenizer

    from moecompress.models import load_model

    model = load_model(str(tiny_text_path)).model
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_path)
    result = perplexity(model, tokenizer, str(require_shared(WIKI)), max_windows=5, progress=False)
    assert len(result.window_nll) == 5 and sum(result.window_tokens) == result.tokens
    assert sum(result.window_nll) / result.tokens == pytest.approx(result.nll, rel=1e-12)
    assert 0 < result.nll_stderr < result.nll / 5
    assert "window_nll" not in result.to_dict() and result.to_dict()["nll_stderr"] == result.nll_stderr
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj.mul_(1.1)
    other = perplexity(model, tokenizer, str(WIKI), max_windows=5, progress=False)
    delta, stderr = paired_difference(other, result)
    assert delta == pytest.approx(other.nll - result.nll, rel=1e-9) and delta != 0 and 0 < stderr
    assert paired_difference(result, result) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same windows"):
        paired_difference(result, perplexity(model, tokenizer, str(WIKI), max_windows=3, progress=False))
