"""Seeded, resumable batch order shared by every loader.

`EpochSampler` visits N items in a fresh seeded permutation each epoch; its position
(epoch, index) goes into checkpoints, so a resumed run draws exactly the next batch. With
world > 1 each rank takes its own slice of every global batch. With accum > 1 (micro-batches
per optimizer step) the ragged end of an epoch is dropped per whole step, so 2 x 4 rows draw
the same rows as 1 x 8 on every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from typing import Any

import torch


class EpochSampler:
    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 accum: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.accum = accum
        self.epoch, self.index = 0, 0
        self._drawn = 0  # micro-batches drawn of the current optimizer step
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def next_indices(self) -> list[int]:
        step = self.batch_size * self.world
        whole = step * self.accum  # rows of one optimizer step
        # A step starts by counting, not by index % whole: a run resumed with another
        # global batch (batch_size or data ranks) has an index that is no multiple of it.
        if self._drawn == 0 and self.index + whole > self.n:  # drop the ragged end
            self.epoch, self.index = self.epoch + 1, 0
        self._drawn = (self._drawn + 1) % self.accum
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), self.epoch
        start = self.index + self.rank * self.batch_size
        self.index += step
        return self._perm[start: start + self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._drawn = 0  # checkpoints are taken between optimizer steps


class ExampleLoader:
    """Batches of whole examples: `collate` turns a list of items into tensors. With
    world > 1, batch_size is per rank and rank takes its own rows of each global batch;
    accum: micro-batches per optimizer step (see EpochSampler)."""

    def __init__(self, items: Sequence[Any], batch_size: int, collate: Callable[[list], tuple],
                 seed: int = 0, rank: int = 0, world: int = 1, accum: int = 1):
        if len(items) < batch_size * world * accum:
            raise ValueError(f"{len(items)} examples is fewer than one step of "
                             f"{batch_size * world * accum}")
        self.items, self.collate = items, collate
        self.sampler = EpochSampler(len(items), batch_size, seed, rank, world, accum)

    def next_batch(self) -> tuple:
        return self.collate([self.items[i] for i in self.sampler.next_indices()])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def batches_by_length(seqs: Sequence[Sized], batch_size: int) -> list[list[int]]:
    """Indices of seqs in batches of similar lengths (shortest first), for inference passes
    whose results are put back in order: a batch then pads little."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of items grouped into rows of at most `width` tokens: longest first, each
    into the first row with room (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack(items: list[tuple[list[int], list[int]]], width: int, pad_id: int, ignore: int
         ) -> tuple[torch.Tensor, ...]:
    """(inputs, targets) pairs packed into as few rows as first-fit finds, instead of one
    right-padded row each. A row holds at most as many tokens as the longest item (the
    padded batch's width; `width`, the model's context, caps it too): so a packed batch
    never has more rows, tokens or attention (rows x width^2, under the block-diagonal
    mask) than the padded one, however long the context (rows of a 32k context would be
    one mostly empty row with a 32k x 32k mask). Returns inputs, targets (`ignore` on
    padding), positions (from 0 in every item) and segments (the item's place in its row;
    -1 on padding): with `packed_attention(segments)` each item sees only itself, so the
    loss and its gradients are those of the padded batch, for far fewer tokens (a batch of
    the built-in SFT conversations is about half padding)."""
    lengths = [len(a) for a, _ in items]
    rows = first_fit(lengths, min(width, max(lengths)))
    T = max(sum(len(items[i][0]) for i in row) for row in rows)
    x, y, pos, seg = [], [], [], []
    for row in rows:
        parts = [items[i] for i in row]
        fill = T - sum(len(a) for a, _ in parts)
        x.append([t for a, _ in parts for t in a] + [pad_id] * fill)
        y.append([t for _, b in parts for t in b] + [ignore] * fill)
        pos.append([p for a, _ in parts for p in range(len(a))] + [0] * fill)
        seg.append([k for k, (a, _) in enumerate(parts) for _ in a] + [-1] * fill)
    return tuple(torch.tensor(t, dtype=torch.long) for t in (x, y, pos, seg))


def pack_spans(valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """How to pack a padded (B, T) batch whose rows each hold one contiguous span of tokens
    (`valid`: a right-padded sequence, or a left-padded prompt then a right-padded answer)
    into as few rows of at most T tokens as first-fit finds, for `run_packed`. Returns, on
    valid's device: take (R, W), the flat index into the (B*T) batch each packed slot reads
    (padding: 0); positions (R, W), from 0 in every span; segments (R, W), -1 on padding;
    and back (B, T), the flat index into the (R*W) packed rows each cell of the batch reads
    back (a padding cell reads its span's first token: finite, and masked out by the
    caller). Returns () where packing would not save a slot (e.g. equal lengths)."""
    B, T = valid.shape
    ok = valid.cpu()
    lengths, starts = ok.sum(1).tolist(), ok.int().argmax(1).tolist()
    rows = first_fit(lengths, T)
    W = max(sum(lengths[i] for i in row) for row in rows)
    if len(rows) * W >= B * T:
        return ()
    take = torch.zeros(len(rows), W, dtype=torch.long)
    positions = torch.zeros(len(rows), W, dtype=torch.long)
    segments = torch.full((len(rows), W), -1, dtype=torch.long)
    back = torch.zeros(B, T, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            n, s = lengths[i], starts[i]
            take[r, at: at + n] = torch.arange(i * T + s, i * T + s + n)
            positions[r, at: at + n] = torch.arange(n)
            segments[r, at: at + n] = k
            back[i] = r * W + at
            back[i, s: s + n] = torch.arange(r * W + at, r * W + at + n)
            at += n
    return tuple(t.to(valid.device) for t in (take, positions, segments, back))


def run_packed(fn: Callable[..., torch.Tensor], tokens: torch.Tensor,
               packing: Sequence[torch.Tensor]) -> torch.Tensor:
    """fn(tokens, positions, mask) -> (B, T, ...) for a padded batch, computed over its rows
    packed as `pack_spans` says (each span seeing only itself) and returned in the padded
    layout: the values of the padded batch, for the compute of its real tokens only."""
    take, positions, segments, back = packing
    out = fn(tokens.flatten()[take], positions, packed_attention(segments))
    return out.flatten(0, 1)[back]


def packed_attention(segments: torch.Tensor) -> torch.Tensor:
    """The (R, 1, T, T) causal mask of packed rows: a token sees the earlier tokens of its
    own item (padding sees padding, so no query is left with nothing to attend to)."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal).unsqueeze(1)


def split_heldout(items: list) -> tuple[list, list]:
    """(train, held_out): the one held-out rule of every post-training stage. The first
    10% of the items (at least 1, at most 256) measure val_* metrics, never trained on: a
    later copy of a held-out item leaves train (the built-in task examples repeat: 55 of
    the 256 held-out SFT conversations were also training ones). Items are nested lists
    and tuples of numbers (token ids, scores), compared by value."""
    n = max(1, min(256, len(items) // 10))
    held = {repr(item) for item in items[:n]}
    return [item for item in items[n:] if repr(item) not in held], items[:n]


def held_out_words(n_items: int, n_train: int, n_held: int) -> str:
    """'25 held out', or '25 held out, 4 copies of those' (for the "too few" messages)."""
    copies = n_items - n_train - n_held
    return f"{n_held} held out" + (f", {copies} copies of those" if copies else "")
