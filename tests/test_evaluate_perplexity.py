"""Perplexity: the HF guide's loop, literally, and the non-overlapping figure by hand."""

import math

import pytest
import torch

from lmprune.core.errors import LmpruneError
from lmprune.evaluate.perplexity import perplexity
from tests.tiny_models import tiny_model, tiny_tokenizer

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building. "
        "Its base is square, measuring 125 metres on each side. During its construction, "
        "the tower surpassed the Washington Monument to become the tallest man-made structure "
        "in the world, a title it held for 41 years. ") * 3


@pytest.fixture(scope="module")
def trained():
    """A tiny LLaMA trained briefly on TEXT, so its perplexity is far from uniform."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(40):
        start = (step * 37) % (ids.shape[1] - 64)
        batch = ids[:, start:start + 64]
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tok


def guide_perplexity(model, tokenizer, text, max_length, stride):
    """huggingface.co/docs/transformers/perplexity, line by line."""
    encodings = tokenizer(text, return_tensors="pt")
    seq_len = encodings.input_ids.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size: label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    avg_nll = nll_sum / n_tokens
    return torch.exp(avg_nll).item()


@pytest.mark.parametrize("max_length,stride", [(64, 32), (100, 37), (128, 128)])
def test_sliding_window_equals_guide(trained, max_length, stride):
    model, tok = trained
    expected = guide_perplexity(model, tok, TEXT, max_length, stride)
    result = perplexity(model, tok, TEXT, max_length=max_length, stride=stride, batch_size=3,
                        progress=False)
    sliding = result["sliding_window"]
    assert expected < 40  # trained: far below the uniform 96
    assert sliding["token_perplexity"] == pytest.approx(expected, abs=1e-4)
    # every token but the first is scored once; with stride == max_length, the first token of
    # each window has no context and is not scored, as in the guide
    unscored = 1 if stride < max_length else sliding["windows"]
    assert sliding["tokens_scored"] == len(tok(TEXT)["input_ids"]) - unscored
    assert sliding["word_perplexity"] == pytest.approx(
        math.exp(sliding["nll_sum"] / len(TEXT.split())))


def test_non_overlapping_by_hand(trained):
    model, tok = trained
    ids = tok(TEXT)["input_ids"][:150]
    text = tok.decode(ids)
    result = perplexity(model, tok, text, max_length=64, stride=32, progress=False)
    tokens = [tok.bos_token_id] + ids  # the first token is scored from BOS
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 64):
            window = torch.tensor([tokens[start:start + 65]])
            logp = model(window[:, :-1]).logits.log_softmax(-1)[0]
            nll -= logp.gather(-1, window[0, 1:, None]).sum().item()
    disjoint = result["non_overlapping"]
    assert disjoint["tokens_scored"] == 150 and disjoint["windows"] == 3
    assert disjoint["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert disjoint["token_perplexity"] == pytest.approx(math.exp(nll / 150), rel=1e-5)
    assert disjoint["bits_per_byte"] == pytest.approx(nll / len(text.encode()) / math.log(2),
                                                      rel=1e-5)


def test_max_tokens_and_bad_windows(trained):
    model, tok = trained
    capped = perplexity(model, tok, TEXT, max_length=64, stride=32, max_tokens=100,
                        progress=False)
    assert capped["tokens"] == 100 and capped["words"] == len(TEXT[:100].split())
    with pytest.raises(LmpruneError, match="longer than the model"):
        perplexity(model, tok, TEXT, max_length=512, stride=256)
    with pytest.raises(LmpruneError, match="stride"):
        perplexity(model, tok, TEXT, max_length=64, stride=65)
