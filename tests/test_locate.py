"""Locate: graphs from Gram statistics, clustering, n-cut, scores against controls."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from planted import PLANTED, corpora, planted_setup
from sklearn.metrics import adjusted_rand_score
from tiny_models import tiny_tokenizer

from lmprune.cli import main
from lmprune.core.errors import LmpruneError
from lmprune.locate.cluster import spectral
from lmprune.locate.command import LocateConfig, locate
from lmprune.locate.graph import correlation_from_gram, knn_affinity, ncut, shuffle_weights


def test_correlation_from_gram_equals_corrcoef_and_masks_dead_neurons():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    acts[:, 2] = 1.5  # dead: constant
    x = torch.tensor(acts)
    corr, alive = correlation_from_gram(x.T @ x, x.sum(0), len(x))
    assert alive.tolist() == [True, True, False, True, True, True]
    live = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(corr[np.ix_(live, live)], np.corrcoef(acts[:, live].T),
                               atol=1e-10)
    assert not np.isnan(corr).any() and (corr[2] == 0).all()


def _reference_ncut(dense, labels):
    total = 0.0
    for c in set(labels):
        inside = [i for i in range(len(labels)) if labels[i] == c]
        outside = [i for i in range(len(labels)) if labels[i] != c]
        cut = sum(dense[i][j] for i in inside for j in outside)
        vol = sum(dense[i][j] for i in inside for j in range(len(labels)))
        total += cut / vol
    return total


def test_ncut_matches_a_reference_and_shuffle_keeps_structure():
    rng = np.random.default_rng(1)
    dense = rng.random((9, 9)) * (rng.random((9, 9)) < 0.5)
    dense = np.triu(dense, 1)
    dense = dense + dense.T
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert ncut(sp.csr_matrix(dense), labels) == pytest.approx(_reference_ncut(dense, labels))
    shuffled = shuffle_weights(sp.csr_matrix(dense), rng).toarray()
    assert ((shuffled > 0) == (dense > 0)).all()
    np.testing.assert_allclose(np.sort(shuffled[shuffled > 0]), np.sort(dense[dense > 0]))
    np.testing.assert_allclose(shuffled, shuffled.T)


def test_knn_keeps_positive_edges_symmetric():
    corr = np.array([[1, .9, -.5, .1], [.9, 1, .2, .3], [-.5, .2, 1, .8], [.1, .3, .8, 1]])
    graph = knn_affinity(corr, 1).toarray()
    assert (graph == graph.T).all() and (graph >= 0).all() and (np.diag(graph) == 0).all()
    assert graph[0, 1] == .9 and graph[2, 3] == .8 and graph[0, 2] == 0


def test_spectral_is_deterministic_and_finds_blocks():
    block = np.kron(np.eye(3), np.ones((5, 5))) * 0.9 + 0.05
    np.fill_diagonal(block, 0)
    a = spectral(sp.csr_matrix(block), 3, seed=4)
    assert adjusted_rand_score(a, np.repeat([0, 1, 2], 5)) == 1.0
    assert (spectral(sp.csr_matrix(block), 3, seed=4) == a).all()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_setup(tmp_path_factory.mktemp("planted"))


def _locate(root, name="m.json", **overrides):
    settings = dict(k=6, knn=7, heldout_docs=20, exact=8, controls=20, exact_controls=2,
                    shuffles=5)
    settings.update(overrides)
    return locate(LocateConfig(stats=str(root / "stats"), out=str(root / name), **settings))


def _planted_ari(result):
    truth = np.isin(np.arange(48), PLANTED)
    best = max((m for m in result["modules"] if m["layers"] == [1]),
               key=lambda m: len(set(n for _, n in m["members"]) & set(PLANTED)))
    found = np.isin(np.arange(48), [n for _, n in best["members"]])
    return adjusted_rand_score(truth, found), best


@pytest.mark.parametrize("method", ["spectral", "leiden"])
def test_locate_recovers_the_planted_module_and_beats_every_control(planted, method):
    result = _locate(planted, method=method, name=f"{method}.json")
    ari, best = _planted_ari(result)
    assert ari >= 0.9
    assert best["id"] == 0, "the planted module has the largest causal effect"
    scores = best["scores"]
    assert scores["causal_measured"] == "ablation"
    assert scores["loss_delta_offensive"] > 10 * abs(scores["loss_delta_clean"])
    assert scores["selectivity"] > 0.9
    assert len(scores["control_values"]) == 20
    assert scores["causal"] > max(scores["control_values"])
    assert scores["control_percentile"] == 1.0
    assert scores["output_promotion"] > 0
    assert scores["auroc_mean"] > 0.9
    saved = json.loads((planted / f"{method}.json").read_text())
    assert saved["format"] == "lmprune.modules" and saved["format_version"] == 1
    assert saved["model"]["model_type"] == "llama"
    assert {"ncut", "shuffled_mean", "z", "p_max"} <= set(saved["clusterability"])
    assert (planted / f"{method}_specificity.png").stat().st_size > 1000


def test_same_seed_same_modules(planted):
    a = _locate(planted, name="a.json", seed=3, exact=2, exact_controls=0)
    b = _locate(planted, name="b.json", seed=3, exact=2, exact_controls=0)
    assert [m["members"] for m in a["modules"]] == [m["members"] for m in b["modules"]]
    assert a["clusterability"]["ncut"] == b["clusterability"]["ncut"]


def test_global_scope_uses_the_candidates(planted):
    result = _locate(planted, name="g.json", scope="global", k=3, knn=5, exact=3,
                     exact_controls=0)
    members = {tuple(m) for mod in result["modules"] for m in mod["members"]}
    index = {(1, n) for n in PLANTED}
    assert index <= members


def test_toxic_token_loss_counts_only_the_offensive_targets(planted):
    """With --offensive-loss toxic-tokens the offensive loss is the NLL of the positions that
    predict an offensive-specific token ('q', 'x' here), and the planted module, which writes
    'q', moves it far more than the clean loss."""
    result = _locate(planted, name="t.json", offensive_loss="toxic-tokens", exact=4,
                     exact_controls=1, controls=5, plots=False)
    tok = tiny_tokenizer()
    toxic = {tok.convert_tokens_to_ids(t) for t in result["toxic_tokens"]}
    assert {tok.convert_tokens_to_ids("q"), tok.convert_tokens_to_ids("x")} <= toxic
    held = result["heldout"]
    texts = corpora()[0][held["offensive"]["first"]:][:held["offensive"]["documents"]]
    expected = sum(sum(t in toxic for t in tok(text).input_ids[1:64]) for text in texts)
    assert held["tokens"]["offensive"] == expected and held["offensive_loss"] == "toxic-tokens"
    ari, best = _planted_ari(result)
    assert ari >= 0.9 and best["id"] == 0
    assert best["scores"]["loss_delta_offensive"] > 10 * abs(best["scores"]["loss_delta_clean"])


def test_candidates_restrict_the_graphs_to_the_most_causal_neurons(planted):
    result = _locate(planted, name="c.json", candidates=12, k=2, exact=3, exact_controls=1,
                     controls=5, plots=False)
    per_layer = result["candidates"]["per_layer"]
    assert sum(per_layer) == 12 and per_layer[1] >= len(PLANTED)
    members = [tuple(m) for mod in result["modules"] for m in mod["members"]]
    assert len(members) <= 12 and len(set(members)) == len(members)
    best = result["modules"][0]
    assert set(PLANTED) <= {n for _, n in best["members"]} and best["layers"] == [1]
    assert best["scores"]["causal"] > max(best["scores"]["control_values"])


def test_stats_for_another_model_are_refused(planted, tmp_path):
    manifest = json.loads((planted / "stats" / "manifest.json").read_text())
    manifest["model"]["weights_sha256"] = "0" * 64
    other = tmp_path / "stats"
    other.mkdir()
    for name in ("stats.safetensors", "coact.safetensors"):
        (other / name).write_bytes((planted / "stats" / name).read_bytes())
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmpruneError, match="made for another model"):
        locate(LocateConfig(stats=str(other), model=str(planted / "model"),
                            out=str(tmp_path / "m.json")))


def test_cli_errors_on_missing_stats(tmp_path, capsys):
    assert main(["locate", "--stats", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
