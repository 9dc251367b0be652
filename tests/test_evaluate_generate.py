"""The sampler: nucleus sampling by hand, a per-prompt reference loop, HF greedy, determinism."""

import pytest
import torch

from lmprune.core.errors import LmpruneError
from lmprune.evaluate.generate import (
    prompt_uniforms,
    sample_continuations,
    sample_token_ids,
    top_p_sample,
)
from tests.tiny_models import tiny_model, tiny_tokenizer

PROMPTS = ["hello there", "a", "The quick brown fox jumps over", "xyz 123!"]


def reference_top_p(logits, u, top_p, temperature):
    """Nucleus sampling written plainly, one row: full sort, smallest set with mass >= top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = [], 0.0
    for token in order:
        nucleus.append(token)
        mass += probs[token].item()
        if mass >= top_p:
            break
    target, running = u * mass, 0.0
    for token in nucleus:
        running += probs[token].item()
        if running > target:
            return token
    return nucleus[-1]


def test_top_p_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05 (token ids 2, 0, 3, 1): top_p 0.75 keeps {2, 0}
    probs = torch.tensor([[0.3, 0.05, 0.5, 0.15]] * 4)
    uniforms = torch.tensor([0.0, 0.6, 0.63, 0.99])  # u * 0.8 = 0, 0.48, 0.504, 0.792
    tokens = top_p_sample(probs.log(), uniforms, top_p=0.75, temperature=1.0)
    assert tokens.tolist() == [2, 2, 0, 0]
    # top_p 1: all four; u * 1.0 = 0.97 falls in the last token's share (0.95 .. 1.0)
    assert top_p_sample(probs.log()[:1], torch.tensor([0.97]), 1.0, 1.0).tolist() == [1]
    # temperature 0.5 squares and renormalises: 0.25/0.3775 = 0.662 >= 0.6 keeps token 2 only
    assert top_p_sample(probs.log(), uniforms, 0.6, 0.5).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("vocab", [50, 6000])  # 6000: the top-candidate shortcut is taken
def test_top_p_equals_reference(vocab):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, vocab, generator=gen) * torch.linspace(0.5, 8, 64)[:, None]
    uniforms = torch.rand(64, generator=gen, dtype=torch.float64)
    for top_p, temperature in [(0.9, 1.0), (0.5, 0.7), (1.0, 1.3)]:
        ours = top_p_sample(logits, uniforms, top_p, temperature).tolist()
        ref = [reference_top_p(logits[r], uniforms[r].item(), top_p, temperature)
               for r in range(64)]
        assert ours == ref


def test_one_candidate_stage_as_on_gpus_gives_the_same_tokens(monkeypatch):
    from lmprune.evaluate import generate

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 6000, generator=gen) * torch.linspace(0.5, 8, 64)[:, None]
    uniforms = torch.rand(64, generator=gen, dtype=torch.float64)
    two_stages = top_p_sample(logits, uniforms, 0.9, 1.0)
    monkeypatch.setitem(generate._CANDIDATES, "cpu", generate._CANDIDATES["cuda"])
    assert top_p_sample(logits, uniforms, 0.9, 1.0).tolist() == two_stages.tolist()


def test_half_precision_logits_give_a_token_of_the_reference_probability():
    """bf16 logits rank the vocabulary; ties (frequent in bf16) may be ordered either way, so the
    token has the reference token's probability (it is that token, or one tied with it)."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(64, 6000, generator=gen)
              * torch.linspace(0.5, 8, 64)[:, None]).bfloat16()
    uniforms = torch.rand(64, generator=gen, dtype=torch.float64)
    probs = torch.softmax(logits.float(), -1)
    ours = top_p_sample(logits, uniforms, 0.9, 1.0).tolist()
    ref = [reference_top_p(logits[r].float(), uniforms[r].item(), 0.9, 1.0) for r in range(64)]
    assert [probs[r, t] for r, t in enumerate(ours)] == [probs[r, t] for r, t in enumerate(ref)]
    assert sum(a == b for a, b in zip(ours, ref, strict=True)) >= 48


def reference_sampler(model, tokenizer, prompts, samples, max_new_tokens, top_p, temperature,
                      seed):
    """One prompt, one sample at a time, no cache, no padding: the same RNG scheme."""
    eos = model.generation_config.eos_token_id
    out = []
    for i, prompt in enumerate(prompts):
        uniforms = prompt_uniforms(seed, i, max_new_tokens, samples)  # [steps, samples]
        rows = []
        for s in range(samples):
            ids = tokenizer(prompt)["input_ids"]
            new = []
            for step in range(max_new_tokens):
                logits = model(torch.tensor([ids + new])).logits[0, -1]
                token = reference_top_p(logits, uniforms[step, s].item(), top_p, temperature)
                if token == eos:
                    break
                new.append(token)
            rows.append(new)
        out.append(rows)
    return out


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sampler_equals_reference_loop(model_type):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    model.generation_config.eos_token_id = 2
    args = dict(samples=3, max_new_tokens=6, top_p=0.8, temperature=1.5, seed=7)
    with torch.no_grad():
        expected = reference_sampler(model, tok, PROMPTS, **args)
    # batch of 2 prompts at a time, so batches are left-padded
    got = sample_token_ids(model, tok, PROMPTS, batch_size=6, progress=False, **args)
    assert got == expected


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "opt", "qwen2", "phi3"])
def test_fixed_shape_decoding_gives_the_reference_tokens(model_type):
    """The static-cache decoder (one shape for every step and batch: padded prompts, a last batch
    filled with repeats, finished rows decoded on) samples what the reference loop samples."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    with torch.no_grad():  # a frequent token as EOS, so that rows end at different steps
        sampled = sample_token_ids(model, tok, PROMPTS, samples=4, max_new_tokens=6,
                                   progress=False)
    model.generation_config.eos_token_id = torch.tensor(
        [t for p in sampled for r in p for t in r]).mode().values.item()
    args = dict(samples=3, max_new_tokens=6, top_p=0.8, temperature=1.0, seed=7)
    with torch.no_grad():
        expected = reference_sampler(model, tok, PROMPTS, **args)
    # 3 prompts a batch: the second batch holds 1 prompt and 2 repeats
    got = sample_token_ids(model, tok, PROMPTS, batch_size=9, progress=False, static=True,
                           **args)
    assert got == expected
    assert any(len(r) < 6 for p in got for r in p)  # some rows ended at EOS


def test_fixed_shape_decoder_is_reused_by_calls_of_its_shape():
    from lmprune.evaluate import generate

    model, tok = tiny_model("llama"), tiny_tokenizer()
    args = dict(samples=3, max_new_tokens=5, batch_size=6, progress=False, static=True)
    whole = sample_token_ids(model, tok, PROMPTS, **args)
    decoder = generate._DECODER[0]
    halves = (sample_token_ids(model, tok, PROMPTS[:2], **args)
              + sample_token_ids(model, tok, PROMPTS[2:], index_offset=2, **args))
    assert halves == whole and generate._DECODER[0] is decoder
    model.config.sliding_window = 16  # prompt and continuation longer than the window: refused
    with pytest.raises(LmpruneError, match="sliding window"):
        sample_token_ids(model, tok, PROMPTS, **args)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "opt", "qwen2"])
def test_greedy_equals_hf_generate_left_padded(model_type):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    eos = model.generation_config.eos_token_id
    ours = sample_token_ids(model, tok, PROMPTS, samples=2, max_new_tokens=8, top_p=1e-9,
                            progress=False)
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    hf = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=0)
    for i, row in enumerate(hf[:, enc["input_ids"].shape[1]:].tolist()):
        expected = row[:row.index(eos)] if eos in row else row
        assert ours[i] == [expected, expected]


def test_deterministic_and_independent_of_batch_size():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    args = dict(samples=4, max_new_tokens=8, seed=3, progress=False)
    first = sample_token_ids(model, tok, PROMPTS, batch_size=100, **args)
    assert sample_token_ids(model, tok, PROMPTS, batch_size=100, **args) == first
    assert sample_token_ids(model, tok, PROMPTS, batch_size=4, **args) == first
    other_seed = sample_token_ids(model, tok, PROMPTS, batch_size=100,
                                  **{**args, "seed": 4})
    assert other_seed != first
    # samples of one prompt differ from each other (distinct uniforms per row)
    assert len({tuple(r) for r in first[2]}) > 1


def test_continuations_are_decoded_without_prompt():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = sample_token_ids(model, tok, PROMPTS, samples=2, max_new_tokens=5, progress=False)
    texts = sample_continuations(model, tok, PROMPTS, samples=2, max_new_tokens=5,
                                 progress=False)
    assert texts == [[tok.decode(r, skip_special_tokens=True) for r in rows] for rows in ids]
    assert all(len(t) <= 5 for rows in texts for t in rows)


def test_bad_settings():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(LmpruneError, match="top_p"):
        sample_token_ids(model, tok, PROMPTS, 2, top_p=0)
    with pytest.raises(LmpruneError, match="no prompts"):
        sample_token_ids(model, tok, [], 2)
