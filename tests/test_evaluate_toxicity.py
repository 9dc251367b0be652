"""RTP metrics on hand-made scores, bootstrap intervals, and the whole toxicity evaluation."""

import numpy as np
import pytest

from lmprune.errors import LmpruneError
from lmprune.evaluate.toxicity import bootstrap_intervals, evaluate_toxicity, toxicity_metrics
from tests.tiny_models import tiny_model, tiny_tokenizer

SCORES = [[0.1, 0.7, 0.2],   # max 0.7, toxic
          [0.0, 0.1, 0.4],   # max 0.4
          [0.5, 0.5, 0.5],   # max 0.5, toxic (>= 0.5 counts)
          [0.3, 0.2, 0.1]]   # max 0.3


def test_metrics_by_hand():
    metrics = toxicity_metrics(SCORES)
    assert metrics["expected_max_toxicity"] == pytest.approx((0.7 + 0.4 + 0.5 + 0.3) / 4)
    assert metrics["toxicity_probability"] == 0.5
    assert metrics["mean_toxicity"] == pytest.approx(3.6 / 12)


def test_bootstrap_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    scores = rng.beta(0.5, 2, size=(60, 5))
    point = toxicity_metrics(scores)
    first = bootstrap_intervals(scores, resamples=500, seed=0)
    assert first == bootstrap_intervals(scores, resamples=500, seed=0)
    assert first != bootstrap_intervals(scores, resamples=500, seed=1)
    for name, (low, high) in first.items():
        assert low <= point[name] <= high
        assert high - low > 0
    # a degenerate sample has a degenerate interval
    flat = bootstrap_intervals([[0.2, 0.2]] * 10, resamples=50)
    assert flat["mean_toxicity"] == pytest.approx([0.2, 0.2])
    assert flat["toxicity_probability"] == [0.0, 0.0]


class VowelScorer:
    """Deterministic stand-in: the share of vowels in the text."""

    name = "vowels (test)"

    def score(self, texts):
        return [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts]


def test_evaluate_toxicity_end_to_end():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["hello there", "abc", "The fox"]
    kwargs = dict(samples=4, max_new_tokens=6, seed=5, bootstrap=200, progress=False)
    result = evaluate_toxicity(model, tok, prompts, VowelScorer(), **kwargs)
    records = result.pop("records")
    assert [r["prompt"] for r in records] == prompts
    scores = [r["scores"] for r in records]
    for record in records:
        assert record["scores"] == VowelScorer().score(record["continuations"])
    assert result["expected_max_toxicity"] == toxicity_metrics(scores)["expected_max_toxicity"]
    assert result["scorer"] == "vowels (test)"
    assert result["num_prompts"] == 3 and result["samples_per_prompt"] == 4
    assert result["decoding"] == {"max_new_tokens": 6, "top_p": 0.9, "temperature": 1.0,
                                  "seed": 5}
    low, high = result["mean_toxicity_interval"]
    assert low <= result["mean_toxicity"] <= high
    again = evaluate_toxicity(model, tok, prompts, VowelScorer(), **kwargs)
    again.pop("records")
    for key in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity",
                "mean_toxicity_interval", "prompts_sha256"):
        assert again[key] == result[key]


def test_empty_prompt_set():
    with pytest.raises(LmpruneError, match="empty"):
        evaluate_toxicity(tiny_model("llama"), tiny_tokenizer(), [], VowelScorer())
