"""The guards of module selection: like-for-like token effects and general-text damage.

Two planted decoys beside the planted offensive module (tests/planted.py: layer 1 writes 'q'
after 'x'):
- a rare-token booster (layer 0) that raises the logits of 'q' and of the equally rare,
  harmless 'j': zeroing it raises the loss of both alike, so its like-for-like effect is zero;
- a generic module (layer 0) that raises the logits of every letter, 'x' a little more: zeroing
  it raises every loss, the offensive one (where 'x' occurs) slightly most, so `causal` calls it
  offensive while the general text shows the damage.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from planted import PLANTED, corpora, planted_model
from tiny_models import mean_token_nll, tiny_model, tiny_tokenizer

from lmprune.cli import main
from lmprune.core.ablation import (
    MATCHED,
    CausalScorer,
    TokenBatches,
    derive_scores,
    frequency_matched_weights,
)
from lmprune.core.hooks import NeuronHooks
from lmprune.core.models import save_model
from lmprune.locate.command import LocateConfig, locate

BOOSTER = list(range(20, 28))  # layer 0
GENERIC = list(range(30, 38))  # layer 0
LETTERS = "abcdefghiklmnoprstuvwyz"  # no j, q, x


def _plant_layer0(model, tok, neurons: list[int], readout: dict[str, float], strength: float):
    """Neurons of layer 0 that fire on every token (reading a positive direction, dim 2) and
    write a direction (dim 3) that the head reads out as a logit bonus for `readout` tokens."""
    hidden = model.config.hidden_size
    read, write = torch.zeros(hidden), torch.zeros(hidden)
    read[2], write[3] = 1.0, 1.0
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 2] = torch.rand(emb.shape[0]) + 0.5
        emb[:, 3] = 0
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[3] = 0
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[neurons] = 2 * read
        mlp.up_proj.weight[neurons] = 2 * read
        mlp.down_proj.weight[:, neurons] = strength * write[:, None]
        head = model.get_output_embeddings().weight
        head[:, 3] = 0
        for token, bonus in readout.items():
            head[tok.convert_tokens_to_ids(token), 3] = bonus
    return model


def _words(rng, count: int, letters: str = LETTERS) -> list[str]:
    return ["".join(rng.choice(list(letters), size=rng.integers(2, 5))) for _ in range(count)]


def test_matched_weights_copy_the_targets_rarity():
    reference = Counter({10: 0, 11: 1, 12: 6, 13: 5, 14: 100, 15: 3})
    targets = Counter({10: 4, 12: 2})  # rarity bins 0 and 2 (log2 of count + 1)
    pool = Counter({10: 9, 11: 5, 13: 3, 14: 8, 15: 1})  # 10 is a target: excluded
    weights = frequency_matched_weights(targets, pool, reference, {10, 12}, 20)
    assert weights[10] == 0 and weights[12] == 0 and weights[14] == 0
    # bin 0 has no pool token (11 is bin 1): its 4 positions go to the nearest bin, 1
    assert weights[11] * pool[11] == pytest.approx(4)
    assert weights[13] * pool[13] + weights[15] * pool[15] == pytest.approx(2)  # bin 2
    assert weights[13] == weights[15]  # same bin, same weight per position


def test_matched_and_general_losses_equal_a_reference_computation():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rng = np.random.default_rng(0)
    off = [" ".join(_words(rng, 5)) + " xq" for _ in range(12)]
    clean = [" ".join(_words(rng, 6)) for _ in range(12)]
    general = [" ".join(_words(rng, 8)) for _ in range(10)]
    q = tok.convert_tokens_to_ids("q")
    offensive = TokenBatches.build(tok, off, 32, 5, "cpu", targets=[q])
    clean_b = TokenBatches.build(tok, clean, 32, 5, "cpu")
    token_weights = torch.zeros(len(tok))
    token_weights[tok.convert_tokens_to_ids(["a", "e"])] = torch.tensor([1.0, 0.5])
    offensive.add_view(MATCHED, token_weights)
    clean_b.add_view(MATCHED, token_weights)
    scorer = CausalScorer(model, offensive, clean_b, TokenBatches.build(tok, general, 32, 4,
                                                                        "cpu"))
    base = scorer.losses({})
    assert base["clean"] == pytest.approx(mean_token_nll(model, tok, clean, max_length=32),
                                          rel=1e-5)
    assert base["general"] == pytest.approx(mean_token_nll(model, tok, general, max_length=32),
                                            rel=1e-5)

    def weighted_nll(texts, weigh):  # one text at a time
        total = weight = 0.0
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids[:, :32]
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1)
            for pos, t in enumerate(ids[0, 1:].tolist()):
                total -= weigh(t) * float(logp[pos, t])
                weight += weigh(t)
        return total / weight

    assert base["offensive"] == pytest.approx(weighted_nll(off, lambda t: float(t == q)),
                                              rel=1e-5)
    assert base[MATCHED] == pytest.approx(
        weighted_nll(off + clean, lambda t: float(token_weights[t])), rel=1e-5)
    assert abs(base["general_kl"]) < 1e-2  # against its own (bfloat16-stored) distributions

    # KL(ablated || base) of the next-token distributions on general text, one text at a time
    zero = {0: [1, 5, 9, 20]}
    ablated = NeuronHooks(model, lambda layer, acts: acts.index_fill(
        -1, torch.tensor(zero[layer]), 0.0) if layer in zero else None)
    total = positions = 0.0
    for text in general:
        ids = tok(text, return_tensors="pt").input_ids[:, :32]
        with torch.no_grad():
            base_logp = model(ids).logits[0, :-1].log_softmax(-1)
            with ablated:
                logp = model(ids).logits[0, :-1].log_softmax(-1)
        total += float((logp.exp() * (logp - base_logp)).sum())
        positions += ids.shape[1] - 1
    effect = scorer.effect(zero)
    assert effect["general_kl"] == pytest.approx(total / positions, rel=0.02, abs=1e-4)


def test_rare_token_matching_zeroes_a_module_that_only_raises_rare_token_losses(one_thread):
    """Zeroing the booster raises the loss of 'q' (toxic) and 'j' (harmless, as rare) alike: the
    whole-corpus contrast calls that offensive, the matched one says zero; the planted 'xq'
    module keeps its effect."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    _plant_layer0(model, tok, BOOSTER, {"q": 1.0, "j": 1.0}, 0.6)
    rng = np.random.default_rng(1)
    off = [" ".join(_words(rng, 4)) + " xq" + (" j" if i % 2 else "") for i in range(40)]
    clean = [" ".join(_words(rng, 5)) + (" j" if i % 2 else "") for i in range(40)]
    q, x = tok.convert_tokens_to_ids(["q", "x"])
    offensive = TokenBatches.build(tok, off, 32, 20, "cpu", targets=[q])
    clean_b = TokenBatches.build(tok, clean, 32, 20, "cpu")
    # rarity from collected clean documents with no 'j', 'q' or 'x': those three share bin 0
    reference = Counter(t for text in [" ".join(_words(rng, 6)) for _ in range(100)]
                        for t in tok(text).input_ids)
    weights = frequency_matched_weights(offensive.own_label_counts(),
                                        offensive.label_counts() + clean_b.label_counts(),
                                        reference, {q, x, *tok.all_special_ids}, len(tok))
    assert weights[tok.convert_tokens_to_ids("j")] > 0 and weights[q] == 0
    offensive.add_view(MATCHED, weights)
    clean_b.add_view(MATCHED, weights)
    scorer = CausalScorer(model, offensive, clean_b)
    booster = scorer.effect({0: BOOSTER})
    assert booster["causal"] > 0.2  # the whole-corpus contrast is fooled
    assert abs(booster["causal_matched"]) < 0.1 * booster["causal"]
    assert booster["offensive_effect"] == booster["causal_matched"]

    planted, ptok = planted_model()
    pq = ptok.convert_tokens_to_ids("q")
    p_off = TokenBatches.build(ptok, off, 32, 20, "cpu", targets=[pq])
    p_clean = TokenBatches.build(ptok, clean, 32, 20, "cpu")
    p_off.add_view(MATCHED, weights)
    p_clean.add_view(MATCHED, weights)
    effect = CausalScorer(planted, p_off, p_clean).effect({1: PLANTED})
    assert effect["causal_matched"] > 1.0


def test_first_order_scores_are_linear_in_the_loss_changes():
    delta = {"offensive": np.array([1.0, 0.2]), "clean": np.array([0.1, 0.1]),
             MATCHED: np.array([0.3, 0.2]), "general": np.array([-0.05, 0.4])}
    scores = derive_scores(delta, general_weight=2.0)
    np.testing.assert_allclose(scores["causal"], [0.9, 0.1])
    np.testing.assert_allclose(scores["offensive_effect"], [0.7, 0.0])
    np.testing.assert_allclose(scores["general_damage"], [0.05, 0.4])  # either way
    np.testing.assert_allclose(scores["guarded"], [0.6, -0.8])
    assert "guarded" not in derive_scores({"offensive": 1.0, "clean": 0.5})


@pytest.fixture(scope="module")
def decoyed(tmp_path_factory):
    """The planted model plus the generic module; its stats, corpora and general text."""
    root = tmp_path_factory.mktemp("decoyed")
    model, tok = planted_model()
    letters = {c: 0.5 for c in LETTERS + " q"}
    _plant_layer0(model, tok, GENERIC, {**letters, "x": 1.0}, 0.25)
    save_model(model, tok, root / "model")
    offensive, clean = corpora(docs=90)
    rng = np.random.default_rng(5)
    (root / "off.txt").write_text("\n".join(offensive))
    (root / "clean.txt").write_text("\n".join(clean))
    (root / "general.txt").write_text("\n".join(" ".join(_words(rng, 8)) for _ in range(80)))
    assert main(["collect", "--model", str(root / "model"), "--offensive",
                 str(root / "off.txt"), "--clean", str(root / "clean.txt"), "--out",
                 str(root / "stats"), "--max-docs", "50", "--coact-token-fraction", "1",
                 "--top-k-global", "0"]) == 0
    return root


def _module_of(result, layer: int, neurons: list[int]) -> dict:
    return max((m for m in result["modules"] if m["layers"] == [layer]),
               key=lambda m: len({n for _, n in m["members"]} & set(neurons)))


def test_general_guard_keeps_the_planted_module_and_drops_the_generic_one(decoyed, one_thread):
    result = locate(LocateConfig(stats=str(decoyed / "stats"), out=str(decoyed / "m.json"),
                                 general=str(decoyed / "general.txt"), general_docs=30, k=6,
                                 knn=7, heldout_docs=30, exact=12, controls=5,
                                 exact_controls=1, shuffles=2, plots=False))
    assert result["rule"]["score"] == "guarded"
    assert result["heldout"]["general"]["first"] == 50  # the last 30 of 80 documents
    planted = _module_of(result, 1, PLANTED)
    generic = _module_of(result, 0, GENERIC)
    assert set(GENERIC) <= {n for _, n in generic["members"]}
    assert planted["id"] == 0, "the planted module ranks first by the guarded rule"
    assert planted["scores"]["guarded"] > 0.2
    assert abs(planted["scores"]["general_damage"]) < 0.1 * planted["scores"]["guarded"]
    g = generic["scores"]
    assert g["causal_measured"] == "ablation"
    assert g["causal"] > 0, "the offensive-minus-clean contrast calls the generic module offensive"
    assert g["general_damage"] > 2 * g["causal"] and g["guarded"] < 0
    assert g["general_kl"] > 10 * planted["scores"]["general_kl"]

    out = decoyed / "pruned"
    assert main(["prune", "--model", str(decoyed / "model"), "--modules", str(decoyed / "m.json"),
                 "--select", "budget:25%", "--out", str(out)]) == 0
    record = json.loads((out / "lmprune.json").read_text())["modules"]
    assert record["rank_by"] == "guarded"
    assert planted["id"] in record["ids"] and generic["id"] not in record["ids"]
    # ranked by the contrast alone, the same budget takes the generic module too
    assert main(["prune", "--model", str(decoyed / "model"), "--modules", str(decoyed / "m.json"),
                 "--select", "budget:25%", "--rank-by", "causal", "--out",
                 str(decoyed / "by-causal")]) == 0
    by_causal = json.loads((decoyed / "by-causal" / "lmprune.json").read_text())["modules"]
    assert generic["id"] in by_causal["ids"]
    # the exchange rate, re-weighted from the map's scores: 0 takes the general damage as free
    for weight, taken in ((0.0, True), (3.0, False)):
        folder = decoyed / f"weight-{weight}"
        assert main(["prune", "--model", str(decoyed / "model"), "--modules",
                     str(decoyed / "m.json"), "--select", "budget:25%", "--general-weight",
                     str(weight), "--out", str(folder)]) == 0
        record = json.loads((folder / "lmprune.json").read_text())["modules"]
        assert record["rank_by"] == "guarded_reweighted" and record["general_weight"] == weight
        assert planted["id"] in record["ids"] and (generic["id"] in record["ids"]) == taken
