"""Module scores: input-side specificity, output-side specificity, causal effect and controls.

The causal effect of a neuron set S is what zeroing it does to the language-model loss:
    causal(S) = [loss_off(S zeroed) - loss_off] - [loss_clean(S zeroed) - loss_clean]
A module that writes offensive text raises the offensive loss far more than the clean loss.
It is measured exactly (a forward pass with S zeroed) for the candidates that matter, and
screened for every module by a first-order estimate from one backward pass: with a gate g = 1
multiplying each activation, zeroing neuron j changes the loss by about -dL/dg_j.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmprune.arch import NeuronMap
from lmprune.hooks import NeuronHooks

Neurons = dict[int, list[int]]  # {layer: [neuron, ...]}


def as_layer_dict(members: list[tuple[int, int]]) -> Neurons:
    out: Neurons = {}
    for layer, neuron in members:
        out.setdefault(int(layer), []).append(int(neuron))
    return out


@dataclass
class TokenBatches:
    """Pre-tokenized held-out texts: right-padded batches with NLL labels (-100 on padding)."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (ids, mask, labels)
    tokens: int

    @classmethod
    def build(cls, tokenizer, texts: list[str], max_length: int, batch_size: int,
              device: str, targets: list[int] | None = None) -> TokenBatches:
        """`targets`: score only the positions that predict one of these tokens (the loss on
        offensive words rather than on every word of an offensive sentence)."""
        batches, tokens = [], 0
        tokenizer.padding_side = "right"
        keep = torch.as_tensor(targets) if targets is not None else None
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            if keep is not None:
                labels = labels.masked_fill(~torch.isin(labels, keep), -100)
            tokens += int((labels[:, 1:] != -100).sum())
            batches.append((enc.input_ids.to(device), enc.attention_mask.to(device),
                            labels.to(device)))
        return cls(batches, tokens)


def summed_nll(model: nn.Module, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [batch, pos-1, vocab]
    return nn.functional.cross_entropy(logits.float().transpose(1, 2), labels[:, 1:],
                                       ignore_index=-100, reduction="sum")


class CausalScorer:
    """Loss of a model on held-out offensive and clean text, with neuron sets zeroed."""

    def __init__(self, model: nn.Module, offensive: TokenBatches, clean: TokenBatches):
        self.model, self.offensive, self.clean = model, offensive, clean
        self.nmap = NeuronMap(model)
        self.base = self.losses({})

    @torch.no_grad()
    def _loss(self, data: TokenBatches, zero: Neurons) -> float:
        index = {layer: torch.as_tensor(idx, device=data.batches[0][0].device)
                 for layer, idx in zero.items() if idx}

        def ablate(layer, acts):  # acts [batch, pos, d_mlp]
            if layer in index:
                return acts.index_fill(-1, index[layer], 0.0)
            return None

        total = 0.0
        with NeuronHooks(self.model, ablate, neuron_map=self.nmap):
            for ids, mask, labels in data.batches:
                total += float(summed_nll(self.model, ids, mask, labels))
        return total / data.tokens

    def losses(self, zero: Neurons) -> tuple[float, float]:
        return self._loss(self.offensive, zero), self._loss(self.clean, zero)

    def effect(self, zero: Neurons) -> dict:
        off, clean = self.losses(zero)
        d_off, d_clean = off - self.base[0], clean - self.base[1]
        # selectivity in [-1, 1]: 1 when only the offensive loss moves; pruning by `causal`
        # alone favours neurons that hurt everything a bit more on offensive text
        spread = abs(d_off) + abs(d_clean)
        return {"causal": d_off - d_clean, "loss_delta_offensive": d_off,
                "loss_delta_clean": d_clean,
                "selectivity": (d_off - d_clean) / spread if spread > 0 else 0.0}

    def attribution(self) -> np.ndarray:
        """First-order causal score of zeroing each neuron alone: [L, W] (off minus clean)."""
        widths = self.nmap.widths
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            result = []
            for data in (self.offensive, self.clean):
                gates = [torch.ones(w, device=data.batches[0][0].device, requires_grad=True)
                         for w in widths]
                with NeuronHooks(self.model, lambda layer, acts, g=gates: acts * g[layer],
                                 neuron_map=self.nmap):
                    for ids, mask, labels in data.batches:
                        (summed_nll(self.model, ids, mask, labels) / data.tokens).backward()
                # zeroing g_j from 1 to 0 changes the loss by about -dL/dg_j
                result.append(-torch.stack([g.grad for g in gates]).cpu().double().numpy())
        finally:
            for p in params:
                p.requires_grad_(True)
        return result[0] - result[1]


def random_control_sets(members: Neurons, widths: list[int], count: int,
                        rng: np.random.Generator) -> list[Neurons]:
    """Random neuron sets with the same per-layer counts as `members`, avoiding its neurons."""
    sets = []
    for _ in range(count):
        control = {}
        for layer, idx in members.items():
            pool = np.setdiff1d(np.arange(widths[layer]), idx)
            control[layer] = sorted(rng.choice(pool, size=min(len(idx), len(pool)),
                                               replace=False).tolist())
        sets.append(control)
    return sets


def control_summary(value: float, controls: list[float]) -> dict:
    arr = np.asarray(controls, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")
    return {
        "control_mean": float(arr.mean()),
        "control_std": std,
        "control_percentile": float((arr < value).mean()),
        "control_z": (value - float(arr.mean())) / std if std > 0 else float("nan"),
    }


def toxic_token_ids(tokenizer, offensive: list[str], clean: list[str], top: int = 100,
                    min_count: int = 3, prior: float = 1.0) -> list[int]:
    """Tokens frequent in the offensive corpus and rare in the clean one (smoothed log-odds)."""
    off = Counter(t for text in offensive for t in tokenizer(text).input_ids)
    cln = Counter(t for text in clean for t in tokenizer(text).input_ids)
    n_off, n_cln, vocab = sum(off.values()), sum(cln.values()), len(tokenizer)
    special = set(tokenizer.all_special_ids)
    scored = [
        (np.log((c + prior) / (n_off + prior * vocab))
         - np.log((cln[t] + prior) / (n_cln + prior * vocab)), t)
        for t, c in off.items() if c >= min_count and t not in special
    ]
    scored.sort(reverse=True)
    return [t for _, t in scored[:top]]


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
                     attribution: np.ndarray | None = None) -> list[dict]:
    """Causal scores of every module, exact for the `exact` best screened, with controls.

    Controls are random same-layer sets of the same size. Every module gets first-order
    (attribution) controls; the `exact_controls` best also get exactly measured ones.
    """
    if attribution is None:
        attribution = scorer.attribution()  # [L, W]
    widths = scorer.nmap.widths
    rng = np.random.default_rng(seed)

    def approx(neurons: Neurons) -> float:
        return float(sum(attribution[layer, idx].sum() for layer, idx in neurons.items()))

    results = []
    for members in modules:
        sets = random_control_sets(members, widths, controls, rng)
        results.append({"members": members, "controls": sets, "causal_approx": approx(members),
                        "approx": control_summary(approx(members), [approx(s) for s in sets])})
    order = np.argsort([-r["causal_approx"] for r in results])
    n_exact = min(exact, len(results))
    bar = tqdm(total=n_exact + min(exact_controls, n_exact) * controls, desc="causal scoring",
               unit="ablation")
    for rank, i in enumerate(order[:n_exact]):
        res = results[i]
        res.update(scorer.effect(res["members"]))
        bar.update(1)
        if rank < exact_controls:
            values = []
            for control in res["controls"]:
                values.append(scorer.effect(control)["causal"])
                bar.update(1)
            res["exact"] = control_summary(res["causal"], values)
            res["exact_control_values"] = values
    bar.close()
    return results
