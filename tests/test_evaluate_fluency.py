"""Fluency of the generations: perplexity of each continuation given its prompt under a judge."""

import math

import numpy as np
import pytest
import torch

from lmprune.core.errors import LmpruneError
from lmprune.core.lineage import model_or_base
from lmprune.evaluate.fluency import judge_fluency
from tests.tiny_models import tiny_model, tiny_tokenizer

PROMPTS = ["The cat sat", "Why", "A much longer prompt than the others, with commas,"]
CONTINUATIONS = [[" on the mat.", " down", ""], [" not?", " me!", " so"],
                 [" and more words", " x", " yes it is."]]


@torch.no_grad()
def reference_nll(model, tokenizer, prompt: str, continuation: str) -> list[float]:
    """One sequence at a time, no cache, no padding: NLL of the continuation's tokens."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + continuation)["input_ids"]
    logits = model(input_ids=torch.tensor([full])).logits[0].double()  # [pos, vocab]
    logp = torch.log_softmax(logits, -1)
    return [-float(logp[i - 1, full[i]]) for i in range(len(prompt_ids), len(full))]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox", "opt", "qwen2"])
def test_judge_equals_one_sequence_at_a_time(model_type, one_thread):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    # 2 rows per batch: prompts of different lengths share batches, left-padded
    result = judge_fluency(model, tok, PROMPTS, CONTINUATIONS, {"name": "tiny"}, bootstrap=50,
                           rows_per_batch=6, progress=False)
    ref = [[reference_nll(model, tok, p, c) for c in conts]
           for p, conts in zip(PROMPTS, CONTINUATIONS, strict=True)]
    flat = [nll for row in ref for nll in row if nll]
    total = sum(sum(n) for n in flat)
    tokens = sum(len(n) for n in flat)
    assert result["tokens"] == tokens
    assert result["token_perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    per_cont = [math.exp(np.mean(n)) for n in flat]
    assert result["median_perplexity"] == pytest.approx(float(np.median(per_cont)), rel=1e-5)
    assert result["empty_continuations"] == 1 and result["continuations_scored"] == 8
    assert result["per_continuation"][0][2] is None
    assert result["per_continuation"][2][0] == pytest.approx(per_cont[5], rel=1e-5)
    low, high = result["token_perplexity_interval"]
    assert low <= result["token_perplexity"] <= high


def test_batching_does_not_change_the_figures(one_thread):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    one = judge_fluency(model, tok, PROMPTS, CONTINUATIONS, {"name": "t"}, bootstrap=20,
                        rows_per_batch=1, progress=False)
    many = judge_fluency(model, tok, PROMPTS, CONTINUATIONS, {"name": "t"}, bootstrap=20,
                         rows_per_batch=512, progress=False)
    assert one["token_perplexity"] == pytest.approx(many["token_perplexity"], rel=1e-6)
    assert one["median_perplexity"] == pytest.approx(many["median_perplexity"], rel=1e-6)


def test_a_judge_that_knows_the_text_finds_it_more_fluent(one_thread):
    """A model trained for a few steps on a sentence judges that sentence more fluent than
    shuffled characters of it: the figure measures language, not noise."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    text = " the cat sat on the mat and the dog sat on the log"
    ids = torch.tensor([tok("once" + text)["input_ids"]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    shuffled = "".join(np.random.default_rng(0).permutation(list(text)))
    result = judge_fluency(model, tok, ["once", "once"], [[text], [shuffled]], {"name": "t"},
                           bootstrap=10, progress=False)
    fluent, noise = (row[0] for row in result["per_continuation"])
    assert fluent < noise / 5


def test_every_continuation_empty_is_an_error():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(LmpruneError, match="every continuation is empty"):
        judge_fluency(model, tok, ["a"], [["", ""]], {"name": "t"}, progress=False)


def test_default_judge_is_the_base_model_of_the_lineage():
    pruned = {"name": "runs/x/pruned", "base_model": {"name": "smollm2-135m"}}
    assert model_or_base("base", pruned) == "smollm2-135m"
    assert model_or_base("base", {"name": "gpt2"}) == "gpt2"
    assert model_or_base("gemma3-270m", {"name": "x", "base_model": {"name": "y"}}) == "gemma3-270m"
