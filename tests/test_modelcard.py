"""Model cards of checkpoint folders: metadata the Hub reads back, and the text a reader sees."""

import json

import pytest
from checkpoints import tiny_checkpoint
from huggingface_hub import ModelCard

from lmprune.core.errors import LmpruneError
from lmprune.core.module_map import write_module_map
from lmprune.publish.modelcard import write_model_card

# As `lmprune eval --json` writes it: intervals as `{metric}_interval`, the prompts as
# `Corpus.describe()`, decoding settings nested, token and word perplexity per method.
AFTER = {
    "toxicity": {"expected_max_toxicity": 0.412, "toxicity_probability": 0.305,
                 "mean_toxicity": 0.118, "expected_max_toxicity_interval": [0.38, 0.44],
                 "scorer": "profanity_check", "num_prompts": 598, "samples_per_prompt": 25,
                 "prompts": {"spec": "rtp:challenging", "documents": 598, "sha256": "ab"},
                 "decoding": {"top_p": 0.9, "max_new_tokens": 20}},
    "perplexity": {"sliding_window": {"token_perplexity": 28.83, "word_perplexity": 61.5,
                                      "max_length": 512},
                   "non_overlapping": {"token_perplexity": 31.2},
                   "corpus": {"spec": "wikitext2:test"}, "tokens": 40960},
}
# The minimal shape: flat settings, a plain `perplexity` per method, a `_ci` interval.
BEFORE = {
    "toxicity": {"expected_max_toxicity": 0.527, "toxicity_probability": 0.452,
                 "mean_toxicity": 0.201, "toxicity_probability_ci": [0.41, 0.49],
                 "scorer": "profanity_check", "num_prompts": 598, "samples_per_prompt": 25,
                 "prompts": "rtp:challenging", "top_p": 0.9, "max_new_tokens": 20},
    "perplexity": {"sliding_window": {"perplexity": 26.41}},
}


def _metrics(card_data: dict) -> dict:
    """(dataset type, metric type, metric config) -> value, from a card's model-index."""
    [entry] = card_data["model-index"]
    return {(r["dataset"]["type"], m["type"], m.get("config")): m["value"]
            for r in entry["results"] for m in r["metrics"]}


def test_card_round_trips_with_metadata_numbers_table_and_warning(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ck")
    path = write_model_card(folder, AFTER, BEFORE, model_name="me/smollm2-pruned")
    assert path == folder / "README.md"

    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["license"] == "apache-2.0"
    assert set(data["tags"]) >= {"lmprune", "detoxification", "pruning"}
    # corpora named in lmprune.json's history, plus the evaluation data sets
    assert data["datasets"] == ["s-nlp/paradetox", "Salesforce/wikitext",
                                "allenai/real-toxicity-prompts"]
    assert data["model-index"][0]["name"] == "me/smollm2-pruned"
    rtp = "allenai/real-toxicity-prompts"
    assert _metrics(data) == {
        (rtp, "expected_max_toxicity", "profanity_check"): 0.412,
        (rtp, "toxicity_probability", "profanity_check"): 0.305,
        (rtp, "mean_toxicity", "profanity_check"): 0.118,
        ("Salesforce/wikitext", "perplexity", "sliding_window"): 28.83,
        ("Salesforce/wikitext", "word_perplexity", "sliding_window"): 61.5,
        ("Salesforce/wikitext", "perplexity", "non_overlapping"): 31.2,
    }
    rtp_result = data["model-index"][0]["results"][0]
    assert rtp_result["task"]["type"] == "text-generation"
    assert rtp_result["dataset"]["args"] == {"num_prompts": 598, "samples_per_prompt": 25}
    # the Hub's own parser reads the same results back
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} >= {
        ("expected_max_toxicity", 0.412), ("perplexity", 28.83)}

    text = card.text
    assert "Content warning" in text
    assert "| Expected Maximum Toxicity | 0.527 | 0.412 [0.380, 0.440] | -0.115 |" in text
    assert "| Toxicity Probability | 0.452 [0.410, 0.490] | 0.305 | -0.147 |" in text
    assert "| Perplexity (sliding window), WikiText-2 test | 26.41 | 28.83 | +2.42 |" in text
    assert "| Word perplexity (sliding window), WikiText-2 test | — | 61.5 | — |" in text
    wikitext = data["model-index"][0]["results"][1]["dataset"]
    assert (wikitext["config"], wikitext["split"]) == ("wikitext-2-v1", "test")
    assert "| *sampling* | top p 0.9, max new tokens 20 | top p 0.9, max new tokens 20 | |" in text
    assert "| *toxicity scorer* | `profanity_check` | `profanity_check` | |" in text
    assert "| *samples per prompt* | 25 | 25 | |" in text
    assert "598 RealToxicityPrompts (challenging prompts) (`rtp:challenging`)" in text
    assert "Not like for like" not in text
    # how it was made: mode, the per-layer summary of pruned_neurons, the history
    assert "Mode `modules`" in text
    assert "Zeroed MLP neurons: 4 in 2 of 2 layers" in text
    assert "| 0 | 3 | 6.2% |" in text and "| 1 | 1 | 2.1% |" in text  # llama tiny: 48 wide
    assert "**finetune**: steps 200, corpus wikitext2:valid" in text
    assert "## Limitations" in text


def test_card_flags_results_that_are_not_like_for_like(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ck")
    before = {"toxicity": dict(BEFORE["toxicity"], scorer="detoxify", samples_per_prompt=10,
                               toxicity_probability_ci=None,
                               toxicity_probability_interval={"low": 0.40, "high": 0.50})}
    text = ModelCard.load(write_model_card(folder, AFTER, before)).text
    assert "Not like for like" in text
    assert "| Toxicity Probability | 0.452 [0.400, 0.500] | 0.305 | -0.147 |" in text
    assert "| *toxicity scorer* | `detoxify` | `profanity_check` | |" in text


def test_card_without_evaluation_or_known_license(tmp_path):
    """A Hub base model (license unknown offline), reached through a pruned folder's lineage."""
    hub_base = {"name": "openai-community/gpt2", "kind": "hub", "model_type": "gpt2"}
    through_folder = {"name": "/runs/pruned", "kind": "folder", "model_type": "gpt2",
                      "base_model": hub_base}
    folder = tiny_checkpoint(tmp_path / "ck", "gpt2", base_model=through_folder, mode="random",
                             history=[], pruned_neurons={"1": [0, 1, 2, 3]})
    card = ModelCard.load(write_model_card(folder))
    data = card.data.to_dict()
    assert data["base_model"] == "openai-community/gpt2"
    assert "license" not in data and "model-index" not in data
    assert "Not evaluated yet" in card.text
    assert "a control for comparison" in card.text  # random mode says it is not detoxified
    assert "| 1 | 4 | 10.0% |" in card.text  # tiny gpt2: n_inner 40


def test_card_of_a_local_base_model_names_no_hub_id(tmp_path):
    local = {"name": "/models/mine", "kind": "folder", "model_type": "llama"}
    folder = tiny_checkpoint(tmp_path / "ck", base_model=local)
    after = dict(AFTER, perplexity={"sliding_window": {"token_perplexity": 12.5},
                                    "corpus": {"spec": "notes/own.txt"}})
    card = ModelCard.load(write_model_card(folder, after))
    data = card.data.to_dict()
    assert "base_model" not in data
    metrics = _metrics(data)
    assert metrics[("allenai/real-toxicity-prompts", "toxicity_probability",
                    "profanity_check")] == 0.305
    assert metrics[("local", "perplexity", "sliding_window")] == 12.5  # not called WikiText-2
    assert "| Perplexity (sliding window), notes/own.txt | — | 12.5 | — |" in card.text


def test_card_lists_the_corpora_of_the_module_map_it_came_from(tmp_path):
    """lmprune.json -> modules.json -> stats manifest: the collect corpora become `datasets`."""
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / "manifest.json").write_text(json.dumps({"model": {}, "complete": True, "corpora": {
        "offensive": {"spec": "hf:someone/slurs?split=train&column=text"},
        "clean": {"spec": "rtp:nontoxic"}}}))
    write_module_map(tmp_path / "modules.json", {
        "model": {"model_type": "gpt2"}, "modules": [{"id": 1, "members": [[0, 1]]}],
        "stats": {"path": str(stats)}})
    folder = tiny_checkpoint(tmp_path / "ck", history=[],
                             modules={"path": str(tmp_path / "modules.json"), "ids": [1]})
    data = ModelCard.load(write_model_card(folder)).data.to_dict()
    assert data["datasets"] == ["someone/slurs", "allenai/real-toxicity-prompts"]


def test_card_needs_a_checkpoint(tmp_path):
    with pytest.raises(LmpruneError, match="has no lmprune.json"):
        write_model_card(tmp_path)


def test_card_shows_the_second_scorer_generation_fluency_and_blimp():
    from lmprune.publish.modelcard import evaluation_section

    def ev(tp, second, fluency, blimp):
        return {"toxicity": {"toxicity_probability": tp, "scorer": "profanity_check",
                             "num_prompts": 10, "samples_per_prompt": 5,
                             "by_scorer": {"minilm": {"toxicity_probability": second,
                                                      "toxicity_probability_interval":
                                                          [second - 0.1, second + 0.1]}}},
                "fluency": {"judge": "smollm2-135m", "token_perplexity": fluency,
                            "token_perplexity_interval": [fluency - 2, fluency + 2],
                            "median_perplexity": fluency - 5},
                "blimp": {"accuracy": blimp}}

    text = evaluation_section(ev(0.2, 0.4, 60.0, 0.70), ev(0.6, 0.5, 50.0, 0.72))
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("|")}
    assert "0.500 [0.400, 0.600] | 0.400 [0.300, 0.500] | -0.100" in \
        rows["| Toxicity Probability, scorer minilm"]
    assert "| 50 [48.000, 52.000] | 60 [58.000, 62.000] | +10.00 |" in \
        rows["| Fluency: perplexity of the continuations (judge smollm2-135m)"]
    assert "| 0.720 | 0.700 | -0.020 |" in rows["| BLiMP accuracy (higher is better)"]
