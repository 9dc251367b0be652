"""Perplexity of a text, two ways that are not comparable with each other (so both are named):

- `sliding_window`: Hugging Face's perplexity guide (huggingface.co/docs/transformers/perplexity).
  Windows of `max_length` tokens start every `stride` tokens; each scores only the tokens the
  previous window did not reach, so every token after the first is scored with at least
  `max_length - stride` tokens of context. `token_perplexity` reproduces the guide's figure
  exactly, including its accounting (each window's mean loss weighted by the number of its target
  tokens minus one); `token_perplexity_exact` is exp(total NLL / tokens scored).
- `non_overlapping`: disjoint windows of `max_length` tokens, as lm-evaluation-harness's rolling
  log-likelihood does (context_len 1): every token is scored, the first from a BOS/EOS prefix
  token, and the first token of each window sees only the token before it. lm-eval's `wikitext`
  task runs this per document; here it runs on the text given.

Word perplexity is exp(total NLL / words), words counted by whitespace splitting; byte perplexity
and bits per byte divide by UTF-8 bytes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmprune.core.errors import LmpruneError


def default_batch_size(device: torch.device | str) -> int:
    """Windows per forward pass."""
    return 16 if str(device).startswith("cuda") else 4


def _max_positions(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _window_nll(model, inputs: list[list[int]], count: int, device) -> torch.Tensor:
    """NLL of the last `count` tokens of each window (same length): [windows, count] float64."""
    ids = torch.tensor(inputs, device=device)  # [windows, length]
    logits = model(input_ids=ids, logits_to_keep=count + 1).logits  # [windows, count + 1, vocab]
    predicted = logits[:, :-1]
    if predicted.dtype in (torch.float16, torch.bfloat16):
        predicted = predicted.float()
    targets = ids[:, -count:]
    nll = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1),
                          reduction="none")
    return nll.view(len(inputs), count).double()


def _run_windows(model, windows: list[tuple[list[int], int]], batch_size: int, desc: str,
                 progress: bool) -> list[torch.Tensor]:
    """NLLs of each (input ids, tokens to score) window, batching windows of the same shape."""
    device = next(model.parameters()).device
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (inputs, count) in enumerate(windows):
        groups[(len(inputs), count)].append(i)
    results: list[torch.Tensor] = [torch.empty(0)] * len(windows)
    bar = tqdm(total=len(windows), desc=desc, unit="window", disable=not progress)
    for (_, count), members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            nll = _window_nll(model, [windows[i][0] for i in chunk], count, device).cpu()
            for row, i in enumerate(chunk):
                results[i] = nll[row]
            bar.update(len(chunk))
    bar.close()
    return results


def sliding_window_nll(model, ids: list[int], max_length: int, stride: int, batch_size: int,
                       progress: bool = True) -> dict:
    """The guide's windows; returns the guide's figure and the exact totals."""
    seq_len = len(ids)
    windows, target_lengths = [], []
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        target = end - prev_end  # tokens this window scores that the previous did not
        length = end - begin
        scored = length - max(1, length - target)  # the first token of the text has no context
        windows.append((ids[begin:end], scored))
        target_lengths.append(target)
        prev_end = end
        if end == seq_len:
            break
    nlls = _run_windows(model, windows, batch_size, "perplexity (sliding)", progress)
    # The guide: loss is the mean over the scored tokens; it is weighted by (targets - 1).
    guide_sum = sum(float(n.mean()) * (t - 1) for n, t in zip(nlls, target_lengths, strict=True))
    guide_tokens = sum(t - 1 for t in target_lengths)
    total = sum(float(n.sum()) for n in nlls)
    scored = sum(n.numel() for n in nlls)
    return {"guide_nll": guide_sum / guide_tokens, "nll_sum": total, "tokens_scored": scored,
            "windows": len(windows)}


def non_overlapping_nll(model, ids: list[int], max_length: int, prefix_id: int | None,
                        batch_size: int, progress: bool = True) -> dict:
    """Disjoint windows: window w predicts tokens[w*L : (w+1)*L] from the token before each."""
    tokens = list(ids)
    if prefix_id is not None and tokens[0] != prefix_id:
        tokens = [prefix_id] + tokens  # so the text's first token is scored too
    windows = []
    for start in range(0, len(tokens) - 1, max_length):
        stop = min(start + max_length, len(tokens) - 1)
        # inputs tokens[start:stop+1] minus the last; predicts tokens[start+1 : stop+1]
        windows.append((tokens[start:stop + 1], stop - start))
    nlls = _run_windows(model, windows, batch_size, "perplexity (disjoint)", progress)
    return {"nll_sum": sum(float(n.sum()) for n in nlls),
            "tokens_scored": sum(n.numel() for n in nlls), "windows": len(windows),
            "first_token_scored": len(tokens) > len(ids)}


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, max_length: int = 512, stride: int = 256,
               max_tokens: int | None = None, batch_size: int | None = None,
               progress: bool = True) -> dict:
    """Sliding-window (HF guide) and non-overlapping (lm-eval style) perplexities of `text`."""
    if not 0 < stride <= max_length:
        raise LmpruneError(f"perplexity stride must be in 1..max_length ({max_length}), "
                           f"not {stride}")
    limit = _max_positions(model)
    if limit is not None and max_length > limit:
        raise LmpruneError(f"perplexity window {max_length} is longer than the model's "
                           f"{limit} positions: lower --ppl-max-length")
    ids = tokenizer(text, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(ids) < 2:
        raise LmpruneError("perplexity needs a text of at least 2 tokens")
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    words = len(text.split())
    num_bytes = len(text.encode("utf-8"))
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id

    sliding = sliding_window_nll(model, ids, max_length, stride, batch_size, progress)
    disjoint = non_overlapping_nll(model, ids, max_length, prefix, batch_size, progress)
    return {
        "sliding_window": {
            "method": "Hugging Face perplexity guide: sliding window, each token scored once "
                      "with at least max_length - stride tokens of context",
            "token_perplexity": math.exp(sliding["guide_nll"]),
            "token_perplexity_exact": math.exp(sliding["nll_sum"] / sliding["tokens_scored"]),
            "word_perplexity": math.exp(sliding["nll_sum"] / words),
            "nll_sum": sliding["nll_sum"],
            "tokens_scored": sliding["tokens_scored"],
            "windows": sliding["windows"],
            "max_length": max_length,
            "stride": stride,
        },
        "non_overlapping": {
            "method": "disjoint windows of max_length tokens, every token scored from the "
                      "tokens before it in its window (lm-evaluation-harness rolling "
                      "log-likelihood)",
            "token_perplexity": math.exp(disjoint["nll_sum"] / disjoint["tokens_scored"]),
            "word_perplexity": math.exp(disjoint["nll_sum"] / words),
            "byte_perplexity": math.exp(disjoint["nll_sum"] / num_bytes),
            "bits_per_byte": disjoint["nll_sum"] / num_bytes / math.log(2),
            "nll_sum": disjoint["nll_sum"],
            "tokens_scored": disjoint["tokens_scored"],
            "windows": disjoint["windows"],
            "max_length": max_length,
            "first_token_scored": disjoint["first_token_scored"],
        },
        "tokens": len(ids),
        "words": words,
        "bytes": num_bytes,
    }
