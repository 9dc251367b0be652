"""Running Gram matrices: SymmetricGram (`sum_t x_t x_t^T` for many groups at once, multiplied
over the upper block triangle every few batches) and the precision its rows are kept in.
"""

from __future__ import annotations

import functools

import torch

_GRAM_BLOCKS = 8  # block rows of the upper-triangle Gram update: (8 + 1) / 16 of a full product
_GRAM_FLUSH_EVERY = 8  # batches of rows multiplied at once, summed in float32, then added to
_GRAM_MAX_ROWS = 16384  # ... the float64 total (fewer batches where they hold more rows)


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
