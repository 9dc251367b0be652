"""`lmprune locate`: stats -> co-activation graphs -> modules -> scores, controls, n-cut."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmprune.core.ablation import (
    GENERAL_KL,
    MATCHED,
    CausalScorer,
    TokenBatches,
    as_layer_dict,
    derive_scores,
    frequency_matched_weights,
    rule_key,
    toxic_token_ids,
)
from lmprune.core.arch import NeuronMap
from lmprune.core.config import StageSpec, option, redeclare
from lmprune.core.errors import LmpruneError
from lmprune.core.io import check_out_file
from lmprune.core.module_map import FORMAT as MODULE_MAP_FORMAT
from lmprune.core.module_map import write_module_map
from lmprune.core.specs import DTYPES, ModelSpec
from lmprune.core.stats_folder import MANIFEST_FILE, read_stats
from lmprune.locate.cluster import cluster, clusterability
from lmprune.locate.graph import correlation_from_gram, knn_affinity
from lmprune.locate.screen import output_promotion, screen_and_score

RULES = {
    "causal": "loss change on the offensive text minus that on the clean text",
    "causal_matched": "loss change on the toxic tokens minus that on equally rare non-toxic "
                      "tokens",
    "guarded": "offensive effect (causal_matched where measured, else causal) minus "
               "general_weight x the size of the loss change on general text, either way",
}


@dataclass
class LocateConfig(ModelSpec):
    model = redeclare(None, "Model to score on (default: the one the stats name).")
    # float32, as locate always had it (it edits no weights but its scores are small loss
    # changes), and none of float16, which it never offered
    dtype = redeclare("float32", choices=[d for d in DTYPES if d != "float16"])
    # cpu unless asked, as locate always had it: its scores then do not depend on whether the
    # machine has a GPU
    device = redeclare("cpu")
    stats: str = option("", "Folder written by `lmprune collect`.")
    out: str = option("modules.json", "Module map to write (plots go beside it).")
    method: str = option("spectral", "Clustering: spectral (k clusters) or leiden (resolution).",
                         choices=["spectral", "leiden"])
    k: int = option(12, "Spectral clusters per layer (layer scope) or in all (global scope).")
    resolution: float = option(1.0, "Leiden resolution (higher: more, smaller modules).")
    scope: str = option("layer", "Graph per layer over all neurons, or one graph over the "
                        "global top-K candidates of the stats.", choices=["layer", "global"])
    candidates: int = option(0, "Cluster only the N neurons with the highest first-order "
                             "causal score (one backward pass over the held-out texts), per "
                             "layer; 0: every neuron. Modules of neurons that matter, not of "
                             "everything that co-fires.")
    knn: int = option(20, "Keep each neuron's k strongest positive correlations (0: all above "
                      "--threshold).")
    threshold: float = option(0.0, "Correlations at or below this are not edges.")
    min_size: int = option(2, "Smaller clusters are not modules.")
    heldout_docs: int = option(64, "Held-out documents per corpus for the causal scores, taken "
                               "right after the documents the stats were collected on.")
    max_length: int = option(64, "Tokens per held-out document.")
    batch_size: int = option(16, "Held-out documents per forward pass.")
    offensive_loss: str = option("all", "What the offensive loss counts: every token of the "
                                 "held-out offensive texts, or only the tokens that predict one "
                                 "of the --toxic-tokens most offensive-specific tokens (modules "
                                 "that write offensive words, not all that read them).",
                                 choices=["all", "toxic-tokens"])
    toxic_tokens: int = option(100, "Tokens most over-represented in the collected offensive "
                               "documents against the clean ones (smoothed log-odds).")
    matched: bool = option(True, "With --offensive-loss toxic-tokens, set the toxic tokens' loss "
                           "change against that of equally rare non-toxic tokens of the held-out "
                           "texts (rarity: count in the collected clean documents), not against "
                           "the mean over all clean tokens: damage raises rare tokens' loss most.")
    general: str = option("wikitext2:valid", "Text the model must still write well (default the "
                          "usual fine-tuning corpus): the loss change on its last "
                          "--general-docs documents is the general damage of a module; 'none' "
                          "to score without it. `lmprune run` sets the fine-tuning corpus and "
                          "keeps these documents out of fine-tuning.", corpus=True)
    general_docs: int = option(64, "Documents of --general scored (its last ones).")
    general_weight: float = option(1.0, "Rule: guarded = offensive effect - this x general "
                                   "damage (nats per token each); modules are screened, "
                                   "candidates chosen and modules ranked by it.")
    exact: int = option(50, "Modules scored by real ablation (best first by the first-order "
                        "screen); the rest keep the first-order estimate.")
    controls: int = option(20, "Random same-layer, same-size neuron sets per module.")
    exact_controls: int = option(5, "Modules whose controls are also ablated for real.")
    shuffles: int = option(20, "Weight-shuffled graphs for clusterability.")
    clusterability_layers: int = option(6, "Layers (evenly spaced) whose clusterability is "
                                        "measured in layer scope; 0 for all.")
    seed: int = option(0, "Seed for clustering, controls and shuffles.")
    plots: bool = option(True, "Write PNG plots beside the module map.")
    overwrite: bool = option(False, "Replace an existing --out file that is not a module map.",
                             stage_key=False)


def _layer_graphs(cfg: LocateConfig, coact: dict, candidates: np.ndarray | None = None
                  ) -> list[tuple[list[tuple[int, int]], object]]:
    """[(node ids as (layer, neuron), sparse affinity)] for the chosen scope; `candidates`
    [L, W] bool restricts the layer graphs to those neurons."""
    tokens = int(coact["tokens"]) if cfg.scope == "layer" else int(coact["global.tokens"])
    if tokens < 2:
        raise LmpruneError("the co-activation statistics saw fewer than 2 tokens")
    if cfg.scope == "global":
        if "global.gram" not in coact or coact["global.index"].numel() == 0:
            raise LmpruneError("the stats have no global candidates: collect with "
                               "--top-k-global K, or locate with --scope layer")
        corr, alive = correlation_from_gram(coact["global.gram"], coact["global.sum"], tokens)
        nodes = [tuple(map(int, row)) for row in coact["global.index"].tolist()]
        keep = np.flatnonzero(alive)
        return [([nodes[i] for i in keep],
                 knn_affinity(corr[np.ix_(keep, keep)], cfg.knn, threshold=cfg.threshold))]
    graphs = []
    for layer in range(coact["gram"].shape[0]):
        corr, alive = correlation_from_gram(coact["gram"][layer], coact["sum"][layer], tokens)
        if candidates is not None:
            alive = alive & candidates[layer]
        keep = np.flatnonzero(alive)  # dead neurons are left out of the graph
        if len(keep) < 2:
            continue
        graphs.append(([(layer, int(j)) for j in keep],
                       knn_affinity(corr[np.ix_(keep, keep)], cfg.knn, threshold=cfg.threshold)))
    return graphs


def _heldout(spec: str, used: int, count: int) -> tuple[list[str], dict]:
    from lmprune.core.data import load_corpus

    texts = load_corpus(spec).texts
    start = used if used + count <= len(texts) else max(0, len(texts) - count)
    return texts[start:start + count], {"spec": spec, "first": start, "documents": count,
                                        "overlaps_collected": start < used}


def general_heldout(spec: str, count: int) -> tuple[list[str], dict]:
    """The last `count` documents of the general corpus (fine-tuning leaves them out)."""
    from lmprune.core.data import load_corpus

    texts = load_corpus(spec).texts
    if len(texts) <= count:
        raise LmpruneError(f"--general {spec} has {len(texts)} documents; --general-docs "
                           f"{count} would leave none for fine-tuning: lower --general-docs")
    return texts[-count:], {"spec": spec, "first": len(texts) - count, "documents": count,
                            "of": len(texts)}


def _collected(corpus: dict) -> list[str]:
    """The documents a corpus of the stats manifest contributed."""
    from lmprune.core.data import load_corpus

    return load_corpus(corpus["spec"], corpus["documents"]).texts


def locate(cfg: LocateConfig) -> dict:
    from lmprune.core.models import check_identity, file_sha256

    started = time.time()
    if not cfg.stats:
        raise LmpruneError("locate needs --stats DIR (the output of `lmprune collect`)")
    check_out_file(cfg.out, MODULE_MAP_FORMAT, cfg.overwrite)
    manifest, stats, coact = read_stats(cfg.stats)
    loaded = cfg.load(cfg.model or manifest["model"]["name"])
    recorded = dict(manifest["model"], num_layers=manifest.get("num_layers"),
                    neurons_per_layer=manifest.get("neurons_per_layer"))
    check_identity(recorded, loaded.identity, NeuronMap(loaded.model), f"the stats in {cfg.stats}")
    timings = {}
    t0 = time.time()
    corpora = manifest["corpora"]
    off_texts, off_info = _heldout(corpora["offensive"]["spec"],
                                   corpora["offensive"]["documents"], cfg.heldout_docs)
    clean_texts, clean_info = _heldout(corpora["clean"]["spec"], corpora["clean"]["documents"],
                                       cfg.heldout_docs)
    tok, device = loaded.tokenizer, cfg.device
    # offensive-specific tokens from the collected documents (many more than the held-out ones)
    toxic_ids = toxic_token_ids(tok, _collected(corpora["offensive"]),
                                _collected(corpora["clean"]), top=cfg.toxic_tokens)
    targets = toxic_ids if cfg.offensive_loss == "toxic-tokens" else None
    if targets is not None and not toxic_ids:
        raise LmpruneError("--offensive-loss toxic-tokens: no token is over-represented in the "
                           "offensive corpus; use --offensive-loss all")
    offensive = TokenBatches.build(tok, off_texts, cfg.max_length, cfg.batch_size, device,
                                   targets)
    clean = TokenBatches.build(tok, clean_texts, cfg.max_length, cfg.batch_size, device)
    if offensive.tokens == 0:
        raise LmpruneError("the held-out offensive texts contain none of the toxic tokens: "
                           "raise --heldout-docs or use --offensive-loss all")
    if targets is not None and cfg.matched:
        # like for like: non-toxic tokens of the held-out texts, weighted to the toxic targets'
        # rarity in the collected clean documents
        reference = Counter(t for text in _collected(corpora["clean"])
                            for t in tok(text).input_ids)
        weights = frequency_matched_weights(offensive.own_label_counts(),
                                            offensive.label_counts() + clean.label_counts(),
                                            reference, set(toxic_ids) | set(tok.all_special_ids),
                                            len(tok))
        offensive.add_view(MATCHED, weights)
        clean.add_view(MATCHED, weights)
    general, general_info = None, None
    if cfg.general.lower() != "none":
        general_texts, general_info = general_heldout(cfg.general, cfg.general_docs)
        general = TokenBatches.build(tok, general_texts, cfg.max_length, cfg.batch_size, device)
    scorer = CausalScorer(loaded.model, offensive, clean, general, cfg.general_weight)
    # one backward pass per loss: the first-order scores of every neuron (the screen, and the
    # candidates to cluster when --candidates is set)
    attribution = scorer.attribution_by_loss()  # {loss: [L, W]}
    per_neuron = derive_scores(attribution, cfg.general_weight)  # {score: [L, W]}
    rule = rule_key(per_neuron)
    candidates = None
    if cfg.candidates > 0:
        if cfg.scope != "layer":
            raise LmpruneError("--candidates applies to --scope layer (global scope has its "
                               "own candidates from collect)")
        top = np.argsort(-per_neuron[rule], axis=None, kind="stable")[:cfg.candidates]
        candidates = np.zeros(per_neuron[rule].size, dtype=bool)
        candidates[top] = True
        candidates = candidates.reshape(per_neuron[rule].shape)
    timings["attribution_s"] = time.time() - t0

    t0 = time.time()
    graphs = _layer_graphs(cfg, coact, candidates)
    timings["graph_s"] = time.time() - t0

    t0 = time.time()
    modules, labels_by_graph = [], []
    for nodes, affinity in tqdm(graphs, desc="clustering", unit="graph"):
        k = min(cfg.k, len(nodes) // max(cfg.min_size, 1))
        labels = cluster(affinity, cfg.method, k, cfg.resolution, cfg.seed) if k >= 2 else \
            np.zeros(len(nodes), dtype=int)
        labels_by_graph.append(labels)
        for c in np.unique(labels):
            members = [nodes[i] for i in np.flatnonzero(labels == c)]
            if len(members) >= cfg.min_size:
                modules.append(sorted(members))
    if not modules:
        raise LmpruneError("clustering produced no module of --min-size or more neurons")
    timings["cluster_s"] = time.time() - t0

    t0 = time.time()
    graph_ids = range(len(graphs))
    if cfg.scope == "layer" and cfg.clusterability_layers > 0:
        graph_ids = np.unique(np.linspace(0, len(graphs) - 1, cfg.clusterability_layers)
                              .round().astype(int))
    per_graph = {}
    for g in tqdm(graph_ids, desc="clusterability", unit="graph"):
        nodes, affinity = graphs[g]
        k = min(cfg.k, len(nodes) // max(cfg.min_size, 1))
        if k >= 2:
            per_graph[int(g)] = clusterability(affinity, labels_by_graph[g], cfg.method, k,
                                               cfg.resolution, cfg.shuffles, cfg.seed)
    timings["clusterability_s"] = time.time() - t0

    t0 = time.time()
    scored = screen_and_score(scorer, [as_layer_dict(m) for m in modules], cfg.exact,
                              cfg.controls, cfg.exact_controls, cfg.seed, attribution)
    promotion = output_promotion(loaded.model, toxic_ids) if toxic_ids else None
    timings["scoring_s"] = time.time() - t0

    auroc = stats["auroc"].double().numpy()
    effect = stats["effect_size"].double().numpy()
    off_mean = stats["offensive.mean"].double().numpy()
    records = []
    for members, res in zip(modules, scored, strict=True):
        rows, cols = np.asarray(members).T
        scores = {
            "auroc_mean": float(auroc[rows, cols].mean()),
            "auroc_max": float(auroc[rows, cols].max()),
            "effect_size_mean": float(effect[rows, cols].mean()),
            **{f"{k}_approx": v for k, v in res["approx_scores"].items()},
            **{f"approx_{k}": v for k, v in res["approx"].items()},
            **{f"{rule}_approx_{k}": v for k, v in res.get("approx_rule", {}).items()},
        }
        if promotion is not None:
            # promotion of toxic tokens, weighted by how the neuron fires on offensive text
            scores["output_toxicity"] = float((promotion[rows, cols] * off_mean[rows, cols])
                                              .mean())
            scores["output_promotion"] = float(promotion[rows, cols].mean())
        measured = set(res["approx_scores"]) | {"selectivity", GENERAL_KL}
        if "causal" in res:
            scores.update({k: res[k] for k in measured if k in res}, causal_measured="ablation")
        else:
            scores.update(res["approx_scores"], causal_measured="first-order")
        if "exact" in res:
            scores.update(res["exact"])
            scores["control_values"] = res["exact_control_values"]
            if "exact_rule" in res:
                scores.update({f"{rule}_{k}": v for k, v in res["exact_rule"].items()})
                scores[f"{rule}_control_values"] = res["exact_rule_values"]
        else:
            scores.update(res["approx"])
            scores.update({f"{rule}_{k}": v for k, v in res.get("approx_rule", {}).items()})
        records.append({"members": [list(m) for m in members], "size": len(members),
                        "layers": sorted({m[0] for m in members}), "scores": scores})
    # exact scores first (best by the rule first), then the first-order-only ones
    records.sort(key=lambda r: (r["scores"]["causal_measured"] != "ablation",
                                -r["scores"][rule]))
    for i, r in enumerate(records):
        r["id"] = i

    result = {
        "model": manifest["model"],
        "num_layers": int(auroc.shape[0]),
        "neurons_per_layer": int(auroc.shape[1]),
        "stats": {"path": str(Path(cfg.stats).resolve()),
                  "manifest_sha256": file_sha256(Path(cfg.stats) / MANIFEST_FILE)},
        "settings": asdict(cfg),
        "heldout": {"offensive": off_info, "clean": clean_info, "general": general_info,
                    "offensive_loss": cfg.offensive_loss,
                    "tokens": {"offensive": offensive.tokens, "clean": clean.tokens,
                               **({"general": general.tokens} if general else {}),
                               **({MATCHED: scorer.totals[MATCHED]}
                                  if MATCHED in scorer.totals else {})},
                    "base_loss": scorer.base},
        "rule": {"score": rule, "general_weight": cfg.general_weight,
                 "definition": RULES[rule]},
        "toxic_tokens": [tok.decode([t]) for t in toxic_ids[:50]],
        "candidates": None if candidates is None else {
            "count": cfg.candidates, "rule": f"highest first-order {rule}",
            "per_layer": candidates.sum(axis=1).tolist()},
        "modules": records,
        "controls": {"num_random_sets": cfg.controls, "sampling": "same layers, same per-layer "
                     "counts, module members excluded", "exact_for_top": cfg.exact_controls},
        "clusterability": _aggregate(per_graph),
        "timings": {**timings, "total_s": time.time() - started},
    }
    write_module_map(cfg.out, result)
    if cfg.plots:
        from lmprune.locate.plots import plot_modules

        plot_modules(result, Path(cfg.out).with_suffix(""))
    return result


def _aggregate(per_graph: dict[int, dict]) -> dict:
    """Clusterability per graph and overall (Stouffer's z over graphs; the largest p)."""
    if not per_graph:
        return {}
    zs = [v["z"] for v in per_graph.values() if np.isfinite(v["z"])]
    return {
        "ncut": float(sum(v["ncut"] for v in per_graph.values())),
        "shuffled_mean": float(sum(v["shuffled_mean"] for v in per_graph.values())),
        "z": float(sum(zs) / np.sqrt(len(zs))) if zs else float("nan"),
        "p_max": max(v["p"] for v in per_graph.values()),
        "num_shuffles": next(iter(per_graph.values()))["num_shuffles"],
        "per_graph": {str(k): v for k, v in per_graph.items()},
    }


def run(cfg: LocateConfig) -> int:
    result = locate(cfg)
    best, rule = result["modules"][0], result["rule"]["score"]
    clus = result["clusterability"]
    print(f"{len(result['modules'])} modules -> {cfg.out}; best: id {best['id']}, "
          f"{best['size']} neurons in layers {best['layers']}, {rule} "
          f"{best['scores'][rule]:+.4f} (causal control z {best['scores']['control_z']:+.2f}); "
          f"clusterability z {clus.get('z', float('nan')):+.2f}")
    return 0


STAGE = StageSpec("locate", LocateConfig, run,
                  "Cluster co-activation graphs into modules; score them against controls.",
                  inputs=("stats",))
register = STAGE.register
