"""The first pass's accumulators: FirstPass, the hook that reads every layer's neurons into
per-batch buffers and folds them into per-process sums (tokens, sums, shifted squares,
firing counts, pooled values, histograms, the per-layer Gram rows), and `_layer_sums`,
the per-layer sums that torch.compile fuses into one read of the activations on GPUs.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from lmprune.collect.config import CORPORA
from lmprune.collect.gram import SymmetricGram
from lmprune.collect.plan import Batch


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
        self.batch: Batch | None = None
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self._host: dict[str, torch.Tensor] = {}

    def start(self, batch: Batch, device) -> None:
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
