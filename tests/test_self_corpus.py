"""The self-written fine-tuning corpus: a model's continuations, kept where every scorer calls
them non-toxic."""

import json

import pytest
from tiny_models import save_tiny

from lmprune.core.data import json_lines, load_corpus
from lmprune.core.errors import LmpruneError
from lmprune.finetune.self_corpus import build_corpus, clean_texts, main


def test_clean_texts_needs_every_scorer_below_the_threshold():
    records = [
        {"prompt": "A", "continuations": [" ok", " rude", " hateful", "  "],
         "scores": [0.1, 0.9, 0.2, 0.0],
         "scores_by_scorer": {"minilm": [0.3, 0.1, 0.7, 0.0]}},
        {"prompt": "B", "continuations": [" fine"], "scores": [0.49]},
    ]
    # " rude" fails the main scorer, " hateful" the second one, "  " is empty
    assert clean_texts(records, 0.5) == ["A ok", "B fine"]
    assert clean_texts(records, 0.35) == ["A ok"]  # " fine" (0.49) goes too
    assert clean_texts(records, 0.25) == []  # and " ok": minilm rates it 0.3


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["left out", "also left", "The river", "In 1901 the", "She said",
                             "Our plan is", "Then"]))
    return path


def test_corpus_keeps_exactly_the_continuations_below_the_threshold(tmp_path, prompts_file,
                                                                   one_thread):
    model = save_tiny("llama", tmp_path / "model")
    spec = f"{prompts_file}?field=text"
    out = tmp_path / "all" / "corpus.jsonl"
    summary = build_corpus(str(model), spec, out, skip=2, samples=3, max_new_tokens=6,
                           scorers=("profanity_check",), threshold=1.0, device="cpu")
    records = [r for _, r in json_lines(out.with_name("corpus.scored.jsonl"))]
    # the first two prompts are left out; every other prompt was sampled 3 times
    assert [r["prompt"] for r in records] == ["The river", "In 1901 the", "She said",
                                              "Our plan is", "Then"]
    texts = load_corpus(f"{out}?field=text").texts
    expected = [r["prompt"] + c for r in records for c in r["continuations"] if c.strip()]
    assert texts == expected and summary["kept"] == len(expected)

    # between the lowest and the highest score some go: exactly those rated at or above it
    scores = [s for r in records for s in r["scores"]]
    cut = (min(scores) + max(scores)) / 2
    out = tmp_path / "half" / "corpus.jsonl"
    build_corpus(str(model), spec, out, skip=2, samples=3, max_new_tokens=6,
                 scorers=("profanity_check",), threshold=cut, device="cpu")
    kept = load_corpus(f"{out}?field=text").texts
    assert kept == [r["prompt"] + c for r in records
                    for c, s in zip(r["continuations"], r["scores"], strict=True)
                    if c.strip() and s < cut]
    assert 0 < len(kept) < len(expected)


def test_bad_input_is_one_line_and_exit_2(tmp_path, prompts_file, capsys):
    spec = f"{prompts_file}?field=text"
    with pytest.raises(LmpruneError, match="no prompts left after --skip 7"):
        build_corpus("unused", spec, tmp_path / "c.jsonl", skip=7)
    with pytest.raises(LmpruneError, match="name a .jsonl file"):
        build_corpus("unused", spec, tmp_path / "c.txt")
    assert main(["--model", "unused", "--prompts", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "c.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmprune: ") and "\n" not in err
    assert not (tmp_path / "c.jsonl").exists()
