"""collect: stream per-neuron statistics and co-activation on an offensive and a clean corpus.

One pass over each corpus reads every MLP neuron (the input of the MLP's output projection, see
lmprune/arch.py) and keeps only sums on the device: token count, sum, sum of squares, firing
counts, per-document pooled values (max and mean over a document's non-padding tokens) and the
per-layer co-activation Gram matrix over a seeded token subsample. A second, shorter pass feeds
the Gram matrix of the global top-K neurons by |effect size| across layers, which are only known
once the first pass is done.

Per-document pooled values (what AUROC needs) are kept exactly in float32 `.npy` memory maps up
to `--exact-pooled-cap` documents per corpus; a larger corpus streams them into per-neuron
histograms instead, and the AUROC then carries a per-neuron error bound (see `auroc_from_hist`).

Work is split over processes started by torchrun (one `Accelerator` each) in a fixed round-robin
of batches; every sum is reduced across processes at the end. Accumulators and the position are
checkpointed atomically every `--checkpoint-every` rounds, so a killed run resumes to the same
numbers. The on-disk format is docs/formats.md ("Collected statistics").
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmprune import __version__
from lmprune.arch import NeuronMap
from lmprune.config import option
from lmprune.errors import LmpruneError
from lmprune.hooks import NeuronHooks
from lmprune.io import check_out_dir, read_json, write_json_atomic
from lmprune.lock import folder_lock

CORPORA = ("offensive", "clean")
FORMAT_VERSION = 1
_GRAM_BLOCKS = 8  # block rows of the upper-triangle Gram update: (8 + 1) / 16 of a full product
_GRAM_FLUSH_EVERY = 8  # batches of rows multiplied at once, summed in float32, then added to
_GRAM_MAX_ROWS = 16384  # ... the float64 total (fewer batches where they hold more rows)


@dataclass
class CollectConfig:
    """Settings of `lmprune collect`."""

    model: str = option("smollm2-135m", "Hub id, local folder, .gguf file or bundled alias.")
    offensive: str = option("paradetox:toxic", "Corpus spec of offensive text (see lmprune.data).")
    clean: str = option("paradetox:neutral", "Corpus spec of clean text.")
    out: str = option("runs/stats", "Output folder (manifest.json, stats/coact safetensors).")
    max_docs: int | None = option(None, "Use at most this many documents of each corpus.")
    max_tokens: int | None = option(None, "Use the first documents of each corpus up to this "
                                    "many tokens (after truncation to --max-length).")
    max_length: int = option(128, "Truncate documents to this many tokens.")
    batch_size: int = option(16, "Documents per forward pass.")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto (under torchrun: each process's).")
    dtype: str = option("auto", "Model dtype.", choices=["auto", "float32", "bfloat16", "float16"])
    revision: str | None = option(None, "Hub revision of the model.")
    trust_remote_code: bool = option(False, "Run model code from the Hub repository.")
    padding_side: str = option("right", "Pad batches on this side (results do not depend on it).",
                               choices=["right", "left"])
    coact_token_fraction: float = option(0.25, "Share of non-padding tokens (seeded, per "
                                         "document) that feed the per-layer Gram matrices.")
    top_k_global: int = option(4096, "Neurons (top |effect size| across layers) of the global "
                               "cross-layer Gram matrix; 0 disables it.")
    global_max_docs: int | None = option(256, "Documents per corpus (seeded choice) of the second "
                                         "pass that feeds the global Gram; null (in YAML) for all.")
    seed: int = option(0, "Seed of the token subsample and the second-pass documents.")
    fire_threshold: str = option("auto", "zero (activation > 0), relative:F (|activation| > F x "
                                 "the neuron's max |activation| on the first batch) or auto "
                                 "(relative:0.1 for gated MLPs, zero otherwise).")
    exact_pooled_cap: int = option(4096, "Keep pooled values exactly for corpora up to this many "
                                   "documents; larger ones use per-neuron histograms.")
    histogram_bins: int = option(256, "Bins per neuron of the pooled-value histograms.")
    calibration_docs: int = option(64, "First documents of each corpus whose max-pooled range "
                                   "sets the histogram bins (histogram mode only).")
    checkpoint_every: int = option(50, "Checkpoint the accumulators every N rounds of batches.")
    resume: bool = option(True, "Resume an interrupted run in --out (--no-resume starts over).")
    overwrite: bool = option(False, "Write into an existing --out folder that is not an lmprune "
                             "collect folder.")


# ----------------------------------------------------------------------------- processes


class _Processes:
    """One process, or one of several started by torchrun (an Accelerator, gloo on CPU)."""

    def __init__(self, device: str):
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=device == "cpu")
        self.rank = self.accelerator.process_index if self.accelerator else 0
        self.world = self.accelerator.num_processes if self.accelerator else 1
        self.main = self.rank == 0

    @property
    def device(self) -> str | None:
        return str(self.accelerator.device) if self.accelerator else None

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.accelerator:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.accelerator:
            return tensor
        from accelerate.utils import broadcast

        return broadcast(tensor.contiguous(), from_process=0)

    def close(self) -> None:
        if self.accelerator:
            self.accelerator.end_training()  # destroys the process group


# ----------------------------------------------------------------------------- data plan


def coact_token_mask(seed: int, corpus: int, doc: int, length: int, fraction: float) -> np.ndarray:
    """Which of a document's tokens feed the Gram matrices: [length] bool.

    Seeded by (seed, corpus, document) alone, so the choice does not depend on batching, padding
    side or the number of processes.
    """
    if fraction >= 1.0:
        return np.ones(length, dtype=bool)
    return np.random.default_rng([seed, corpus, doc]).random(length) < fraction


@dataclass
class _Batch:
    corpus: int
    docs: list[int]  # document indices within the corpus
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] int64
    position_ids: torch.Tensor  # [B, T]: a token's index within its document
    valid: torch.Tensor  # [n_valid] flat indices of non-padding tokens in [B * T]
    coact: torch.Tensor  # [n_coact] flat indices of the tokens that feed the Gram matrices
    lengths: torch.Tensor  # [B]

    @property
    def tokens(self) -> int:
        return int(self.valid.numel())


class Plan:
    """Tokenized corpora and the fixed order of batches (longest documents first)."""

    def __init__(self, token_lists: list[list[list[int]]], cfg: CollectConfig, pad_id: int):
        self.docs = token_lists  # [corpus][doc] -> token ids
        self.cfg = cfg
        self.pad_id = pad_id

    def batches(self, corpus: int, doc_ids: list[int] | None = None) -> list[list[int]]:
        ids = range(len(self.docs[corpus])) if doc_ids is None else doc_ids
        # Sorting by length cuts padding; the stable sort keeps the order deterministic.
        order = sorted(ids, key=lambda d: -len(self.docs[corpus][d]))
        size = self.cfg.batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def make(self, corpus: int, doc_ids: list[int], fraction: float) -> _Batch:
        seqs = [self.docs[corpus][d] for d in doc_ids]
        lengths = torch.tensor([len(s) for s in seqs])
        width = int(lengths.max())
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        coact = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, (doc, seq) in enumerate(zip(doc_ids, seqs, strict=True)):
            start = width - len(seq) if self.cfg.padding_side == "left" else 0
            span = slice(start, start + len(seq))
            ids[row, span] = torch.tensor(seq)
            mask[row, span] = 1
            picked = coact_token_mask(self.cfg.seed, corpus, doc, len(seq), fraction)
            coact[row, span] = torch.from_numpy(picked)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return _Batch(corpus, list(doc_ids), ids, mask, positions,
                      mask.view(-1).nonzero().squeeze(1), coact.view(-1).nonzero().squeeze(1),
                      lengths)


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)
    return [list(ids) for ids in encoded["input_ids"]]


def _limit_tokens(docs: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    if max_tokens is None:
        return docs
    total, kept = 0, []
    for doc in docs:
        if total + len(doc) > max_tokens:
            break
        kept.append(doc)
        total += len(doc)
    return kept


# ----------------------------------------------------------------------------- accumulators


def gram_row_dtype(acts_dtype: torch.dtype, device) -> torch.dtype:
    """Precision of the rows that SymmetricGram multiplies (see there)."""
    half = torch.device(device).type == "cuda" and acts_dtype in (torch.bfloat16, torch.float16)
    return acts_dtype if half and _float32_products_of(acts_dtype, device) else torch.float32


@functools.cache
def _float32_products_of(dtype: torch.dtype, device) -> bool:
    """Whether this torch multiplies half-precision matrices into float32 (`out_dtype`, recent
    versions only); probed once per dtype and device."""
    one = torch.ones(1, 1, 1, dtype=dtype, device=device)
    try:
        return torch.bmm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class SymmetricGram:
    """Running `sum_t x_t x_t^T` for G groups at once: [G, d, d] float64 on the device.

    Rows are buffered on the device and multiplied every few batches: one large product per block
    row of the upper block triangle (about half the FLOPs of a full product; `full()` mirrors it),
    summed in float32 and added to the float64 total. The rows are kept in float32, or, for
    half-precision activations on a GPU, in that half precision: tensor cores then multiply them
    exactly and sum in float32 (`out_dtype`), 14x faster than float32 products on an H200. The
    rows are centred first (see FirstPass.shift), so rounding them costs a relative 2^-9 of each
    value's spread about its mean, no more than the model's own half-precision activations carry.
    """

    def __init__(self, groups: int, dim: int, device, blocks: int = _GRAM_BLOCKS):
        blocks = max(1, min(blocks, dim))
        self.bounds = [dim * i // blocks for i in range(blocks + 1)]
        self.groups, self.dim, self.device = groups, dim, device
        self.total = torch.zeros(groups, dim, dim, dtype=torch.float64, device=device)
        self.dtype = torch.float32
        self.rows: torch.Tensor | None = None  # [G, capacity, d] buffered rows
        self.filled = 0
        self.batches = 0

    def set_precision(self, acts_dtype: torch.dtype) -> None:
        """Buffer rows in the activations' own half precision where the products are exact."""
        dtype = gram_row_dtype(acts_dtype, self.device)
        if dtype != self.dtype:
            self.flush()
            self.dtype, self.rows = dtype, None

    def reserve(self, n: int) -> torch.Tensor:
        """The next n buffered rows, [G, n, d], to be filled by the caller before `commit`."""
        if self.rows is None or self.filled + n > self.rows.shape[1]:
            self.flush()
            if self.rows is None or n > self.rows.shape[1]:
                capacity = max(n, min(n * _GRAM_FLUSH_EVERY, _GRAM_MAX_ROWS))
                self.rows = None  # free the old buffer before the new one is allocated
                self.rows = torch.empty(self.groups, capacity, self.dim, dtype=self.dtype,
                                        device=self.device)
        return self.rows[:, self.filled:self.filled + n]

    def commit(self, n: int) -> None:
        self.filled += n
        self.batches += 1
        if self.batches >= _GRAM_FLUSH_EVERY:
            self.flush()

    def add(self, x: torch.Tensor) -> None:
        """x: [G, n, d] rows to add."""
        self.reserve(x.shape[1]).copy_(x)
        self.commit(x.shape[1])

    def _blocks(self):
        return [(s, e) for s, e in zip(self.bounds[:-1], self.bounds[1:], strict=True)
                if e > s]

    def flush(self) -> None:
        if self.filled:
            x = self.rows[:, :self.filled]  # [G, n, d]
            xt = x.transpose(1, 2)  # [G, d, n]
            for s, e in self._blocks():
                if self.dtype == torch.float32:
                    products = torch.bmm(xt[:, s:e], x[:, :, s:])
                else:
                    products = torch.bmm(xt[:, s:e], x[:, :, s:], out_dtype=torch.float32)
                self.total[:, s:e, s:].add_(products)
        self.filled = self.batches = 0

    def full(self, total: torch.Tensor | None = None) -> torch.Tensor:
        """The symmetric Gram matrix from (a reduced copy of) the upper-triangle total."""
        upper = (self.total if total is None else total).clone()
        for s, e in self._blocks():
            upper[:, e:, s:e] = upper[:, s:e, e:].transpose(1, 2)
        return upper


def _layer_gated(nmap: NeuronMap) -> bool:
    return len(nmap.layout.inputs) > 1 or nmap.layout.fused_gate_up


def parse_fire_threshold(spec: str, gated: bool) -> tuple[str, float]:
    """('zero', 0) or ('relative', F) from the --fire-threshold spec."""
    if spec == "auto":
        return ("relative", 0.1) if gated else ("zero", 0.0)
    if spec == "zero":
        return "zero", 0.0
    if spec.startswith("relative:"):
        try:
            frac = float(spec.split(":", 1)[1])
        except ValueError:
            frac = -1.0
        if 0.0 <= frac <= 1.0:
            return "relative", frac
    raise LmpruneError(f"--fire-threshold must be auto, zero or relative:F with 0 <= F <= 1, "
                       f"not '{spec}'")


def _layer_sums(acts: torch.Tensor, shift: torch.Tensor, threshold: torch.Tensor,
                valid: torch.Tensor, relative: bool):
    """One layer's sums over a batch, written for torch.compile to fuse into one read of the
    activations (GPUs; `FirstPass.hook`'s eager code does the same on CPUs).

    acts [B, T, W]; shift, threshold [W]; valid [B, T, 1] True at real tokens (padding positions
    are left out whatever they hold). Returns the centred sum of squares [W], firing count [W],
    per-document sum and max [B, W], all float32.
    """
    x = acts.float()
    centered = torch.where(valid, x - shift, 0.0)
    over = x.abs() if relative else x
    return ((centered * centered).sum((0, 1)), (valid & (over > threshold)).sum((0, 1)).float(),
            torch.where(valid, x, 0.0).sum(1), torch.where(valid, x, float("-inf")).amax(1))


class FirstPass:
    """Hook function and per-process sums of the first pass (both corpora).

    On GPUs the per-layer sums are one compiled kernel (`_layer_sums`): eager code reads the
    activations once per statistic, which cost 13x the compiled time on an H200.
    """

    def __init__(self, num_layers: int, width: int, device, fire_mode: str,
                 calibration: dict[str, torch.Tensor], bins: int,
                 acts_dtype: torch.dtype = torch.float32):
        shape = (num_layers, width)
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.L, self.W, self.bins = num_layers, width, bins
        self.fire_mode = fire_mode
        self.threshold = calibration["threshold"].to(device)  # [L, W]
        # Squares and products are summed around this per-neuron shift (the first batch's mean),
        # so variance and covariance do not cancel catastrophically when |mean| >> std.
        self.shift = calibration["shift"].to(device)  # [L, W]
        hist_edges = None
        if "hist_lo" in calibration:
            hist_edges = (calibration["hist_lo"].to(device), calibration["hist_hi"].to(device))
        self.state: dict[str, torch.Tensor] = {}
        for c in CORPORA:
            self.state[f"{c}.tokens"] = torch.zeros((), **i64)
            self.state[f"{c}.documents"] = torch.zeros((), **i64)
            self.state[f"{c}.fires"] = torch.zeros(shape, **i64)
            for key in ("sum", "sumsq_shifted", "pmax_sum", "pmax_sumsq", "pmean_sum"):
                self.state[f"{c}.{key}"] = torch.zeros(shape, **f64)
            if hist_edges is not None:
                self.state[f"{c}.hist"] = torch.zeros((*shape, bins), dtype=torch.int32,
                                                      device=device)
        self.state["coact.tokens"] = torch.zeros((), **i64)
        self.state["coact.sum_shifted"] = torch.zeros(shape, **f64)
        self.gram = SymmetricGram(num_layers, width, device)
        self.gram.set_precision(acts_dtype)
        self.fused = torch.compile(_layer_sums) if torch.device(device).type == "cuda" else None
        self.hist_edges = hist_edges
        self.batch: _Batch | None = None
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self._host: dict[str, torch.Tensor] = {}

    def start(self, batch: _Batch, device) -> None:
        """Per-batch buffers, filled layer by layer by the hook."""
        self.batch = batch
        n_docs, dev = len(batch.docs), device
        self.valid = batch.valid.to(dev, non_blocking=True)
        self.coact = batch.coact.to(dev, non_blocking=True)
        mask = batch.attention_mask.to(dev, non_blocking=True)
        self.padded = self.valid.numel() < mask.numel()
        self.mask_f = mask.to(torch.float32).unsqueeze(1)  # [B, 1, T]
        self.valid_3d = mask.bool().unsqueeze(2)  # [B, T, 1]
        self.pad_bias = torch.where(mask.bool(), 0.0, float("-inf")).unsqueeze(2)  # [B, T, 1]
        self.lengths = batch.lengths.to(dev, torch.float64).unsqueeze(1)  # [B, 1]
        self.b_sumsq = self._buffer("sumsq", self.L, self.W)
        self.b_fires = self._buffer("fires", self.L, self.W)  # counts <= B*T: exact in float32
        self.scratch = None if self.fused is not None else self._scratch()
        self.b_max = self._buffer("max", self.L, n_docs, self.W)
        self.b_docsum = self._buffer("docsum", self.L, n_docs, self.W)
        self.coact_rows = self.gram.reserve(self.coact.numel())  # [L, n, W]

    def _scratch(self) -> torch.Tensor:
        return self._buffer("scratch", self.valid.numel(), self.W)  # reused by each layer

    def _buffer(self, name: str, *shape: int) -> torch.Tensor:
        """A float32 view [shape] of storage kept across batches (grown when a batch needs more),
        so the hot loop allocates no large tensors."""
        size = math.prod(shape)
        store = self._buffers.get(name)
        if store is None or store.numel() < size:
            store = self._buffers[name] = torch.empty(size, dtype=torch.float32,
                                                      device=self.device)
        return store[:size].view(shape)

    def hook(self, layer: int, acts: torch.Tensor) -> None:
        flat = acts.reshape(-1, self.W)  # [B*T, W]
        # The co-activation rows, centred, straight into the Gram matrix's buffer.
        torch.sub(flat.index_select(0, self.coact), self.shift[layer],
                  out=self.coact_rows[layer])
        if self.fused is not None:
            try:
                sums = self.fused(acts, self.shift[layer], self.threshold[layer], self.valid_3d,
                                  self.fire_mode == "relative")
            except Exception as err:  # noqa: BLE001 - no compiler here: the eager code is exact
                warnings.warn(f"torch.compile of the collect sums failed ({err!r:.200}); "
                              f"using eager code, which is slower", stacklevel=2)
                self.fused, self.scratch = None, self._scratch()
            else:
                for buffer, value in zip((self.b_sumsq[layer], self.b_fires[layer],
                                          self.b_docsum[layer], self.b_max[layer]), sums,
                                         strict=True):
                    buffer.copy_(value)
                return
        a = acts.float()  # [B, T, W]
        flat = a.reshape(-1, self.W)  # [B*T, W]
        tokens = flat.index_select(0, self.valid) if self.padded else flat  # [n, W]
        # Each step is one pass over [n, W] into the reused scratch buffer (no allocations).
        scratch = self.scratch
        torch.sub(tokens, self.shift[layer], out=scratch).square_()
        torch.sum(scratch, dim=0, out=self.b_sumsq[layer])
        over = torch.abs(tokens, out=scratch) if self.fire_mode == "relative" else tokens
        torch.gt(over, self.threshold[layer], out=scratch)  # 1.0 where the neuron fires
        torch.sum(scratch, dim=0, out=self.b_fires[layer])
        torch.bmm(self.mask_f, a, out=self.b_docsum[layer].unsqueeze(1))  # [B, 1, W]
        masked = a + self.pad_bias if self.padded else a
        torch.amax(masked, dim=1, out=self.b_max[layer])  # [B, W]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold the batch buffers into the sums; returns pooled (max, mean) [B, L, W] float32
        (views of buffers that the next batch overwrites; `to_host` copies them)."""
        batch, s = self.batch, self.state
        c = CORPORA[batch.corpus]
        s[f"{c}.tokens"] += batch.tokens
        s[f"{c}.documents"] += len(batch.docs)
        doc_sums = self.b_docsum.double()  # [L, B, W]
        doc_max = self.b_max.double()
        s[f"{c}.sum"] += doc_sums.sum(1)
        s[f"{c}.sumsq_shifted"] += self.b_sumsq
        s[f"{c}.fires"] += self.b_fires.long()
        s[f"{c}.pmax_sum"] += doc_max.sum(1)
        s[f"{c}.pmax_sumsq"] += doc_max.square().sum(1)
        s[f"{c}.pmean_sum"] += (doc_sums / self.lengths).sum(1)
        n = self.coact_rows.shape[1]
        if n:
            s["coact.tokens"] += n
            s["coact.sum_shifted"] += self.coact_rows.sum(1, dtype=torch.float64)
            self.gram.commit(n)
        if self.hist_edges is not None:
            self._histogram(s[f"{c}.hist"], self.b_max)
        doc_mean = (doc_sums / self.lengths).float()
        return self.b_max.transpose(0, 1), doc_mean.transpose(0, 1)

    def to_host(self, name: str, values: torch.Tensor) -> np.ndarray:
        """Values as a NumPy array, a GPU tensor copied through reused page-locked memory (about
        3x the bandwidth of a plain `.cpu()` into pageable memory); the array is overwritten by
        the next call of the same name."""
        if values.device.type != "cuda":
            return values.numpy()
        host = self._host.get(name)
        if host is None or host.numel() < values.numel():
            host = self._host[name] = torch.empty(values.numel(), dtype=values.dtype,
                                                  pin_memory=True)
        return host[:values.numel()].view(values.shape).copy_(values).numpy()

    def _histogram(self, hist: torch.Tensor, values: torch.Tensor) -> None:
        """Count each document's max-pooled value into its neuron's bin (clipped at the ends)."""
        lo, hi = self.hist_edges  # [L, W]
        scale = self.bins / (hi - lo)
        b = ((values - lo.unsqueeze(1)) * scale.unsqueeze(1)).floor_().clamp_(0, self.bins - 1)
        neuron = torch.arange(self.L * self.W, device=values.device).view(self.L, 1, self.W)
        index = (neuron * self.bins + b.long()).reshape(-1)
        hist.view(-1).scatter_add_(0, index, torch.ones_like(index, dtype=torch.int32))

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        self.gram.flush()
        return {**self.state, "coact.gram": self.gram.total}

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        for key, value in saved.items():
            if key == "coact.gram":
                self.gram.total.copy_(value)
            elif key in self.state:
                self.state[key].copy_(value)


class _StopForward(Exception):
    """Raised by the last needed hook: nothing after it (final norm, LM head) is computed."""


def stopping_hooks(model, nmap: NeuronMap, fn, layers: list[int] | None = None) -> NeuronHooks:
    """NeuronHooks calling `fn(layer, acts)` that end the forward pass after the last layer read:
    collection needs no logits, so the last output projection, final norm and LM head are
    skipped (run the batch with `forward_batch`)."""
    last = max(layers) if layers else nmap.num_layers - 1

    def wrapped(layer, acts):
        fn(layer, acts)
        if layer == last:
            raise _StopForward

    return NeuronHooks(model, wrapped, layers=layers, neuron_map=nmap)


def forward_batch(model, batch: _Batch, device) -> None:
    """Run a padded batch with explicit positions (a token's index within its document), so left
    and right padding give the same activations."""
    kwargs = {"attention_mask": batch.attention_mask.to(device), "use_cache": False}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = batch.position_ids.to(device)
    try:
        model(batch.input_ids.to(device), **kwargs)
    except _StopForward:
        pass


# ----------------------------------------------------------------------------- statistics


def auroc_exact(pos: np.ndarray, neg: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """AUROC of pos (higher) vs neg per column: [n_pos, N], [n_neg, N] -> [N] (ties count 1/2).

    Mann-Whitney U from average ranks, as sklearn's roc_auc_score gives for a binary label.
    """
    from scipy.stats import rankdata

    n_pos, n_neg = pos.shape[0], neg.shape[0]
    out = np.empty(pos.shape[1], dtype=np.float64)
    for s in range(0, pos.shape[1], chunk):
        both = np.concatenate([pos[:, s:s + chunk], neg[:, s:s + chunk]]).astype(np.float64)
        ranks = rankdata(both, axis=0)[:n_pos].sum(0)
        out[s:s + chunk] = (ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def auroc_from_hist(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AUROC and its error bound from per-neuron histograms on shared bins: [..., bins] each.

    Pairs in different bins are ordered exactly; a pair in the same bin is counted 1/2, so the
    error is at most half the share of pairs that share a bin: 0.5 * sum_b p_b q_b.
    """
    p = pos.double() / pos.sum(-1, keepdim=True).double()
    q = neg.double() / neg.sum(-1, keepdim=True).double()
    below = torch.cumsum(q, -1) - q  # share of negatives in lower bins
    same = (p * q).sum(-1)
    return (p * below).sum(-1) + 0.5 * same, 0.5 * same


def histogram_of(values: np.ndarray, lo: torch.Tensor, hi: torch.Tensor, bins: int,
                 chunk: int = 256) -> torch.Tensor:
    """Per-neuron histogram [L, W, bins] of exact pooled values [docs, L, W] (memory-mapped)."""
    L, W = lo.shape
    hist = torch.zeros(L * W * bins, dtype=torch.int64)
    scale = bins / (hi - lo)
    neuron = torch.arange(L * W).view(1, L, W)
    for s in range(0, values.shape[0], chunk):
        v = torch.from_numpy(np.asarray(values[s:s + chunk]))
        b = ((v - lo) * scale).floor_().clamp_(0, bins - 1).long()
        ones = torch.ones(b.numel(), dtype=torch.int64)
        hist.index_add_(0, (neuron * bins + b).reshape(-1), ones)
    return hist.view(L, W, bins)


def unshift(total: torch.Tensor, gram: torch.Tensor, shift: torch.Tensor, n):
    """Raw sums and Gram [..., d], [..., d, d] from those of x - shift, in float64."""
    k = shift.double()
    raw_total = total + n * k
    outer = total.unsqueeze(-1) * k.unsqueeze(-2)  # sum_t (x_t - k) k^T
    raw_gram = gram + outer + outer.transpose(-1, -2) + n * k.unsqueeze(-1) * k.unsqueeze(-2)
    return raw_total, raw_gram


EFFECT_CAP = 1e3  # |Cohen's d| reported for corpora separated without any spread


def cohens_d(n1, s1, ss1, n2, s2, ss2) -> torch.Tensor:
    """Cohen's d (pooled sample standard deviation) from counts, sums and sums of squares."""
    m1, m2 = s1 / n1, s2 / n2
    var1 = (ss1 - n1 * m1 * m1) / max(n1 - 1, 1)
    var2 = (ss2 - n2 * m2 * m2) / max(n2 - 1, 1)
    pooled = (((n1 - 1) * var1 + (n2 - 1) * var2) / max(n1 + n2 - 2, 1)).clamp(min=0).sqrt()
    # Two corpora without spread (e.g. a neuron that is a constant on each) have no finite d:
    # equal means give 0, different means +-EFFECT_CAP, so perfect separators rank first.
    spread = pooled > 1e-7 * (m1.abs() + m2.abs())
    d = (m1 - m2) / torch.where(spread, pooled, torch.ones_like(pooled))
    separated = torch.sign(m1 - m2) * (m1 != m2) * EFFECT_CAP
    return torch.where(spread, d.clamp(-EFFECT_CAP, EFFECT_CAP), separated)


# ----------------------------------------------------------------------------- the run


class _Checkpoints:
    """Per-process state files plus one pointer file; the pointer is replaced atomically only
    after every process has written its state, so any kill leaves a complete checkpoint."""

    def __init__(self, out: Path, procs: _Processes, fingerprint: str):
        self.dir = out / ".checkpoint"
        self.procs, self.fingerprint = procs, fingerprint
        self.pointer = self.dir / "checkpoint.json"

    def read(self) -> dict | None:
        if not self.pointer.is_file():
            return None
        info = json.loads(self.pointer.read_text())
        if info.get("fingerprint") != self.fingerprint:
            raise LmpruneError(f"{self.dir.parent} holds an unfinished collection with other "
                               f"settings; rerun that command, or pass --no-resume to start over")
        return info

    def load_state(self, info: dict) -> dict[str, torch.Tensor]:
        return load_file(self.dir / f"{info['tag']}.rank{self.procs.rank}.safetensors")

    def save(self, tag: str, state: dict[str, torch.Tensor], info: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{tag}.rank{self.procs.rank}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
        self.procs.barrier()
        if self.procs.main:
            write_json_atomic(self.pointer, {**info, "tag": tag, "fingerprint": self.fingerprint})
        self.procs.barrier()
        for old in self.dir.glob(f"*.rank{self.procs.rank}.safetensors"):
            if old.name != path.name:
                old.unlink()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _validate(cfg: CollectConfig) -> None:
    checks = [
        (cfg.batch_size >= 1, "--batch-size must be at least 1"),
        (cfg.max_length >= 1, "--max-length must be at least 1"),
        (0.0 < cfg.coact_token_fraction <= 1.0, "--coact-token-fraction must be in (0, 1]"),
        (cfg.top_k_global >= 0, "--top-k-global must be 0 (off) or positive"),
        (cfg.max_docs is None or cfg.max_docs >= 1, "--max-docs must be at least 1"),
        (cfg.max_tokens is None or cfg.max_tokens >= 1, "--max-tokens must be at least 1"),
        (cfg.global_max_docs is None or cfg.global_max_docs >= 1,
         "--global-max-docs must be at least 1"),
        (cfg.exact_pooled_cap >= 1, "--exact-pooled-cap must be at least 1"),
        (cfg.histogram_bins >= 2, "--histogram-bins must be at least 2"),
        (cfg.calibration_docs >= 1, "--calibration-docs must be at least 1"),
        (cfg.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise LmpruneError(message)
    parse_fire_threshold(cfg.fire_threshold, gated=False)  # refuse a bad spec before loading


class Collector:
    """One collection run (one process of it under torchrun)."""

    def __init__(self, cfg: CollectConfig):
        from lmprune.data import load_corpus
        from lmprune.models import load_model, resolve_device

        _validate(cfg)
        self.cfg = cfg
        self.procs = _Processes(resolve_device(cfg.device))
        device = self.procs.device or cfg.device
        self.corpora = [load_corpus(spec, cfg.max_docs) for spec in (cfg.offensive, cfg.clean)]
        self.loaded = load_model(cfg.model, cfg.dtype, device, cfg.revision, cfg.trust_remote_code)
        self.model = self.loaded.model
        self.device = next(self.model.parameters()).device
        self.nmap = NeuronMap(self.model)
        widths = self.nmap.widths
        if len(set(widths)) != 1:
            raise LmpruneError(f"layers of different widths ({sorted(set(widths))}) are not "
                               f"supported by collect")
        self.L, self.W = self.nmap.num_layers, widths[0]
        tok = self.loaded.tokenizer
        docs = [_limit_tokens(_tokenize(tok, c.texts, cfg.max_length), cfg.max_tokens)
                for c in self.corpora]
        for corpus, toks in zip(self.corpora, docs, strict=True):
            if not toks or any(len(t) == 0 for t in toks):
                raise LmpruneError(f"corpus '{corpus.spec}' has documents without tokens (or "
                                   f"--max-tokens keeps none)")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.plan = Plan(docs, cfg, pad_id)
        self.fire_mode, self.fire_frac = parse_fire_threshold(cfg.fire_threshold,
                                                              _layer_gated(self.nmap))
        self.exact = [len(d) <= cfg.exact_pooled_cap for d in docs]
        self.out = Path(cfg.out)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- identity of this run: a checkpoint only resumes the same run
    def _settings(self) -> dict:
        cfg = self.cfg
        keys = ("max_docs", "max_tokens", "max_length", "batch_size", "padding_side",
                "coact_token_fraction", "top_k_global", "global_max_docs", "seed",
                "exact_pooled_cap", "histogram_bins", "calibration_docs", "checkpoint_every")
        settings = {k: getattr(cfg, k) for k in keys}
        fire = "> 0" if self.fire_mode == "zero" else (
            f"|a| > {self.fire_frac} x max |a| of the neuron on the first offensive batch")
        settings.update(fire_threshold=fire, fire_threshold_spec=cfg.fire_threshold,
                        dtype=str(self._dtype()).replace("torch.", ""),
                        device=str(self.device), processes=self.procs.world)
        rows = gram_row_dtype(self._dtype(), self.device)
        if rows != torch.float32:  # a checkpoint resumes only in the precision it was summed in
            settings["gram_rows"] = str(rows).replace("torch.", "")
        return settings

    def _fingerprint(self) -> str:
        payload = {"model": self.loaded.identity, "settings": self._settings(),
                   "corpora": [c.sha256 for c in self.corpora]}
        payload["settings"].pop("device")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # --- forward passes
    def _forward(self, batch: _Batch) -> None:
        forward_batch(self.model, batch, self.device)

    def _hooks(self, fn, layers: list[int] | None = None) -> NeuronHooks:
        return stopping_hooks(self.model, self.nmap, fn, layers)

    def _calibrate(self) -> dict[str, torch.Tensor]:
        """Per-neuron constants read from fixed documents that every process reads alike (no
        communication needed): fire threshold and shift [L, W] from the first offensive batch,
        and the histogram bin range from the first documents of each corpus."""
        threshold = torch.zeros(self.L, self.W, device=self.device)
        shift = torch.zeros(self.L, self.W, device=self.device)
        batch = self.plan.make(0, self.plan.batches(0)[0], 1.0)
        valid = batch.valid.to(self.device)

        def first_batch(layer, acts):
            tokens = acts.float().reshape(-1, self.W).index_select(0, valid)
            shift[layer] = tokens.mean(0)
            if self.fire_mode == "relative":
                threshold[layer] = tokens.abs().amax(0) * self.fire_frac

        with self._hooks(first_batch):
            self._forward(batch)
        calibration = {"threshold": threshold, "shift": shift}
        if all(self.exact):
            return calibration
        lo = torch.full((self.L, self.W), float("inf"), device=self.device)
        hi = torch.full((self.L, self.W), float("-inf"), device=self.device)
        for corpus in range(len(CORPORA)):
            n = min(self.cfg.calibration_docs, len(self.plan.docs[corpus]))
            for docs in self.plan.batches(corpus, list(range(n))):
                batch = self.plan.make(corpus, docs, 1.0)
                bias = torch.where(batch.attention_mask.bool(), 0.0, float("-inf"))
                bias = bias.unsqueeze(2).to(self.device)

                def minmax(layer, acts, bias=bias):
                    pooled = (acts.float() + bias).amax(1)  # [B, W]
                    torch.minimum(lo[layer], pooled.amin(0), out=lo[layer])
                    torch.maximum(hi[layer], pooled.amax(0), out=hi[layer])

                with self._hooks(minmax):
                    self._forward(batch)
        span = (hi - lo).clamp(min=1e-6)
        return {**calibration, "hist_lo": lo - 0.25 * span, "hist_hi": hi + 0.25 * span}

    def _rounds(self, schedule: list) -> int:
        return -(-len(schedule) // self.procs.world)

    def _progress(self, schedule, start_round: int, desc: str):
        from tqdm import tqdm

        tokens = [sum(len(self.plan.docs[c][d]) for d in docs) for c, docs in schedule]
        done = sum(tokens[: start_round * self.procs.world])
        bar = tqdm(total=sum(tokens), initial=done, unit="tok", unit_scale=True, desc=desc,
                   disable=not self.procs.main, dynamic_ncols=True)
        return bar, tokens

    # --- pass 1: both corpora
    def _pooled_files(self, create: bool) -> list[dict[str, np.ndarray] | None]:
        folder = self.out / "pooled"
        files = []
        if create and self.procs.main:
            folder.mkdir(parents=True, exist_ok=True)
        for corpus, name in enumerate(CORPORA):
            if not self.exact[corpus]:
                files.append(None)
                continue
            shape = (len(self.plan.docs[corpus]), self.L, self.W)
            paths = {kind: folder / f"{name}.{kind}.npy" for kind in ("max", "mean")}
            if create and self.procs.main:
                for path in paths.values():
                    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            files.append(paths)
        self.procs.barrier()
        return [None if p is None else {k: np.load(v, mmap_mode="r+") for k, v in p.items()}
                for p in files]

    def first_pass(self, resume: dict | None, ckpt: _Checkpoints) -> dict[str, torch.Tensor]:
        schedule = [(c, docs) for c in range(len(CORPORA)) for docs in self.plan.batches(c)]
        start = 0
        saved = None
        if resume is not None:
            saved = ckpt.load_state(resume)
            start = resume["round"]
            calibration = {k[len("calib."):]: v for k, v in saved.items()
                           if k.startswith("calib.")}
        else:
            calibration = self._calibrate()
        acc = FirstPass(self.L, self.W, self.device, self.fire_mode, calibration,
                         self.cfg.histogram_bins, self._dtype())
        if saved is not None:
            acc.load(saved)
        pooled = self._pooled_files(create=resume is None)
        fraction = self.cfg.coact_token_fraction
        bar, tokens = self._progress(schedule, start, "collect")
        rounds = self._rounds(schedule)

        def checkpoint_state():
            calib = {f"calib.{k}": v for k, v in calibration.items()}
            return {**acc.state_for_checkpoint(), **calib}

        with self._hooks(acc.hook) as hooks:
            for rnd in range(start, rounds):
                index = rnd * self.procs.world + self.procs.rank
                if index < len(schedule):
                    corpus, docs = schedule[index]
                    batch = self.plan.make(corpus, docs, fraction)
                    acc.start(batch, self.device)
                    self._forward(batch)
                    pmax, pmean = acc.finish()
                    if pooled[corpus] is not None:
                        rows = np.asarray(docs)
                        pooled[corpus]["max"][rows] = acc.to_host("max", pmax)
                        pooled[corpus]["mean"][rows] = acc.to_host("mean", pmean)
                first = rnd * self.procs.world
                bar.update(sum(tokens[first:first + self.procs.world]))
                if (rnd + 1) % self.cfg.checkpoint_every == 0 and rnd + 1 < rounds:
                    for files in filter(None, pooled):
                        for mm in files.values():
                            mm.flush()
                    ckpt.save(f"pass1.r{rnd + 1}", checkpoint_state(),
                              {"phase": "pass1", "round": rnd + 1})
            hooks.check_fired()
        bar.close()
        for files in filter(None, pooled):
            for mm in files.values():
                mm.flush()
        state = acc.state_for_checkpoint()
        reduced = {k: self.procs.sum(v.clone()) for k, v in state.items()}
        reduced["coact.gram"] = acc.gram.full(reduced["coact.gram"])
        reduced.update({f"calib.{k}": v for k, v in calibration.items()})
        return reduced

    @staticmethod
    def effect_size(r: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cohen's d of the max-pooled values per neuron, offensive minus clean: [L, W]."""
        o, c = CORPORA
        return cohens_d(int(r[f"{o}.documents"]), r[f"{o}.pmax_sum"], r[f"{o}.pmax_sumsq"],
                        int(r[f"{c}.documents"]), r[f"{c}.pmax_sum"], r[f"{c}.pmax_sumsq"])

    # --- statistics from the reduced sums (main process)
    def statistics(self, r: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
        stats: dict[str, torch.Tensor] = {}
        k = r["calib.shift"].double()
        for c in CORPORA:
            n = r[f"{c}.tokens"].double()
            docs = r[f"{c}.documents"].double()
            mean = r[f"{c}.sum"] / n
            offset = mean - k  # mean of the shifted values
            sumsq_shifted = r[f"{c}.sumsq_shifted"]
            stats.update({
                f"{c}.tokens": r[f"{c}.tokens"], f"{c}.documents": r[f"{c}.documents"],
                f"{c}.sum": r[f"{c}.sum"],
                f"{c}.sumsq": sumsq_shifted + 2 * k * r[f"{c}.sum"] - n * k * k,
                f"{c}.mean": mean,
                f"{c}.var": (sumsq_shifted / n - offset * offset).clamp(min=0),
                f"{c}.fire_rate": r[f"{c}.fires"].double() / n,
                f"{c}.pooled_max_mean": r[f"{c}.pmax_sum"] / docs,
                f"{c}.pooled_mean_mean": r[f"{c}.pmean_sum"] / docs,
            })
        o, c = CORPORA
        stats["effect_size"] = self.effect_size(r).float()
        stats["fire_threshold"] = r["calib.threshold"].float()
        auroc_info = {"pooling": "max over a document's non-padding tokens"}
        if all(self.exact):
            pos = np.load(self.out / "pooled" / f"{o}.max.npy", mmap_mode="r")
            neg = np.load(self.out / "pooled" / f"{c}.max.npy", mmap_mode="r")
            auc = auroc_exact(pos.reshape(len(pos), -1), neg.reshape(len(neg), -1))
            stats["auroc"] = torch.from_numpy(auc).view(self.L, self.W).float()
            auroc_info["method"] = "exact (Mann-Whitney U, ties count 1/2)"
        else:
            lo, hi = r["calib.hist_lo"].cpu(), r["calib.hist_hi"].cpu()
            hists = []
            for corpus, name in enumerate(CORPORA):
                if self.exact[corpus]:
                    values = np.load(self.out / "pooled" / f"{name}.max.npy", mmap_mode="r")
                    hists.append(histogram_of(values, lo, hi, self.cfg.histogram_bins))
                else:
                    hists.append(r[f"{name}.hist"].cpu())
                stats[f"{name}.pooled_max_hist"] = hists[-1].to(torch.int32)
            auc, bound = auroc_from_hist(*hists)
            stats["auroc"] = auc.float()
            stats["auroc_error_bound"] = bound.float()
            stats["pooled_hist_lo"], stats["pooled_hist_hi"] = lo.float(), hi.float()
            auroc_info.update(
                method=f"per-neuron histograms, {self.cfg.histogram_bins} bins between "
                       f"pooled_hist_lo and pooled_hist_hi (set from the first "
                       f"{self.cfg.calibration_docs} documents of each corpus, widened by 25% "
                       f"of the range on each side; values outside fall in the end bins)",
                error_bound="|auroc - exact| <= auroc_error_bound = 0.5 * sum_b p_b q_b",
                max_error_bound=float(bound.max()))
        n = r["coact.tokens"]
        total, gram = unshift(r["coact.sum_shifted"], r["coact.gram"], k, n)
        coact = {"tokens": n, "sum": total, "gram": gram}
        return ({k: v.cpu() for k, v in stats.items()}, {k: v.cpu() for k, v in coact.items()},
                auroc_info)

    # --- pass 2: global Gram of the top-K neurons
    def _global_docs(self, corpus: int) -> list[int]:
        n = len(self.plan.docs[corpus])
        want = self.cfg.global_max_docs
        if want is None or want >= n:
            return list(range(n))
        rng = np.random.default_rng([self.cfg.seed, 1 << 20, corpus])
        return sorted(rng.choice(n, size=want, replace=False).tolist())

    def candidates(self, effect_size: torch.Tensor) -> torch.Tensor:
        """(layer, neuron) [K, 2] of the top-K |effect size| neurons, in (layer, neuron) order."""
        k = min(self.cfg.top_k_global, self.L * self.W)
        order = torch.argsort(effect_size.abs().flatten(), descending=True, stable=True)[:k]
        order = order.sort().values
        return torch.stack([order // self.W, order % self.W], dim=1)

    def second_pass(self, index: torch.Tensor, shift: torch.Tensor, resume: dict | None,
                    ckpt: _Checkpoints) -> dict[str, torch.Tensor]:
        """Gram matrix of the candidates `index` [K, 2] across layers (around `shift` [L, W])."""
        K = index.shape[0]
        shift = shift.to(self.device)
        layers = sorted(set(index[:, 0].tolist()))
        columns = {layer: index[index[:, 0] == layer, 1].to(self.device) for layer in layers}
        offsets, at = {}, 0
        for layer in layers:
            offsets[layer] = at
            at += columns[layer].numel()
        schedule = [(c, docs) for c in range(len(CORPORA))
                    for docs in self.plan.batches(c, self._global_docs(c))]
        gram = SymmetricGram(1, K, self.device)
        total = torch.zeros(K, dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        start = 0
        if resume is not None and resume["round"] > 0:
            saved = ckpt.load_state(resume)
            gram.total.copy_(saved["gram"])
            total.copy_(saved["sum"])
            count.copy_(saved["tokens"])
            start = resume["round"]
        buf = {}

        def hook(layer, acts):
            tokens = acts.float().reshape(-1, self.W).index_select(0, buf["valid"])
            cols = columns[layer]
            buf["x"][:, offsets[layer]:offsets[layer] + cols.numel()] = (
                tokens[:, cols] - shift[layer, cols])

        bar, tokens = self._progress(schedule, start, "global gram")
        rounds = self._rounds(schedule)
        with self._hooks(hook, layers) as hooks:
            for rnd in range(start, rounds):
                i = rnd * self.procs.world + self.procs.rank
                if i < len(schedule):
                    batch = self.plan.make(*schedule[i], 1.0)
                    buf["valid"] = batch.valid.to(self.device)
                    buf["x"] = torch.empty(batch.tokens, K, device=self.device)
                    self._forward(batch)
                    gram.add(buf["x"].unsqueeze(0))
                    total += buf["x"].sum(0)
                    count += batch.tokens
                first = rnd * self.procs.world
                bar.update(sum(tokens[first:first + self.procs.world]))
                if (rnd + 1) % self.cfg.checkpoint_every == 0 and rnd + 1 < rounds:
                    gram.flush()
                    ckpt.save(f"pass2.r{rnd + 1}",
                              {"gram": gram.total, "sum": total, "tokens": count},
                              {"phase": "pass2", "round": rnd + 1})
            hooks.check_fired()
        bar.close()
        gram.flush()
        n = self.procs.sum(count.clone())
        raw_sum, raw_gram = unshift(self.procs.sum(total.clone()),
                                    gram.full(self.procs.sum(gram.total.clone()))[0],
                                    shift[index[:, 0], index[:, 1]], n)
        return {"global.index": index, "global.sum": raw_sum.cpu(), "global.gram": raw_gram.cpu(),
                "global.tokens": n.cpu()}

    # --- everything
    def run(self) -> int:
        cfg, procs = self.cfg, self.procs
        fingerprint = self._fingerprint()
        manifest_path = self.out / "manifest.json"
        if procs.main and not cfg.resume and self.out.exists():
            for name in ("manifest.json", "stats.safetensors", "coact.safetensors"):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / ".checkpoint", ignore_errors=True)
            shutil.rmtree(self.out / "pooled", ignore_errors=True)
        procs.barrier()
        if manifest_path.is_file():
            manifest = read_json(manifest_path, "pass --no-resume to collect again")
            if manifest.get("fingerprint") == fingerprint and manifest.get("complete"):
                if procs.main:
                    print(f"lmprune collect: {self.out} is complete already (same settings)")
                procs.close()
                return 0
            raise LmpruneError(f"{self.out} holds statistics of another run; choose another "
                               f"--out or pass --no-resume to overwrite them")
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = _Checkpoints(self.out, procs, fingerprint)
        resume = ckpt.read() if cfg.resume else None
        started = time.perf_counter()

        pass1_file = ckpt.dir / "pass1.safetensors"
        if resume is not None and resume["phase"] != "pass1":
            reduced = load_file(pass1_file)
        else:
            reduced = self.first_pass(resume, ckpt)
            resume = None
        tokens_pass1 = sum(int(reduced[f"{c}.tokens"]) for c in CORPORA)
        elapsed_pass1 = time.perf_counter() - started
        index = torch.zeros(0, 2, dtype=torch.int64)
        if cfg.top_k_global:  # every process picks them; the main process's choice wins
            index = self.candidates(self.effect_size(reduced).cpu())
            index = procs.broadcast(index.to(self.device)).cpu()
        if resume is None:  # pass 1 just ended: make its reduced sums durable first
            ckpt.dir.mkdir(parents=True, exist_ok=True)
            if procs.main:
                _save_tensors(pass1_file, reduced)
            ckpt.save("pass2.r0", {}, {"phase": "pass2", "round": 0})
            resume = {"phase": "pass2", "round": 0, "tag": "pass2.r0"}
        coact = {}
        if cfg.top_k_global:
            coact = self.second_pass(index, reduced["calib.shift"], resume, ckpt)
        if procs.main:
            stats, layer_coact, auroc_info = self.statistics(reduced)
            coact.update(layer_coact)
            _save_tensors(self.out / "stats.safetensors", stats)
            _save_tensors(self.out / "coact.safetensors", coact)
            manifest = self._manifest(stats, coact, auroc_info, fingerprint, tokens_pass1,
                                      elapsed_pass1)
            write_json_atomic(manifest_path, manifest)
            shutil.rmtree(ckpt.dir, ignore_errors=True)
            print(f"lmprune collect: wrote {self.out} ({tokens_pass1:,} tokens, "
                  f"{tokens_pass1 / max(elapsed_pass1, 1e-9):,.0f} tok/s)")
        procs.barrier()
        procs.close()
        return 0

    def _manifest(self, stats, coact, auroc_info, fingerprint, tokens, elapsed) -> dict:
        cfg = self.cfg
        corpora = {}
        for corpus, name in enumerate(CORPORA):
            info = self.corpora[corpus].describe()
            info.update(documents=int(stats[f"{name}.documents"]),
                        tokens=int(stats[f"{name}.tokens"]))
            if self.exact[corpus]:
                info["pooled"] = {"mode": "exact", "max": f"pooled/{name}.max.npy",
                                  "mean": f"pooled/{name}.mean.npy",
                                  "shape": [info["documents"], self.L, self.W],
                                  "rows": "documents in corpus order"}
            else:
                info["pooled"] = {"mode": "histogram", "key": f"{name}.pooled_max_hist"}
            corpora[name] = info
        rows = str(gram_row_dtype(self._dtype(), self.device)).replace("torch.", "")
        coactivation = {
            "tokens": int(coact["tokens"]),
            "sampling": f"each non-padding token with probability {cfg.coact_token_fraction}, "
                        f"drawn per document by lmprune.collect.coact_token_mask(seed={cfg.seed},"
                        f" corpus index (offensive 0, clean 1), document index, length): "
                        f"independent of batching, padding and processes; both corpora",
            "products": f"rows centred by a per-neuron shift, kept in {rows}, multiplied with "
                        f"float32 sums, added to float64 every few batches",
        }
        if cfg.top_k_global:
            chosen = [self._global_docs(c) for c in range(len(CORPORA))]
            docs = [len(c) for c in chosen]
            coactivation["global"] = {
                "k": int(coact["global.index"].shape[0]), "tokens": int(coact["global.tokens"]),
                "candidates": "top-K |effect_size| over all layers (ties: lower index first)",
                "sampling": f"second pass over {docs[0]} offensive and {docs[1]} clean documents "
                            f"(seeded choice, seed {cfg.seed}; all if the corpus is smaller), "
                            f"every non-padding token",
                "documents": dict(zip(CORPORA, chosen, strict=True)),
            }
        return {
            "format": "lmprune.stats", "format_version": FORMAT_VERSION,
            "lmprune_version": __version__,
            "model": self.loaded.identity,
            "num_layers": self.L, "neurons_per_layer": self.W,
            "hook_points": self.nmap.hook_points,
            "corpora": corpora,
            "settings": self._settings(),
            "coactivation": coactivation,
            "auroc": auroc_info,
            "throughput": {"first_pass_tokens": tokens, "first_pass_seconds": round(elapsed, 3),
                           "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1)},
            "config": asdict(cfg),
            "fingerprint": fingerprint,
            "complete": True,
        }


def run_collect(cfg: CollectConfig) -> int:
    check_out_dir(cfg.out, "stats", cfg.overwrite)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun the first process writes
    with folder_lock(cfg.out) if main else contextlib.nullcontext(), torch.inference_mode():
        return Collector(cfg).run()


def register(subparsers) -> None:
    from lmprune.config import register_stage

    register_stage(subparsers, "collect", CollectConfig, run_collect,
                   help="Stream per-neuron statistics and co-activation on an offensive and a "
                        "clean corpus.")
