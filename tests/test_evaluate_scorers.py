"""Each scorer for real: profanity_check, Detoxify on a checkpoint in its own format, hf:."""

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from lmprune.core.errors import LmpruneError
from lmprune.evaluate.registry import load_scorer

TEXTS = ["you are a wonderful person", "shut up you stupid idiot", "", "the cat sat"]
WORDS = ["you", "are", "a", "wonderful", "person", "shut", "up", "stupid", "idiot", "the",
         "cat", "sat"]
CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def tiny_bert_folder(folder, num_labels, id2label=None):
    """A tiny random BERT classifier config and a WordPiece tokenizer, saved in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=24, max_position_embeddings=64,
                        num_labels=num_labels, **({"id2label": id2label} if id2label else {}))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval(), tokenizer


def manual_scores(model, tokenizer, index, sigmoid):
    enc = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    probs = logits.sigmoid() if sigmoid else logits.softmax(-1)
    return probs[:, index].tolist()


def test_profanity_check():
    scorer = load_scorer("profanity_check")
    assert "alt-profanity-check" in scorer.name
    scores = scorer.score(TEXTS)
    assert len(scores) == 4 and all(0 <= s <= 1 for s in scores)
    assert scores[1] > 0.5 > scores[0]


@pytest.fixture
def detoxify_checkpoint(tmp_path):
    model, tokenizer = tiny_bert_folder(tmp_path / "config", num_labels=len(CLASSES))
    checkpoint = {
        "config": {"arch": {"args": {"model_type": "bert-base-uncased",
                                     "model_name": "BertForSequenceClassification",
                                     "tokenizer_name": "BertTokenizer",
                                     "num_classes": len(CLASSES)}},
                   "dataset": {"args": {"classes": CLASSES}}},
        "state_dict": model.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "toxic.ckpt")
    return tmp_path / "toxic.ckpt", tmp_path / "config", model, tokenizer


def test_detoxify_local_checkpoint(detoxify_checkpoint):
    ckpt, config, model, tokenizer = detoxify_checkpoint
    scorer = load_scorer(f"detoxify:{ckpt}?config={config}", batch_size=3)
    assert scorer.name.startswith(f"detoxify:{ckpt} (toxicity, detoxify ")
    scores = scorer.score(TEXTS)
    assert scores == pytest.approx(manual_scores(model, tokenizer, 0, sigmoid=True), abs=1e-6)
    # "insult" is class 4
    insult = load_scorer(f"detoxify:{ckpt}", config=str(config), label="insult")
    assert insult.score(TEXTS) == pytest.approx(manual_scores(model, tokenizer, 4, True),
                                                abs=1e-6)


def test_detoxify_agrees_with_detoxify_itself(detoxify_checkpoint, monkeypatch):
    from detoxify import Detoxify

    ckpt, config, _, _ = detoxify_checkpoint
    # Detoxify reads the base model's config from the Hub even when given a local config
    # folder (then discards it): point that one read at the folder so it runs offline.
    original = BertConfig.from_pretrained.__func__
    monkeypatch.setattr(BertConfig, "from_pretrained", classmethod(
        lambda cls, name, **kw: original(cls, str(config) if name == "bert-base-uncased"
                                         else name, **kw)))
    expected = Detoxify(checkpoint=str(ckpt), huggingface_config_path=str(config)
                        ).predict(TEXTS)["toxicity"]
    ours = load_scorer(f"detoxify:{ckpt}?config={config}").score(TEXTS)
    assert ours == pytest.approx(expected, abs=1e-5)


def test_detoxify_offline_errors(tmp_path, detoxify_checkpoint):
    ckpt, _, _, _ = detoxify_checkpoint
    with pytest.raises(LmpruneError, match="config=FOLDER|hf_config_folder"):
        load_scorer("detoxify:original")
    with pytest.raises(LmpruneError, match="config and tokenizer"):
        load_scorer(f"detoxify:{ckpt}?config={tmp_path / 'missing'}")
    with pytest.raises(LmpruneError, match="not found"):
        load_scorer(f"detoxify:{tmp_path / 'nothing.ckpt'}")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(LmpruneError):
        load_scorer(f"detoxify:{tmp_path / 'bad.ckpt'}")


def test_hf_classifier(tmp_path):
    folder = tmp_path / "clf"
    model, tokenizer = tiny_bert_folder(folder, 3, {0: "neutral", 1: "offensive", 2: "other"})
    model.save_pretrained(folder)
    scorer = load_scorer(f"hf:{folder}")  # picks the toxic-sounding label
    assert "label offensive" in scorer.name and "sha256" in scorer.name
    assert scorer.score(TEXTS) == pytest.approx(manual_scores(model, tokenizer, 1, False),
                                                abs=1e-6)
    other = load_scorer(f"hf:{folder}?label=other&batch_size=1")
    assert other.score(TEXTS) == pytest.approx(manual_scores(model, tokenizer, 2, False),
                                               abs=1e-6)
    with pytest.raises(LmpruneError, match="no label 'toxic'"):
        load_scorer(f"hf:{folder}?label=toxic")


def test_hf_default_label_index_1_and_multilabel(tmp_path):
    folder = tmp_path / "clf"
    model, tokenizer = tiny_bert_folder(folder, 2, {0: "LABEL_0", 1: "LABEL_1"})
    model.config.problem_type = "multi_label_classification"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    scorer = load_scorer(f"hf:{folder}")
    assert scorer.score(TEXTS) == pytest.approx(manual_scores(model, tokenizer, 1, True),
                                                abs=1e-6)


def test_unknown_and_unloadable_scorers(tmp_path):
    with pytest.raises(LmpruneError, match="unknown scorer"):
        load_scorer("perspective")
    with pytest.raises(LmpruneError, match="sequence-classification model"):
        load_scorer(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(LmpruneError, match="unknown option"):
        load_scorer("profanity_check?colour=red")


def test_a_registered_kind_is_loaded_by_name_with_its_options(monkeypatch):
    """The registry as a plugin point: a kind registered outside lmprune is found like the
    built-in ones, gets its target and options, and appears in the unknown-scorer message."""
    from lmprune.evaluate import registry

    monkeypatch.setattr(registry, "SCORERS", dict(registry._registered()))

    class Fixed(registry.Scorer):
        def _score_batch(self, texts):
            return [self.value] * len(texts)

    @registry.register_scorer("fixed", "fixed:VALUE", target=True)
    def load_fixed(target, device, options):
        scorer = Fixed(f"fixed {target}", int(options.pop("batch_size", 2)))
        scorer.value = float(target)
        return scorer

    scorer = load_scorer("fixed:0.25?batch_size=3")
    assert scorer.batch_size == 3 and scorer.score(TEXTS) == [0.25] * len(TEXTS)
    assert set(registry.SCORERS) == {"profanity_check", "detoxify", "hf", "minilm", "fixed"}
    with pytest.raises(LmpruneError, match="unknown scorer 'nothing': use ") as refused:
        load_scorer("nothing")
    for kind in registry.SCORERS.values():
        assert kind.usage in str(refused.value)
    with pytest.raises(LmpruneError, match="unknown scorer 'minilm:large'"):
        load_scorer("minilm:large")  # a kind without targets
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_scorer("hf", "hf:OTHER", target=True)(lambda t, d, o: None)
