"""Fluency of what a model writes: the perplexity of its sampled continuations, each given its
prompt, under a judge model (DExperts and GeDi report it with GPT-2 XL as the judge).

A pruned model can score as non-toxic by writing nonsense; perplexity on a fixed text does not
see that, this does. The judge scores text: it may have another tokenizer than the model that
wrote the continuations. Each prompt is encoded and prefilled once, its cache repeated to the
prompt's k continuations, which are then scored in one forward pass (no decoding loop), so the
judge costs a fraction of the sampling it scores (bench/eval.py measures the ratio).

- `token_perplexity`: exp(total NLL / total tokens) over every continuation token;
- `median_perplexity`: the median of the per-continuation perplexities (robust to a few
  degenerate continuations, which token weighting lets dominate);
- a percentile-bootstrap 95% interval of the token perplexity, resampling prompts.
Empty continuations (EOS first) have no token to score and are counted apart.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmprune.core.config import Need
from lmprune.core.errors import LmpruneError
from lmprune.core.lineage import BASE
from lmprune.evaluate.generate import PromptBatch, cache_keyword, encode_prompts, prefill


def encode_continuations(tokenizer, prompt_ids: list[int], prompt: str,
                         continuations: list[str]) -> tuple[list[list[int]], int]:
    """The judge's token ids of each continuation after the prompt's (`prompt_ids`, as
    `encode_prompts` gives them), and how many had to be encoded alone because the prompt's last
    token merged with the continuation's first characters (such a continuation is scored as its
    own tokens after the unmerged prompt)."""
    encoded, alone = [], 0
    for text in continuations:
        full = tokenizer(prompt + text)["input_ids"]
        if full[:len(prompt_ids)] == prompt_ids:
            ids = full[len(prompt_ids):]
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            alone += 1
        encoded.append(ids)
    return encoded, alone


@torch.inference_mode()
def continuation_nll(model, prompt_ids: list[list[int]], continuation_ids: list[list[list[int]]],
                     pad_id: int, rows_per_batch: int = 256,
                     progress: bool = True) -> list[list[np.ndarray]]:
    """Per-token NLL of every continuation given its prompt: [prompt][sample] -> [tokens].

    Prompts are batched by length (left-padded); each batch is prefilled once and its cache
    repeated to one row per continuation; the continuations (right-padded) go in one pass.
    """
    device = next(model.parameters()).device
    results: list[list[np.ndarray]] = [[] for _ in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    samples = max(len(c) for c in continuation_ids)
    prompts_per_batch = max(1, rows_per_batch // max(samples, 1))
    bar = tqdm(total=len(order), desc="fluency judge", unit="prompt", disable=not progress)
    for start in range(0, len(order), prompts_per_batch):
        indices = order[start:start + prompts_per_batch]
        length = max(len(prompt_ids[i]) for i in indices)
        input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        for row, i in enumerate(indices):
            input_ids[row, length - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
            mask[row, length - len(prompt_ids[i]):] = 1
        # every prompt of a batch gets `samples` rows; prompts with fewer continuations pad
        conts = [continuation_ids[i][s] if s < len(continuation_ids[i]) else []
                 for i in indices for s in range(samples)]
        width = max(1, max(map(len, conts)))
        cache, first_logits, row_mask, next_position = prefill(
            model, PromptBatch(indices, input_ids, mask), samples, device)
        cache.batch_repeat_interleave(samples)
        cont = torch.full((len(conts), width), pad_id, dtype=torch.long)
        cont_mask = torch.zeros((len(conts), width), dtype=torch.long)
        for row, ids in enumerate(conts):
            cont[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            cont_mask[row, :len(ids)] = 1
        cont, cont_mask = cont.to(device), cont_mask.to(device)
        # token 0 is predicted by the prompt's last logits, token j by the continuation's j-1:
        # the last continuation token is never an input, so it is left out of the pass
        nll = F.cross_entropy(first_logits.float(), cont[:, 0], reduction="none")  # [rows]
        nll = nll.double().cpu().numpy()[:, None]
        if width > 1:
            logits = model(input_ids=cont[:, :-1],
                           attention_mask=torch.cat([row_mask, cont_mask[:, :-1]], dim=-1),
                           position_ids=next_position + torch.arange(width - 1, device=device),
                           use_cache=True, **{cache_keyword(model): cache}).logits
            # flat rows: cross_entropy over a [rows, vocab, pos] view is much slower on CPUs
            rest = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                   cont[:, 1:].reshape(-1), reduction="none")
            nll = np.concatenate([nll, rest.view(len(conts), width - 1).double().cpu().numpy()],
                                 axis=1)  # [rows, width]
        for row, ids in enumerate(conts):
            n, s = divmod(row, samples)
            if s < len(continuation_ids[indices[n]]):
                results[indices[n]].append(nll[row, :len(ids)])
        bar.update(len(indices))
    bar.close()
    return results


def judge_fluency(judge, tokenizer, prompts: list[str], continuations: list[list[str]],
                  judge_identity: dict, bootstrap: int = 1000, seed: int = 0,
                  rows_per_batch: int | None = None, progress: bool = True) -> dict:
    """The `fluency` result block, plus `per_continuation` perplexities ([prompt][sample], None
    for an empty continuation) for the records file."""
    if len(prompts) != len(continuations) or not prompts:
        raise LmpruneError("fluency needs one list of continuations per prompt")
    started = time.perf_counter()
    prompt_ids = encode_prompts(tokenizer, prompts)
    cont_ids, alone = [], 0
    for ids, prompt, texts in zip(prompt_ids, prompts, continuations, strict=True):
        encoded, n = encode_continuations(tokenizer, ids, prompt, texts)
        cont_ids.append(encoded)
        alone += n
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(judge.parameters()).device
    # the logits of a batch are [rows, tokens, vocab]: a few hundred MB at 100 rows x 20 tokens
    # x 49K (SmolLM2), so CPUs take smaller batches than the sampler's
    rows = rows_per_batch or (1024 if device.type == "cuda" else 100)
    nlls = continuation_nll(judge, prompt_ids, cont_ids, pad_id, rows, progress)

    sums = np.array([sum(float(t.sum()) for t in row) for row in nlls])  # [prompts]
    counts = np.array([sum(t.size for t in row) for row in nlls], dtype=np.float64)
    if counts.sum() == 0:
        raise LmpruneError("every continuation is empty: there is no text for the fluency judge")
    per_cont = [[float(math.exp(t.mean())) if t.size else None for t in row] for row in nlls]
    flat = [p for row in per_cont for p in row if p is not None]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(prompts), size=(bootstrap, len(prompts)))  # [resamples, prompts]
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = np.exp(sums[picks].sum(1) / counts[picks].sum(1))
    low, high = np.nanpercentile(resampled, [2.5, 97.5])
    return {
        "judge": judge_identity.get("name"),
        "judge_model": judge_identity,
        "token_perplexity": float(math.exp(sums.sum() / counts.sum())),
        "token_perplexity_interval": [float(low), float(high)],
        "median_perplexity": float(np.median(flat)),
        "mean_nll": float(sums.sum() / counts.sum()),
        "tokens": int(counts.sum()),
        "continuations_scored": len(flat),
        "empty_continuations": sum(p is None for row in per_cont for p in row),
        "encoded_alone": alone,
        "method": "NLL of each continuation's judge tokens given its prompt (prompt prefilled "
                  "once per prompt); token-weighted and median per-continuation perplexity",
        "elapsed_s": round(time.perf_counter() - started, 3),
        "per_continuation": per_cont,
    }


def measurement_needs(scorer: str, extra_scorers: list[str], judge: str,
                      device: str) -> list[Need]:
    """What a toxicity measurement loads, for a runner's check before its first stage: each
    scorer (by the config field naming it) and the fluency judge unless it is skipped or the
    checkpoint's own base."""
    found = [Need("scorer", spec, device, "scorer" if spec == scorer else "extra_scorers")
             for spec in [scorer, *extra_scorers]]
    if judge.lower() not in ("none", BASE):
        found.append(Need("judge", judge, device, "fluency_judge"))
    return found
