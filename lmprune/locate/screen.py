"""Locate's module screen: the first-order estimate of every module's score (and of output-side
promotion of the toxic tokens), exact ablations for the best screened, with random controls."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmprune.core.ablation import (
    CausalScorer,
    Neurons,
    control_summary,
    derive_scores,
    random_control_sets,
    rule_key,
)
from lmprune.core.arch import NeuronMap


@torch.no_grad()
def output_promotion(model: nn.Module, toxic_ids: list[int]) -> np.ndarray:
    """How much each neuron's output weights promote the toxic tokens: [L, W].

    The neuron's value vector (its column of the output projection) is read through the
    unembedding; its logits are standardised over the vocabulary, and the score is their mean
    over the toxic tokens (Geva et al. 2022; Lee et al. 2024). The final norm is ignored.
    """
    nmap = NeuronMap(model)
    unembed = model.get_output_embeddings().weight.double()  # [vocab, d_model]
    mu = unembed.mean(0)  # [d_model]
    cov = unembed.T @ unembed / unembed.shape[0] - torch.outer(mu, mu)  # [d_model, d_model]
    toxic = unembed[torch.as_tensor(toxic_ids, device=unembed.device)]  # [T, d_model]
    rows = []
    for layer in range(nmap.num_layers):
        weight = nmap.output_projection(layer).weight.double()
        values = weight if not nmap.layout.conv1d else weight.T  # [d_model, W]
        mean = mu @ values  # [W]
        std = torch.einsum("dw,de,ew->w", values, cov, values).clamp_min(1e-12).sqrt()
        rows.append((((toxic @ values) - mean) / std).mean(0))
    return torch.stack(rows).cpu().numpy()


def screen_and_score(scorer: CausalScorer, modules: list[Neurons], exact: int, controls: int,
                     exact_controls: int, seed: int,
                     attribution: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Scores of every module, exact for the `exact` best screened, with controls.

    The screen ranks modules by the first-order estimate of the rule's score (`rule_key`:
    guarded where general text is scored). Controls are random same-layer sets of the same
    size. Every module gets first-order controls; the `exact_controls` best also get exactly
    measured ones. Control statistics are of `causal` and of the rule's score.
    """
    if attribution is None:
        attribution = scorer.attribution_by_loss()  # {loss: [L, W]}
    per_neuron = derive_scores(attribution, scorer.general_weight)  # {score: [L, W]}
    key = rule_key(per_neuron)
    widths = scorer.nmap.widths
    rng = np.random.default_rng(seed)

    def approx(neurons: Neurons, score: str) -> float:
        return float(sum(per_neuron[score][layer, idx].sum() for layer, idx in neurons.items()))

    results = []
    for members in modules:
        sets = random_control_sets(members, widths, controls, rng)
        res = {"members": members, "controls": sets,
               "approx_scores": {s: approx(members, s) for s in per_neuron},
               "approx": control_summary(approx(members, "causal"),
                                         [approx(s, "causal") for s in sets])}
        if key != "causal":
            res["approx_rule"] = control_summary(res["approx_scores"][key],
                                                 [approx(s, key) for s in sets])
        results.append(res)
    order = np.argsort([-r["approx_scores"][key] for r in results], kind="stable")
    n_exact = min(exact, len(results))
    bar = tqdm(total=n_exact + min(exact_controls, n_exact) * controls, desc="causal scoring",
               unit="ablation")
    for rank, i in enumerate(order[:n_exact]):
        res = results[i]
        res.update(scorer.effect(res["members"]))
        bar.update(1)
        if rank < exact_controls:
            effects = []
            for control in res["controls"]:
                effects.append(scorer.effect(control))
                bar.update(1)
            values = [e["causal"] for e in effects]
            res["exact"] = control_summary(res["causal"], values)
            res["exact_control_values"] = values
            if key != "causal":
                res["exact_rule"] = control_summary(res[key], [e[key] for e in effects])
                res["exact_rule_values"] = [e[key] for e in effects]
    bar.close()
    return results
