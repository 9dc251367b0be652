"""BLiMP: batched log-probabilities vs one sentence at a time, accuracies by hand, the shared
file, bad inputs, and SmolLM2 above chance."""

import json
from types import SimpleNamespace

import pytest
import torch

from lmprune.core.data import data_dir
from lmprune.core.errors import LmpruneError
from lmprune.evaluate.blimp import (
    BlimpPair,
    blimp_accuracy,
    load_blimp,
    prefix_token_id,
    sentence_logprobs,
)
from tests.tiny_models import tiny_model, tiny_tokenizer

# Two fields, three paradigms of unequal size (so the paradigm mean and the pair mean differ in
# general), sentences of many lengths (so batches pad), and one pair of identical sentences.
PAIRS = [
    BlimpPair("agr_a", "morphology", "agreement", "The cat sleeps.", "The cat sleep."),
    BlimpPair("agr_a", "morphology", "agreement", "Dogs bark at night!", "Dogs barks at night!"),
    BlimpPair("agr_a", "morphology", "agreement", "It is.", "It are."),
    BlimpPair("agr_b", "morphology", "agreement", "These books were read by Ann.",
              "This books were read by Ann."),
    BlimpPair("isl", "syntax", "islands", "Who did you see?", "Who did you see him?"),
    BlimpPair("isl", "syntax", "islands", "What had Theresa walked through while talking?",
              "What had Theresa walked through that while talking about?"),
    BlimpPair("isl", "syntax", "islands", "Same sentence.", "Same sentence."),
    BlimpPair("isl", "syntax", "islands", "a", "ab"),
]


def reference_logprob(model, tokenizer, sentence: str) -> float:
    """One sentence, no padding: ' ' + sentence after the BOS token, as lm-eval scores it."""
    ids = tokenizer(" " + sentence, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[tokenizer.bos_token_id] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits[0].double(), dim=-1)  # [pos, vocab]
    return sum(logp[i, token].item() for i, token in enumerate(ids))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt", "gemma3_text"])
def test_batched_logprobs_equal_one_at_a_time(model_type, one_thread):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    sentences = [s for p in PAIRS for s in (p.good, p.bad)]
    batched = sentence_logprobs(model, tok, sentences, batch_size=3)
    expected = [reference_logprob(model, tok, s) for s in sentences]
    assert batched == pytest.approx(expected, abs=1e-5)
    assert sentence_logprobs(model, tok, sentences, batch_size=64) == pytest.approx(expected,
                                                                                    abs=1e-5)


def test_accuracies_by_hand(one_thread):
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    result = blimp_accuracy(model, tok, PAIRS, batch_size=4, progress=False)
    logp = {s: reference_logprob(model, tok, s) for p in PAIRS for s in (p.good, p.bad)}
    right = {}
    for p in PAIRS:  # ties count as right: lm-eval's argmax over [good, bad] picks good
        right.setdefault(p.uid, []).append(logp[p.good] >= logp[p.bad])
    per_paradigm = {uid: sum(r) / len(r) for uid, r in right.items()}
    assert result["per_paradigm"] == pytest.approx(per_paradigm)
    assert result["per_field"] == pytest.approx({
        "morphology": (per_paradigm["agr_a"] + per_paradigm["agr_b"]) / 2,
        "syntax": per_paradigm["isl"]})
    assert result["accuracy"] == pytest.approx(sum(per_paradigm.values()) / 3)
    assert result["pair_accuracy"] == pytest.approx(
        sum(sum(r) for r in right.values()) / len(PAIRS))
    assert result["pairs"] == 8 and result["paradigms"] == 3
    assert "log-probability" in result["scoring"] and result["elapsed_s"] >= 0


def test_prefix_token_falls_back_to_eos():
    assert prefix_token_id(SimpleNamespace(bos_token_id=5, eos_token_id=2)) == 5
    assert prefix_token_id(SimpleNamespace(bos_token_id=None, eos_token_id=2)) == 2
    with pytest.raises(LmpruneError, match="neither a BOS nor an EOS"):
        prefix_token_id(SimpleNamespace(bos_token_id=None, eos_token_id=None))


def test_load_the_shared_file():
    if data_dir() is None or not (data_dir() / "blimp.jsonl").is_file():
        pytest.skip("LMPRUNE_DATA_DIR does not hold blimp.jsonl")
    pairs, info = load_blimp("blimp", per_paradigm=3)
    assert info["paradigms"] == 67 and info["pairs"] == len(pairs) == 201
    assert info["resolved"] == str(data_dir() / "blimp.jsonl") and info["per_paradigm"] == 3
    counts = {}
    for p in pairs:
        counts[p.uid] = counts.get(p.uid, 0) + 1
    assert set(counts.values()) == {3}
    # four fields: the release's one "syntax/semantics" paradigm joins "syntax_semantics"
    assert {p.field for p in pairs} == {"syntax", "morphology", "semantics", "syntax_semantics"}
    assert pairs[0] == BlimpPair("adjunct_island", "syntax", "island_effects",
                                 "Who should Derek hug after shocking Richard?",
                                 "Who should Derek hug Richard after shocking?")
    assert load_blimp("blimp", per_paradigm=3)[1]["sha256"] == info["sha256"]
    assert load_blimp("blimp", per_paradigm=4)[1]["sha256"] != info["sha256"]


def _line(**overrides) -> str:
    record = {"UID": "u", "pairID": "0", "field": "syntax", "linguistics_term": "t",
              "sentence_good": "A b.", "sentence_bad": "B a."}
    record.update(overrides)
    return json.dumps({k: v for k, v in record.items() if v is not None})


def test_a_user_file_and_per_paradigm(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([_line(UID="x"), _line(UID="y"), "", _line(UID="x", field=None),
                               _line(UID="x")]) + "\n")
    pairs, info = load_blimp(str(path), per_paradigm=2)
    assert [p.uid for p in pairs] == ["x", "y", "x"] and pairs[2].field == "unknown"
    assert info["resolved"] == str(path) and info["paradigms"] == 2


@pytest.mark.parametrize("lines,message", [
    (["{not json"], r"line 1 is not valid JSON"),
    ([_line(), "[1, 2]"], r"line 2 is not a JSON object"),
    ([_line(), _line(sentence_good=None)], r"line 2 has no text field 'sentence_good'"),
    ([_line(sentence_bad=None)], r"line 1 has no text field 'sentence_bad'"),
    ([_line(), "", _line(UID=None)], r"line 3 has no text field 'UID'"),
    ([_line(sentence_good=3)], r"line 1 has no text field 'sentence_good'"),
    (["", "  "], r"has no pairs"),
])
def test_bad_files(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LmpruneError, match=message):
        load_blimp(str(path))


def test_missing_file_and_bad_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPRUNE_DATA_DIR", str(tmp_path))
    with pytest.raises(LmpruneError, match=r"BLiMP file not found: .*blimp\.jsonl; set "
                                           r"LMPRUNE_DATA_DIR to the shared data folder"):
        load_blimp("blimp")
    with pytest.raises(LmpruneError, match="not found: .*nope.jsonl"):
        load_blimp(str(tmp_path / "nope.jsonl"))
    with pytest.raises(LmpruneError, match="per paradigm must be at least 1, not 0"):
        load_blimp("blimp", per_paradigm=0)
    with pytest.raises(LmpruneError, match="at least one pair"):
        blimp_accuracy(None, None, [])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"UID": "u", "sentence_good": "caf\xe9", '
                                            b'"sentence_bad": "cafe"}\n')
    with pytest.raises(LmpruneError, match="not UTF-8"):
        load_blimp(str(tmp_path / "latin1.jsonl"))


@pytest.mark.integration
def test_smollm2_knows_grammar(smollm2):
    if data_dir() is None or not (data_dir() / "blimp.jsonl").is_file():
        pytest.skip("LMPRUNE_DATA_DIR does not hold blimp.jsonl")
    pairs, _ = load_blimp("blimp", per_paradigm=5)
    result = blimp_accuracy(smollm2.model, smollm2.tokenizer, pairs, progress=False)
    assert result["paradigms"] == 67 and result["pairs"] == 335
    assert result["accuracy"] > 0.6 and result["pair_accuracy"] > 0.6
    assert set(result["per_field"]) >= {"syntax", "morphology", "semantics"}
