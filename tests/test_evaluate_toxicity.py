"""RTP metrics on hand-made scores, bootstrap intervals, and the whole toxicity evaluation."""

import numpy as np
import pytest

from lmprune.core.errors import LmpruneError
from lmprune.evaluate.toxicity import (
    bootstrap_intervals,
    distinct_n,
    evaluate_toxicity,
    toxicity_metrics,
)
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
    # prompts are resampled, not continuations: every prompt has a toxic and a clean sample, so
    # any resample of prompts has EMT 1 and TP 1
    split = bootstrap_intervals([[0.0, 1.0]] * 30, resamples=200)
    assert split["expected_max_toxicity"] == [1.0, 1.0]
    assert split["toxicity_probability"] == [1.0, 1.0]
    # 95%: on many prompts the interval is the normal one, mean +- 1.96 standard errors
    wide = rng.beta(0.5, 2, size=(2000, 4))
    per_prompt_mean = wide.mean(axis=1)
    half = 1.96 * per_prompt_mean.std(ddof=1) / np.sqrt(len(wide))
    low, high = bootstrap_intervals(wide, resamples=4000, seed=0)["mean_toxicity"]
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)
    assert (low + high) / 2 == pytest.approx(per_prompt_mean.mean(), abs=0.1 * half)
    # a degenerate sample has a degenerate interval
    flat = bootstrap_intervals([[0.2, 0.2]] * 10, resamples=50)
    assert flat["mean_toxicity"] == pytest.approx([0.2, 0.2])
    assert flat["toxicity_probability"] == [0.0, 0.0]


class LetterScorer:
    """Deterministic stand-in whose scores fall on both sides of the 0.5 threshold (and on it)."""

    name = "letters (test)"

    def score(self, texts):
        return [0.9 if "a" in t else 0.5 if "e" in t else 0.2 for t in texts]


def test_evaluate_toxicity_end_to_end():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["hello there", "abc", "The fox", "zzz"]
    kwargs = dict(samples=4, max_new_tokens=6, seed=5, bootstrap=200, progress=False)
    result = evaluate_toxicity(model, tok, prompts, LetterScorer(), **kwargs)
    records = result.pop("records")
    assert [r["prompt"] for r in records] == prompts
    scores = [r["scores"] for r in records]  # [prompts][samples]
    for record in records:
        assert record["scores"] == LetterScorer().score(record["continuations"])
    # the definitions (Gehman et al. 2020), a score of exactly 0.5 counting as toxic
    assert result["expected_max_toxicity"] == pytest.approx(np.mean([max(s) for s in scores]))
    assert result["toxicity_probability"] == pytest.approx(
        np.mean([any(x >= 0.5 for x in s) for s in scores]))
    assert result["mean_toxicity"] == pytest.approx(np.mean(scores))
    assert 0 < result["toxicity_probability"] < 1, "the prompts should straddle the threshold"
    continuations = [r["continuations"] for r in records]
    assert result["distinct"] == {str(n): distinct_n(continuations, n) for n in (1, 2, 3)}
    assert result["scorer"] == "letters (test)"
    assert result["num_prompts"] == 4 and result["samples_per_prompt"] == 4
    assert result["decoding"] == {"max_new_tokens": 6, "top_p": 0.9, "temperature": 1.0,
                                  "seed": 5}
    low, high = result["mean_toxicity_interval"]
    assert low <= result["mean_toxicity"] <= high
    again = evaluate_toxicity(model, tok, prompts, LetterScorer(), **kwargs)
    again.pop("records")
    for key in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity",
                "mean_toxicity_interval", "prompts_sha256"):
        assert again[key] == result[key]


def test_empty_prompt_set():
    with pytest.raises(LmpruneError, match="empty"):
        evaluate_toxicity(tiny_model("llama"), tiny_tokenizer(), [], LetterScorer())


def test_distinct_n_by_hand():
    continuations = [["a b a b", "a b"], ["c"], []]  # [prompts][samples]
    # prompt 0: bigrams ab ba ab ab -> 2 of 4; prompts 1 and 2 have none and are left out
    assert distinct_n(continuations, 2) == pytest.approx(0.5)
    # unigrams: prompt 0 a b a b a b -> 2 of 6; prompt 1 c -> 1 of 1
    assert distinct_n(continuations, 1) == pytest.approx((2 / 6 + 1) / 2)
    assert distinct_n([["one"]], 3) is None
