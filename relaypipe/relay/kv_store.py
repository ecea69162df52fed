"""The slot key/value store: every cached request's keys and values in one tensor.

``KVStore.data`` is ``[layers, 2, slots, kv_heads, length, head_dim]`` (2: keys, values). A
request owns one slot and its context token j sits at column j, so requests of any lengths
batch without padding their caches: a query at position p attends to columns 0..p of its row.
Fresh storage is zero and only finite values are ever written, so columns a row does not
attend to are harmless under a mask. Columns are added as sequences lengthen (:func:`grown`),
not for the longest possible decode up front.

A forward reaches the store through :class:`SlotRows`, the rows of its batch: it writes each
input token's keys/values at (slot, position) straight into the store and reads columns
``0..hi-1`` of its slots (a view when the slots are consecutive, else one gather per layer), so
a batch can be any set of requests, changing at every step, with nothing to write back.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


def grown(needed: int, have: int, chunk: int, cap: int | None = None) -> int:
    """Columns to allocate when ``have`` are too few for ``needed``: the next multiple of
    ``chunk`` or twice ``have``, whichever is more (a long decode is copied O(log n) times, a
    short one holds about what it wrote), but no more than ``cap`` (never less than needed)."""
    size = max(-(-needed // chunk) * chunk, 2 * have)
    return size if cap is None else max(needed, min(size, cap))


class KVStore:
    """Slots of keys/values, handed out lowest first and grown geometrically."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, dtype, device, chunk: int = 64
    ) -> None:
        self.data = torch.zeros((layers, 2, 0, kv_heads, 0, head_dim), dtype=dtype, device=device)
        self._free: list[int] = []  # a heap: the lowest free slot first keeps batches contiguous
        self.slots_used = 0
        self.chunk = chunk

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def acquire(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self.slots_used += 1
        return self.slots_used - 1

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def reserve(self, length: int, cap: int | None = None) -> None:
        """Room for every acquired slot and ``length`` columns (grows geometrically, to at
        most ``cap`` columns: what the requests decoding could ever reach)."""
        n_layers, _, slots, heads, cols, dim = self.data.shape
        if slots >= self.slots_used and cols >= length:
            return
        new_slots = slots if slots >= self.slots_used else max(self.slots_used, 2 * slots)
        new_cols = cols if cols >= length else grown(length, cols, self.chunk, cap)
        bigger = self.data.new_zeros((n_layers, 2, new_slots, heads, new_cols, dim))
        bigger[:, :, :slots, :, :cols] = self.data
        self.data = bigger


@dataclass
class Entry:
    """One request's slot and the tokens whose keys/values sit in its columns 0..len-1."""

    slot: int
    ids: list[int]


class SlotRows:
    """The cache rows of one forward: batch row b is slot ``slots[b]``, its inputs sit at
    columns ``pos[b]``, and it attends to columns ``0..hi-1`` (masked to ``<= pos``).

    Build it after :meth:`KVStore.reserve` and use it for one forward only (a later reserve
    may replace the store's tensor).
    """

    def __init__(self, store: KVStore, slots: list[int], pos: torch.Tensor, hi: int) -> None:
        self.data, self.pos, self.hi = store.data, pos, hi
        b, dev = len(slots), store.data.device
        self.batch = torch.arange(b, device=dev).unsqueeze(1)  # [B, 1]
        first = slots[0]
        if slots == list(range(first, first + b)):  # a view: no copy at all
            self._span: slice | None = slice(first, first + b)
            self._index = self.batch
        else:
            self._span = None
            self._index = torch.tensor(slots, dtype=torch.long, device=dev).unsqueeze(1)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the inputs' keys and values, each ``[B, T, kv_heads, head_dim]``."""
        for which, new in ((0, keys), (1, values)):
            part = self.data[layer, which]
            if self._span is not None:
                part[self._span][self.batch, :, self.pos] = new.to(part.dtype)
            else:
                part[self._index, :, self.pos] = new.to(part.dtype)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, kv_heads, hi, head_dim]`` of the batch's slots."""
        k, v = self.data[layer, 0, :, :, : self.hi], self.data[layer, 1, :, :, : self.hi]
        if self._span is not None:
            return k[self._span], v[self._span]
        index = self._index[:, 0]
        return k.index_select(0, index), v.index_select(0, index)
