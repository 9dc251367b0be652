"""The evaluate stage on the bundled SmolLM2-135M: sampler vs HF generate, perplexity vs guide."""

import pytest

from lmprune.core.data import load_corpus
from lmprune.evaluate.generate import sample_token_ids
from lmprune.evaluate.perplexity import perplexity
from lmprune.evaluate.registry import load_scorer
from lmprune.evaluate.toxicity import evaluate_toxicity
from tests.test_evaluate_perplexity import guide_perplexity

pytestmark = pytest.mark.integration


def test_greedy_equals_hf_and_toxicity(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    prompts = load_corpus("rtp:challenging", limit=3).texts
    eos = model.generation_config.eos_token_id
    ours = sample_token_ids(model, tok, prompts, samples=2, max_new_tokens=6, top_p=1e-9,
                            progress=False)
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    hf = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    for i, row in enumerate(hf[:, enc["input_ids"].shape[1]:].tolist()):
        expected = row[:row.index(eos)] if eos in row else row
        assert ours[i] == [expected, expected]
    result = evaluate_toxicity(model, tok, prompts, load_scorer("profanity_check"), samples=3,
                               max_new_tokens=8, bootstrap=100, progress=False)
    assert all(len(r["continuations"]) == 3 for r in result["records"])
    assert not any(r["continuations"][0].startswith(r["prompt"]) for r in result["records"])


def test_perplexity_equals_guide(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    text = "\n\n".join(load_corpus("wikitext2:test", limit=12).texts)
    ids = tok(text)["input_ids"][:700]
    text = tok.decode(ids)
    expected = guide_perplexity(model, tok, text, 256, 128)
    result = perplexity(model, tok, text, max_length=256, stride=128, progress=False)
    assert result["sliding_window"]["token_perplexity"] == pytest.approx(expected, abs=1e-4)
    assert 5 < expected < 100
