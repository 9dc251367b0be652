"""Fast nucleus sampling of k continuations per prompt.

Where the time goes, and what this does about it (compared with HF `generate` and
`num_return_sequences=k`, which prefills every prompt k times):
- each prompt is prefilled once; its KV cache is then repeated to k rows;
- prompts are batched (left-padded, with position ids and attention mask), sorted by length so
  that little padding is computed;
- rows that have produced EOS are dropped from the batch (their cache rows too), and a batch stops
  as soon as every row has finished;
- the prefill computes logits for the last position only;
- top-p sampling is done here, by inverse transform on the sorted nucleus with uniforms drawn in
  advance from one seeded generator per prompt. A prompt's continuations therefore depend on the
  seed and the prompt's index only, not on the batch size, the order or the device (up to the
  floating-point noise of batched matrix products).

`static=True` decodes with one shape throughout (`_StaticDecoder`), which on GPUs replays each step
as a CUDA graph: written for the GPU, where the loop above is bound by Python and kernel launches,
and not yet measured there (bench/gpu.sh does).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from lmprune.core.errors import LmpruneError

# The nucleus nearly always lies within the top few hundred tokens: try the top candidates first
# (topk is much cheaper than sorting the vocabulary), widening only for the rows that need it.
# On a GPU a top-4096 costs about what a top-256 does (both read the row once): one stage.
_CANDIDATES = {"cpu": (256, 4096), "cuda": (4096,)}


def default_batch_size(device: torch.device | str) -> int:
    """Rows (prompt x sample) per forward pass: large on GPUs, moderate on CPUs."""
    return 2048 if str(device).startswith("cuda") else 200


def prompt_uniforms(seed: int, prompt_index: int, steps: int, samples: int) -> torch.Tensor:
    """The uniforms that drive one prompt's sampling: [steps, samples] float64 in [0, 1).

    One CPU generator per prompt, seeded from (seed, prompt index), so the draws do not depend on
    which other prompts share the batch, nor on the device the model runs on.
    """
    state = np.random.SeedSequence([seed, prompt_index]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.rand(steps, samples, generator=gen, dtype=torch.float64)


def top_p_sample(logits: torch.Tensor, uniforms: torch.Tensor, top_p: float,
                 temperature: float) -> torch.Tensor:
    """One token per row from the nucleus of softmax(logits / temperature).

    logits: [rows, vocab]; uniforms: [rows] in [0, 1). The nucleus is the smallest set of most
    probable tokens whose mass reaches top_p (the top token always belongs to it); the token is
    the first of the nucleus, in descending order of probability, whose cumulative mass exceeds
    u * (mass of the nucleus). Returns [rows] int64.
    """
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    probs = torch.softmax(scaled, dim=-1)  # [rows, vocab]
    # Half-precision logits order the vocabulary as the probabilities do (equal logits give equal
    # probabilities), in half the bytes: rank by them, read the probabilities of the ranked ids.
    keys = logits if logits.dtype in (torch.bfloat16, torch.float16) else probs
    rows, device = probs.shape[0], probs.device
    uniforms = uniforms.to(device, torch.float64)
    tokens = torch.empty(rows, dtype=torch.long, device=device)
    pending = torch.ones(rows, dtype=torch.bool, device=device)  # rows not sampled yet
    # n candidates hold the nucleus only if their top n - 1 reach top_p, which needs a top
    # probability of at least top_p / (n - 1): flatter rows (random weights) go straight to sorting.
    top1 = probs.amax(-1).double()  # [rows]
    for candidates in _CANDIDATES["cuda" if device.type == "cuda" else "cpu"]:
        if candidates >= probs.shape[-1]:
            break
        todo = (pending & (top1 * (candidates - 1) >= top_p - 1e-9)).nonzero().squeeze(-1)
        if todo.numel() == 0:
            continue
        top_ids = _rows(keys, todo).topk(candidates, dim=-1).indices  # descending probability
        top_probs = _rows(probs, todo).gather(-1, top_ids)
        # The mass before the last candidate reaches top_p: the nucleus ends among them.
        fits = top_probs.double().cumsum(-1)[:, -2] >= top_p
        done = todo[fits]
        tokens[done] = _sample_sorted(top_probs[fits], top_ids[fits], uniforms[done], top_p)
        pending[done] = False
    todo = pending.nonzero().squeeze(-1)
    if todo.numel():
        sorted_keys, sorted_ids = _rows(keys, todo).sort(dim=-1, descending=True)
        sorted_probs = sorted_keys if keys is probs else _rows(probs, todo).gather(-1, sorted_ids)
        tokens[todo] = _sample_sorted(sorted_probs, sorted_ids, uniforms[todo], top_p)
    return tokens


def _rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """values[rows], without the copy where rows are all of them."""
    return values if rows.numel() == values.shape[0] else values[rows]


def _sample_sorted(sorted_probs: torch.Tensor, sorted_ids: torch.Tensor, uniforms: torch.Tensor,
                   top_p: float) -> torch.Tensor:
    """Inverse-transform sampling on probabilities sorted in descending order: [rows, n]."""
    cumulative = sorted_probs.double().cumsum(-1)  # [rows, n]
    # A token is in the nucleus when the mass before it is still below top_p.
    in_nucleus = (cumulative - sorted_probs) < top_p
    size = in_nucleus.sum(-1, keepdim=True)  # [rows, 1], >= 1
    mass = cumulative.gather(-1, size - 1)  # [rows, 1]
    target = uniforms.unsqueeze(-1) * mass
    position = (cumulative <= target).sum(-1, keepdim=True).clamp(max=size - 1)
    return sorted_ids.gather(-1, position).squeeze(-1)


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a continuation: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def cache_keyword(model) -> str:
    """transformers 5.x names the KV cache argument `cache`; earlier versions `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class PromptBatch:
    prompt_indices: list[int]
    input_ids: torch.Tensor  # [prompts, length], left-padded
    attention_mask: torch.Tensor  # [prompts, length]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    encoded = tokenizer(prompts)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    for i, ids in enumerate(encoded):
        if not ids:  # an empty prompt: condition on BOS (or EOS) so there is a next-token logit
            if start is None:
                raise LmpruneError(f"prompt {i} is empty and the tokenizer has no BOS or EOS "
                                   f"token to start from; remove empty prompts")
            encoded[i] = [start]
    return encoded


def _batches(encoded: list[list[int]], prompts_per_batch: int, pad_id: int,
             fixed_length: int | None = None):
    """Left-padded batches of prompts of similar length (longest first: memory peaks early).

    `fixed_length`: every batch has one shape, prompts_per_batch rows (the last batch repeats its
    last prompt, in rows that `PromptBatch.prompt_indices` does not list) x fixed_length tokens.
    """
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), prompts_per_batch):
        indices = order[start:start + prompts_per_batch]
        length = fixed_length or max(len(encoded[i]) for i in indices)
        rows = indices + indices[-1:] * (prompts_per_batch - len(indices)) if fixed_length \
            else indices
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, i in enumerate(rows):
            ids = encoded[i]
            input_ids[row, length - len(ids):] = torch.tensor(ids)
            mask[row, length - len(ids):] = 1
        yield PromptBatch(indices, input_ids, mask)


@torch.inference_mode()
def sample_token_ids(model, tokenizer, prompts: list[str], samples: int,
                     max_new_tokens: int = 20, top_p: float = 0.9, temperature: float = 1.0,
                     seed: int = 0, batch_size: int | None = None, progress: bool = True,
                     index_offset: int = 0, static: bool = False) -> list[list[list[int]]]:
    """Token ids of `samples` continuations per prompt (EOS excluded): [prompt][sample][token].

    `batch_size` counts rows (prompt x sample) per forward pass; a batch holds at least one prompt.
    Prompt i is sampled with the generator of index `index_offset + i`. `static`: decode with
    fixed shapes (`_StaticDecoder`; the same tokens, an experiment for GPUs).
    """
    if samples < 1 or max_new_tokens < 1:
        raise LmpruneError("samples and max_new_tokens must be at least 1")
    if not 0 < top_p <= 1:
        raise LmpruneError(f"top_p must be in (0, 1], not {top_p}")
    if temperature <= 0:
        raise LmpruneError(f"temperature must be above 0, not {temperature}")
    if not prompts:
        raise LmpruneError("no prompts to continue")
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    prompts_per_batch = max(1, batch_size // samples)
    eos = sorted(eos_token_ids(model, tokenizer))
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]

    encoded = encode_prompts(tokenizer, prompts)
    results: list[list[list[int]]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="sampling", unit="prompt", disable=not progress)
    decoder = fixed_length = None
    if static:  # lengths in steps of 64, so that calls of similar prompts share one decoder
        fixed_length = -(-max(map(len, encoded)) // 64) * 64
        decoder = _static_decoder(model, prompts_per_batch * samples,
                                  fixed_length + max_new_tokens, device)
    for batch in _batches(encoded, prompts_per_batch, pad_id, fixed_length):
        uniforms = torch.cat([  # [rows, steps]: row = prompt-in-batch * samples + sample
            prompt_uniforms(seed, index_offset + i, max_new_tokens, samples).T
            for i in batch.prompt_indices
        ])
        if decoder is not None:
            filler = uniforms[-samples:].repeat(prompts_per_batch - len(batch.prompt_indices), 1)
            rows = decoder.sample(batch, samples, max_new_tokens, top_p, temperature,
                                  torch.cat([uniforms, filler]), eos_tensor)
        else:
            rows = _sample_batch(model, batch, samples, max_new_tokens, top_p, temperature,
                                 uniforms, eos_tensor, device)
        for n, i in enumerate(batch.prompt_indices):
            results[i] = rows[n * samples:(n + 1) * samples]
        bar.update(len(batch.prompt_indices))
    bar.close()
    return results


def prefill(model, batch: PromptBatch, samples: int, device: torch.device):
    """One forward pass over the batch's prompts (the last position's logits only).

    Returns the prompts' DynamicCache [prompts, ...] and, repeated to k rows per prompt, the
    next-token logits [rows, vocab], the attention mask [rows, length] and the next position
    [rows, 1].
    """
    input_ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    return (cache, out.logits[:, -1].repeat_interleave(samples, dim=0),
            mask.repeat_interleave(samples, dim=0),
            positions[:, -1:].repeat_interleave(samples, dim=0) + 1)


def _sample_batch(model, batch: PromptBatch, samples: int, max_new_tokens: int, top_p: float,
                  temperature: float, uniforms: torch.Tensor, eos: torch.Tensor,
                  device: torch.device) -> list[list[int]]:
    """Prefill the batch's prompts once, repeat the cache to k rows each, then decode."""
    cache, logits, mask, next_position = prefill(model, batch, samples, device)
    cache.batch_repeat_interleave(samples)  # filled in place by every forward from here
    cache_arg = {cache_keyword(model): cache}

    num_rows = logits.shape[0]
    tokens = torch.zeros(num_rows, max_new_tokens, dtype=torch.long)  # [rows, steps], on CPU
    lengths = torch.full((num_rows,), max_new_tokens, dtype=torch.long)  # up to EOS
    active = torch.arange(num_rows)  # batch row -> original row
    uniforms = uniforms.to(device)
    for step in range(max_new_tokens):
        new = top_p_sample(logits, uniforms[active.to(device), step], top_p, temperature)
        tokens[active, step] = new.cpu()
        finished = torch.isin(new, eos).cpu() if eos.numel() else torch.zeros_like(active).bool()
        lengths[active[finished]] = step
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()):  # drop finished rows: their cache rows too
            keep = (~finished).nonzero().squeeze(-1)
            keep_device = keep.to(device)
            cache.batch_select_indices(keep_device)
            active, new = active[keep], new[keep_device]
            mask, next_position = mask[keep_device], next_position[keep_device]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        out = model(input_ids=new.unsqueeze(-1), attention_mask=mask, position_ids=next_position,
                    use_cache=True, **cache_arg)
        logits = out.logits[:, -1]
        next_position = next_position + 1
    return [tokens[r, :lengths[r]].tolist() for r in range(num_rows)]


_DECODER: list = []  # the last _StaticDecoder: calls of the same shape reuse its compiled step


def _static_decoder(model, rows: int, max_length: int, device: torch.device):
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if window and max_length > window:  # a DynamicCache prefill keeps only the window
        raise LmpruneError(f"static decoding holds at most the sliding window ({window} tokens) "
                           f"of prompt and continuation; decode without it")
    key = (rows, max_length, str(device), next(model.parameters()).dtype)
    if not (_DECODER and _DECODER[0].model is model and _DECODER[0].key == key):
        _DECODER.clear()  # frees the previous cache before the next is allocated
        _DECODER.append(_StaticDecoder(model, rows, max_length, device))
        _DECODER[0].key = key
    return _DECODER[0]


class _StaticDecoder:
    """Decoding with one shape throughout, for CUDA graphs.

    Every batch has the same rows and prompt length (`_batches(fixed_length=)`), one StaticCache
    serves them all (and later calls of that shape: `_static_decoder`), and finished rows are
    decoded on (their tokens after EOS are dropped), so the decode step has a single shape: on
    GPUs it is compiled once with `torch.compile(mode="reduce-overhead")`, which replays it as a
    CUDA graph without per-layer Python and kernel launches (what bounds `_sample_batch` there).
    Same tokens as `_sample_batch` up to floating-point noise.
    """

    def __init__(self, model, rows: int, max_length: int, device: torch.device):
        from transformers import StaticCache

        self.model, self.device = model, device
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        self.cache_arg = {cache_keyword(model): self.cache}
        self.mask = torch.zeros(rows, max_length, dtype=torch.long, device=device)
        self.step = self._step
        if device.type == "cuda":
            self.step = torch.compile(self._step, mode="reduce-overhead")

    def _step(self, new: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        out = self.model(input_ids=new, attention_mask=mask, position_ids=positions,
                         use_cache=True, **self.cache_arg)
        return out.logits[:, -1]

    def sample(self, batch: PromptBatch, samples: int, max_new_tokens: int, top_p: float,
               temperature: float, uniforms: torch.Tensor, eos: torch.Tensor) -> list[list[int]]:
        """As `_sample_batch`, for the prompts the batch lists."""
        prompt_cache, logits, mask, next_position = prefill(self.model, batch, samples,
                                                            self.device)
        self.cache.reset()
        for layer, cached in enumerate(prompt_cache.layers):  # each prompt's prefix, k times
            self.cache.update(cached.keys.repeat_interleave(samples, 0),
                              cached.values.repeat_interleave(samples, 0), layer)
        length = mask.shape[1]
        self.mask.zero_()
        self.mask[:, :length] = mask

        rows = len(batch.prompt_indices) * samples  # the rest repeat the last prompt
        tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long)  # [rows, steps], on CPU
        lengths = torch.full((rows,), max_new_tokens, dtype=torch.long)  # up to EOS
        running = torch.ones(rows, dtype=torch.bool)
        uniforms = uniforms.to(self.device)
        for step in range(max_new_tokens):
            new = top_p_sample(logits, uniforms[:, step], top_p, temperature)
            tokens[:, step] = new[:rows].cpu()
            if eos.numel():
                finished = running & torch.isin(new[:rows], eos).cpu()
                lengths[finished] = step
                running &= ~finished
            if step == max_new_tokens - 1 or not bool(running.any()):
                break
            self.mask[:, length + step] = 1
            logits = self.step(new.unsqueeze(-1), self.mask, next_position)
            next_position = next_position + 1
        return [tokens[r, :lengths[r]].tolist() for r in range(rows)]


def decode_continuations(tokenizer, prompt: str, continuations: list[list[int]]) -> list[str]:
    """Text of each continuation alone (without the prompt).

    Decoded together with the prompt and cut after it, so tokenizers that drop a leading space
    when a sequence starts mid-word (SentencePiece) still give the continuation's first space.
    """
    prompt_ids = encode_prompts(tokenizer, [prompt])[0]
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    texts = []
    for ids in continuations:
        full = tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)
        texts.append(full[len(prefix):] if full.startswith(prefix)
                     else tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def sample_continuations(model, tokenizer, prompts: list[str], samples: int,
                         max_new_tokens: int = 20, top_p: float = 0.9, temperature: float = 1.0,
                         seed: int = 0, batch_size: int | None = None, progress: bool = True,
                         index_offset: int = 0) -> list[list[str]]:
    """`samples` continuations per prompt, as text without the prompt: [prompt][sample].

    Deterministic: the same seed gives the same continuations (see `prompt_uniforms`).
    """
    ids = sample_token_ids(model, tokenizer, prompts, samples, max_new_tokens, top_p,
                           temperature, seed, batch_size, progress, index_offset)
    return [decode_continuations(tokenizer, prompt, rows)
            for prompt, rows in zip(prompts, ids, strict=True)]
