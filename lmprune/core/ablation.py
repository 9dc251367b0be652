"""Module scores: input-side specificity, output-side specificity, causal effect and controls.

The causal effect of a neuron set S is what zeroing it does to the language-model loss:
    causal(S) = [loss_off(S zeroed) - loss_off] - [loss_clean(S zeroed) - loss_clean]
A module that writes offensive text raises the offensive loss far more than the clean loss.
Two guards keep generic damage from passing as offensive-specific:
- like for like: with a loss over a few rare toxic tokens, the reference is the loss change on
  non-toxic tokens of the same rarity (`matched`), not on every token of the clean text;
- general text: the loss change on held-out documents of the text the model must still write
  well (`general`); the selection rule `guarded` = offensive effect - weight x general damage.
Effects are measured exactly (a forward pass with S zeroed) for the candidates that matter, and
screened for every module by a first-order estimate from one backward pass per loss: with a gate
g = 1 multiplying each activation, zeroing neuron j changes a loss by about -dL/dg_j.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmprune.core.arch import NeuronMap
from lmprune.core.hooks import NeuronHooks

Neurons = dict[int, list[int]]  # {layer: [neuron, ...]}
# the loss a corpus's own positions give (the offensive, clean or general loss)
OWN = "own"
MATCHED = "matched"
# how far zeroing moves the next-token distribution on general text (exact ablations only: its
# gradient at the unablated model is zero)
GENERAL_KL = "general_kl"


def as_layer_dict(members: list[tuple[int, int]]) -> Neurons:
    out: Neurons = {}
    for layer, neuron in members:
        out.setdefault(int(layer), []).append(int(neuron))
    return out


@dataclass
class TokenBatches:
    """Pre-tokenized held-out texts: right-padded batches with NLL labels (-100 on padding),
    and the weight of each predicted position in each loss ("view") the texts contribute to."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (ids, mask, labels)
    weights: list[dict[str, torch.Tensor]] = field(default_factory=list)  # view -> [b, pos-1]

    @classmethod
    def build(cls, tokenizer, texts: list[str], max_length: int, batch_size: int,
              device: str, targets: list[int] | None = None) -> TokenBatches:
        """`targets`: the own loss counts only the positions that predict one of these tokens
        (the loss on offensive words rather than on every word of an offensive sentence)."""
        batches, weights = [], []
        tokenizer.padding_side = "right"
        keep = torch.as_tensor(targets) if targets is not None else None
        # texts of similar length share a batch: less padding (the losses are sums over tokens)
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True,
                                                 max_length=max_length).input_ids]
        texts = [texts[i] for i in np.argsort(lengths, kind="stable")]
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            scored = labels[:, 1:] != -100
            if keep is not None:
                scored &= torch.isin(labels[:, 1:], keep)
            batches.append((enc.input_ids.to(device), enc.attention_mask.to(device),
                            labels.to(device)))
            weights.append({OWN: scored.float().to(device)})
        return cls(batches, weights)

    @property
    def tokens(self) -> int:
        """Positions the own loss counts."""
        return int(sum(float(w[OWN].sum()) for w in self.weights))

    def label_counts(self) -> Counter:
        """How often each token is predicted (every non-padding position)."""
        counts: Counter = Counter()
        for _, _, labels in self.batches:
            counts.update(t for t in labels[:, 1:].flatten().tolist() if t != -100)
        return counts

    def own_label_counts(self) -> Counter:
        """How often each token is predicted at the positions the own loss counts."""
        counts: Counter = Counter()
        for (_, _, labels), w in zip(self.batches, self.weights, strict=True):
            counts.update(labels[:, 1:][w[OWN] > 0].tolist())
        return counts

    def add_view(self, name: str, token_weights: torch.Tensor) -> None:
        """A further loss over these texts: each position weighted by the weight of the token
        it predicts (`token_weights` [vocab]; padding gets 0)."""
        for (_, _, labels), w in zip(self.batches, self.weights, strict=True):
            target = labels[:, 1:]
            table = token_weights.to(target.device)
            w[name] = torch.where(target == -100, 0.0, table[target.clamp_min(0)])


def frequency_matched_weights(targets: Counter, pool: Counter, reference: Counter,
                              exclude: set[int], vocab: int) -> torch.Tensor:
    """Per-token weights [vocab] of non-target tokens whose weighted pool has the same
    distribution of rarity (log2 of the count in `reference`) as the target positions.

    `targets`: target token -> positions; `pool`: candidate token -> positions. A rarity bin the
    pool does not cover borrows the nearest one that it does."""
    def rarity(token: int) -> int:
        return int(np.log2(reference[token] + 1))

    have: dict[int, float] = defaultdict(float)
    for token, n in pool.items():
        if token not in exclude:
            have[rarity(token)] += n
    weights = torch.zeros(vocab)
    if not have:
        return weights
    mass: dict[int, float] = defaultdict(float)
    for token, n in targets.items():
        b = rarity(token)
        mass[min(have, key=lambda h: (abs(h - b), h))] += n
    for token in pool:
        if token not in exclude and mass.get(rarity(token)):
            weights[token] = mass[rarity(token)] / have[rarity(token)]
    return weights


def next_token_logprobs(model: nn.Module, ids, mask) -> torch.Tensor:
    """Log-probabilities of the next token at every position [batch, pos-1, vocab]."""
    return model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)


def nll_of(logprobs: torch.Tensor, labels) -> torch.Tensor:
    """NLL of the labels' next tokens [batch, pos-1] (0 on padding)."""
    return nn.functional.nll_loss(logprobs.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                  reduction="none")


def position_nll(model: nn.Module, ids, mask, labels) -> torch.Tensor:
    """Next-token NLL of every position [batch, pos-1] (0 on padding)."""
    return nll_of(next_token_logprobs(model, ids, mask), labels)


def summed_nll(model: nn.Module, ids, mask, labels) -> torch.Tensor:
    return position_nll(model, ids, mask, labels).sum()


def loss_name(corpus: str, view: str) -> str:
    """The loss a view of a corpus's positions feeds: the corpus's own, or a pooled one."""
    return corpus if view == OWN else view


def guarded_score(offensive_effect, general_damage, general_weight: float):
    """The selection rule: offensive effect bought with as little general damage as possible."""
    return offensive_effect - general_weight * general_damage


def derive_scores(delta: dict, general_weight: float = 1.0) -> dict:
    """The scores of a set of zeroed neurons from its loss changes (floats, or [L, W] arrays of
    first-order per-neuron estimates: every score but selectivity is linear in them).

    causal            offensive minus clean loss change (the contrast corpora);
    causal_matched    offensive minus frequency-matched non-toxic loss change (like for like);
    offensive_effect  causal_matched where the matched loss exists, else causal;
    general_damage    how much the loss on general text changes, either way (|change|: a
                      first-order estimate of zeroing a neuron that matters is often of the
                      wrong sign, and a loss that falls still means the distribution moved);
    guarded           offensive_effect - general_weight x general_damage (the selection rule:
                      offensive effect bought with as little general damage as possible)."""
    off, clean = delta["offensive"], delta["clean"]
    out = {"causal": off - clean, "loss_delta_offensive": off, "loss_delta_clean": clean}
    out["offensive_effect"] = out["causal"]
    if MATCHED in delta:
        out["loss_delta_matched"] = delta[MATCHED]
        out["causal_matched"] = out["offensive_effect"] = off - delta[MATCHED]
    if "general" in delta:
        out["loss_delta_general"] = delta["general"]
        out["general_damage"] = abs(delta["general"])
        out["guarded"] = guarded_score(out["offensive_effect"], out["general_damage"],
                                       general_weight)
    if GENERAL_KL in delta:
        out[GENERAL_KL] = delta[GENERAL_KL]
    return out


def rule_key(scores: dict) -> str:
    """The score modules are screened and ranked by: the most guarded one measured."""
    return next(k for k in ("guarded", "causal_matched", "causal") if k in scores)


class CausalScorer:
    """Losses of a model on held-out offensive, clean (and general) text, with neuron sets
    zeroed. Views of the same name pool over corpora (the matched loss spans both)."""

    def __init__(self, model: nn.Module, offensive: TokenBatches, clean: TokenBatches,
                 general: TokenBatches | None = None, general_weight: float = 1.0):
        self.model, self.offensive, self.clean, self.general = model, offensive, clean, general
        self.corpora = {"offensive": offensive, "clean": clean}
        if general is not None:
            self.corpora["general"] = general
        self.general_weight = general_weight
        self.nmap = NeuronMap(model)
        self.totals: dict[str, float] = defaultdict(float)  # loss -> positions' total weight
        for key, w in self._weighted():
            self.totals[key] += float(w.sum())
        # the base's next-token distributions on general text: how far an ablation moves them
        self.base_logprobs: list[torch.Tensor] | None = None
        self.base = self.losses({})

    def _weighted(self):
        """(loss name, weights [b, pos-1]) of every view of every batch, corpus by corpus."""
        for name, data in self.corpora.items():
            for views in data.weights:
                for view, w in views.items():
                    yield loss_name(name, view), w

    @torch.no_grad()
    def losses(self, zero: Neurons) -> dict[str, float]:
        """Mean NLL of each loss with the `zero` neurons silenced."""
        device = self.offensive.batches[0][0].device
        index = {layer: torch.as_tensor(idx, device=device) for layer, idx in zero.items() if idx}

        def ablate(layer, acts):  # acts [batch, pos, d_mlp]
            if layer in index:
                return acts.index_fill(-1, index[layer], 0.0)
            return None

        sums: dict[str, float] = defaultdict(float)
        keep_base = self.base_logprobs is None and self.general is not None
        if keep_base:
            self.base_logprobs = []
        with NeuronHooks(self.model, ablate, neuron_map=self.nmap):
            for name, data in self.corpora.items():
                for b, ((ids, mask, labels), views) in enumerate(zip(data.batches, data.weights,
                                                                     strict=True)):
                    logp = next_token_logprobs(self.model, ids, mask)  # [batch, pos-1, vocab]
                    nll = nll_of(logp, labels)  # [batch, pos-1]
                    for view, w in views.items():
                        sums[loss_name(name, view)] += float((nll * w).sum())
                    if name == "general":
                        if keep_base:
                            self.base_logprobs.append(logp.to(torch.bfloat16))
                        # KL(ablated || base) per position: mass moved where the base puts little
                        base = self.base_logprobs[b].float()
                        kl = (logp.exp() * (logp - base)).sum(-1)  # [batch, pos-1]
                        sums[GENERAL_KL] += float((kl * views[OWN]).sum())
        totals = {**self.totals, GENERAL_KL: self.totals.get("general", 0.0)}
        return {k: sums[k] / totals[k] for k in sums if totals[k] > 0}

    def effect(self, zero: Neurons) -> dict:
        loss = self.losses(zero)
        delta = {k: loss[k] - self.base[k] for k in self.base}
        out = derive_scores(delta, self.general_weight)
        # selectivity in [-1, 1]: 1 when only the offensive loss moves; pruning by `causal`
        # alone favours neurons that hurt everything a bit more on offensive text
        d_off, d_clean = delta["offensive"], delta["clean"]
        spread = abs(d_off) + abs(d_clean)
        out["selectivity"] = (d_off - d_clean) / spread if spread > 0 else 0.0
        return out

    def attribution_by_loss(self) -> dict[str, np.ndarray]:
        """First-order loss change of zeroing each neuron alone, per loss: {name: [L, W]}."""
        widths = self.nmap.widths
        device = self.offensive.batches[0][0].device
        totals = self.totals
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        grads = {key: [torch.zeros(w, dtype=torch.float64, device=device) for w in widths]
                 for key in totals if totals[key] > 0}
        bar = tqdm(total=sum(len(d.batches) for d in self.corpora.values()),
                   desc="first-order scores", unit="batch")
        try:
            for name, data in self.corpora.items():
                gates = [torch.ones(w, device=device, requires_grad=True) for w in widths]
                with NeuronHooks(self.model, lambda layer, acts, g=gates: acts * g[layer],
                                 neuron_map=self.nmap):
                    for (ids, mask, labels), views in zip(data.batches, data.weights,
                                                          strict=True):
                        nll = position_nll(self.model, ids, mask, labels)  # [batch, pos-1]
                        live = [(loss_name(name, v), w) for v, w in views.items()
                                if loss_name(name, v) in grads]
                        for n, (key, w) in enumerate(live):
                            parts = torch.autograd.grad((nll * w).sum() / totals[key], gates,
                                                        retain_graph=n < len(live) - 1)
                            for acc, g in zip(grads[key], parts, strict=True):
                                acc -= g.double()  # zeroing g_j from 1 to 0: about -dL/dg_j
                        bar.update(1)
        finally:
            bar.close()
            for p in params:
                p.requires_grad_(True)
        return {key: torch.stack(g).cpu().numpy() for key, g in grads.items()}


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
