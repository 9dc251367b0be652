"""BLiMP (Warstadt et al., TACL 2020): does the model prefer the grammatical sentence of a minimal
pair? A capability check beside perplexity: pruning that removes grammar shows here first.

Scored as lm-evaluation-harness scores its `blimp` tasks (multiple choice, empty context):

- each sentence is the continuation `" " + sentence` (lm-eval's default target delimiter),
  encoded with add_special_tokens=False and scored from one prefix token, the tokenizer's BOS id
  or else its EOS id (HFLM.prefix_token_id); if the sentence's own first token is that prefix
  token, it serves as the context instead, as lm-eval does;
- a sentence's score is the sum of its tokens' log-probabilities (no length normalisation);
- a pair is right when logp(good) >= logp(bad): lm-eval takes np.argmax over [good, bad], which
  picks good on a tie (the release has 7 pairs whose two sentences are the same string);
- the `blimp` group is the unweighted mean of the 67 paradigm accuracies.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmprune.core.data import data_dir, json_lines, texts_sha256
from lmprune.core.errors import LmpruneError
from lmprune.core.models import prefix_token_id

BLIMP_SPEC = "blimp"
BLIMP_FILE = "blimp.jsonl"
HUB_DATASET = "nyu-mll/blimp"
DELIMITER = " "  # lm-eval's target_delimiter, put before each sentence
SCORING = ("lm-evaluation-harness blimp: total log-probability of ' ' + sentence after one "
           "BOS (else EOS) prefix token, no special tokens; right when logp(good) >= "
           "logp(bad) (argmax, ties to good); accuracy = unweighted mean over paradigms")
_REQUIRED = ("UID", "sentence_good", "sentence_bad")


@dataclass
class BlimpPair:
    uid: str
    """The paradigm (one of 67 in the release), e.g. `adjunct_island`."""
    field: str
    """syntax, morphology, semantics or syntax_semantics."""
    linguistics_term: str
    """The phenomenon, a grouping of paradigms, e.g. `island_effects`."""
    good: str
    bad: str


def resolve_blimp(spec: str = BLIMP_SPEC) -> str:
    """`blimp` -> the shared file when LMPRUNE_DATA_DIR is set, else `hf:nyu-mll/blimp`."""
    if spec != BLIMP_SPEC:
        return spec
    folder = data_dir()
    return str(folder / BLIMP_FILE) if folder is not None else f"hf:{HUB_DATASET}"


def load_blimp(spec: str = BLIMP_SPEC,
               per_paradigm: int | None = None) -> tuple[list[BlimpPair], dict]:
    """The pairs of `spec` in file order (the first `per_paradigm` of each paradigm if given)
    and a description of what was read."""
    if per_paradigm is not None and per_paradigm < 1:
        raise LmpruneError(f"BLiMP pairs per paradigm must be at least 1, not {per_paradigm}")
    resolved = resolve_blimp(spec)
    pairs = _read_hub() if resolved.startswith("hf:") else _read_jsonl(Path(resolved), spec)
    if per_paradigm is not None:
        kept: dict[str, int] = defaultdict(int)
        limited = []
        for pair in pairs:  # a paradigm's pairs need not be contiguous in a user's file
            if kept[pair.uid] < per_paradigm:
                kept[pair.uid] += 1
                limited.append(pair)
        pairs = limited
    if not pairs:
        raise LmpruneError(f"BLiMP '{spec}' ({resolved}) has no pairs")
    # The hash covers what is scored (paradigm and both sentences), not the file's formatting.
    digest = texts_sha256([f"{p.uid}\t{p.good}\t{p.bad}" for p in pairs])
    return pairs, {"spec": spec, "resolved": resolved, "pairs": len(pairs),
                   "paradigms": len({p.uid for p in pairs}), "per_paradigm": per_paradigm,
                   "sha256": digest}


def _pair(record: dict) -> BlimpPair:
    # the release spells one paradigm's field "syntax/semantics", the 13 others of that field
    # "syntax_semantics": one field, so per-field figures are not split
    field = (record.get("field") or "unknown").replace("/", "_")
    return BlimpPair(record["UID"], field,
                     record.get("linguistics_term") or "unknown",
                     record["sentence_good"], record["sentence_bad"])


def check_blimp_file(spec: str) -> None:
    """A local BLiMP file that is missing, named before any work (a Hub set is read later)."""
    resolved = resolve_blimp(spec)
    if not resolved.startswith("hf:"):
        _local_file(Path(resolved), spec)


def _local_file(path: Path, spec: str) -> Path:
    path = path.expanduser()
    if not path.is_file():
        hint = (f"set LMPRUNE_DATA_DIR to the shared data folder (the one holding {BLIMP_FILE})"
                if spec == BLIMP_SPEC else f"give '{BLIMP_SPEC}' or a .jsonl file of BLiMP pairs, "
                f"or 'none' to skip BLiMP")
        raise LmpruneError(f"BLiMP file not found: {path}; {hint}")
    return path


def _read_jsonl(path: Path, spec: str) -> list[BlimpPair]:
    path = _local_file(path, spec)
    pairs = []
    try:
        for lineno, record in json_lines(path):
            if not isinstance(record, dict):
                raise LmpruneError(f"BLiMP {path}: line {lineno} is not a JSON object")
            for key in _REQUIRED:
                if not isinstance(record.get(key), str):
                    raise LmpruneError(f"BLiMP {path}: line {lineno} has no text field "
                                       f"'{key}' (each line needs {', '.join(_REQUIRED)})")
            pairs.append(_pair(record))
    except UnicodeDecodeError as err:
        raise LmpruneError(f"BLiMP {path} is not UTF-8 text ({err.reason})") from err
    return pairs


def _read_hub() -> list[BlimpPair]:
    """Every paradigm of `nyu-mll/blimp` (one config per UID, split `train`), in config order."""
    import datasets

    try:
        pairs = []
        for uid in datasets.get_dataset_config_names(HUB_DATASET):
            pairs += [_pair(r) for r in datasets.load_dataset(HUB_DATASET, uid, split="train")]
    except Exception as err:  # network, auth, a renamed config: all reported the same way
        raise LmpruneError(f"cannot load dataset '{HUB_DATASET}' ({err}); offline, set "
                           f"LMPRUNE_DATA_DIR to the shared data folder") from err
    return pairs


def default_batch_size(device: torch.device | str) -> int:
    """Sentences per forward pass (BLiMP sentences are ~10 tokens)."""
    return 256 if str(device).startswith("cuda") else 64


def encode_sentences(tokenizer, sentences: list[str],
                     prefix: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, scored ids) of each sentence, as lm-eval's loglikelihood with context ''."""
    encoded = tokenizer([DELIMITER + s for s in sentences], add_special_tokens=False,
                        verbose=False)["input_ids"] if sentences else []
    # A text that starts with the prefix token itself supplies its own context.
    return [(ids[:1], ids[1:]) if ids and ids[0] == prefix else ([prefix], ids)
            for ids in encoded]


@torch.inference_mode()
def sentence_logprobs(model, tokenizer, sentences: list[str], batch_size: int | None = None,
                      progress: bool = False) -> list[float]:
    """Total log-probability of each sentence (float64 sums), batched by length."""
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    prefix = prefix_token_id(tokenizer)
    # The model sees context + scored[:-1] and predicts the scored tokens: input length equals
    # the number of scored tokens, so no position's logits go unused.
    rows = [((context + scored)[:-1], scored)
            for context, scored in encode_sentences(tokenizer, sentences, prefix)]
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory
    # batch size fails on the first batch rather than at the end.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    totals = [0.0] * len(rows)
    bar = tqdm(total=len(rows), desc="blimp", unit="sentence", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = [i for i in order[start:start + batch_size] if rows[i][1]]
        if not chunk:  # only sentences with no tokens to score (log-probability 0)
            bar.update(len(order[start:start + batch_size]))
            continue
        width = len(rows[chunk[0]][0])
        # Right padding: real tokens keep positions 0..n-1, so absolute-position models (GPT-2)
        # need no position ids; padded keys are masked and padded targets ignored.
        ids = torch.full((len(chunk), width), prefix, dtype=torch.long)  # [batch, pos]
        mask = torch.zeros_like(ids)  # [batch, pos]
        targets = torch.full_like(ids, -100)  # [batch, pos]
        for row, i in enumerate(chunk):
            inputs, scored = rows[i]
            ids[row, :len(inputs)] = torch.tensor(inputs)
            mask[row, :len(inputs)] = 1
            targets[row, :len(scored)] = torch.tensor(scored)
        logits = model(input_ids=ids.to(device),
                       attention_mask=mask.to(device)).logits  # [batch, pos, vocab]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        # Flattened rows: cross_entropy over a [batch, vocab, pos] view is ~2.5x slower on CPU.
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.view(-1).to(device),
                              reduction="none").view(targets.shape)  # [batch, pos], 0 if ignored
        sums = (-nll.double()).sum(dim=1).tolist()  # [batch]
        for row, i in enumerate(chunk):
            totals[i] = sums[row]
        bar.update(len(order[start:start + batch_size]))
    bar.close()
    return totals


def blimp_accuracy(model, tokenizer, pairs: list[BlimpPair], batch_size: int | None = None,
                   progress: bool = True) -> dict:
    """Accuracy on `pairs`: per paradigm, per field and overall, as lm-eval reports `blimp`."""
    if not pairs:
        raise LmpruneError("BLiMP accuracy needs at least one pair")
    started = time.perf_counter()
    # Each distinct sentence is scored once: fewer forward passes, and a pair whose sentences
    # are the same string gets exactly equal scores (a tie, right as in lm-eval).
    unique = list(dict.fromkeys(s for p in pairs for s in (p.good, p.bad)))
    scores = dict(zip(unique, sentence_logprobs(model, tokenizer, unique, batch_size, progress),
                      strict=True))
    right: dict[str, list[bool]] = defaultdict(list)
    field_of: dict[str, str] = {}
    for pair in pairs:
        right[pair.uid].append(scores[pair.good] >= scores[pair.bad])
        field_of.setdefault(pair.uid, pair.field)
    per_paradigm = {uid: sum(hits) / len(hits) for uid, hits in right.items()}
    by_field: dict[str, list[float]] = defaultdict(list)
    for uid, accuracy in per_paradigm.items():
        by_field[field_of[uid]].append(accuracy)
    return {
        "accuracy": sum(per_paradigm.values()) / len(per_paradigm),
        "pair_accuracy": sum(sum(hits) for hits in right.values()) / len(pairs),
        "pairs": len(pairs),
        "paradigms": len(per_paradigm),
        "per_field": {field: sum(a) / len(a) for field, a in sorted(by_field.items())},
        "per_paradigm": per_paradigm,
        "scoring": SCORING,
        "elapsed_s": time.perf_counter() - started,
    }
