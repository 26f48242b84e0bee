"""Static-shape batches for jax.jit, and a resumable, seeded, epoch-based batch stream.

Every batch is ``[batch_size, bucket]``: rows are right-padded to the smallest
bucket that holds the longest row, and a short last batch is padded with rows of
``pad_id`` whose masks are all zero, so jit sees only ``len(buckets)`` shapes
and the LM loss (averaged over target tokens) ignores the filler rows.

``BatchStream`` reshuffles every epoch with a permutation that is a pure function
of ``(seed, epoch)``; its ``state()`` (epoch, position in the permutation, token
counters) is JSON-able and ``restore``/``from_state`` continue bit-for-bit. In
``infinite`` mode it rolls into the next epoch when one is exhausted, like the
official harmful-data sampler (a RandomSampler loader re-created on
StopIteration, last partial batch kept).

Two options cut the padding (both off by default, which is the official random sampler):

* ``group_by_length``: Hugging Face's ``group_by_length`` -- the epoch's random order is cut into
  mega-batches of ``GROUP_MEGABATCH * batch_size`` examples, each sorted by length (longest first),
  then cut into batches. Every example is still seen once per epoch, in batches of ``batch_size``;
  what changes is which examples share a batch (similar lengths, so less padding).
* ``pack``: sequence packing. The epoch's examples are packed first-fit-decreasing into rows of
  ``pack_length`` tokens (0 = the largest bucket); a row holds several examples, told apart by ``attention_mask`` holding segment
  ids (1, 2, ... per example, 0 = padding) and ``positions`` restarting at 0 per example (the model
  attends within a segment only). The rows are shuffled and a batch takes ``rows_per_batch`` of them
  (about ``batch_size`` examples' tokens), so the example count per step varies while the tokens
  per step stay close to the unpacked stream's; each example's loss terms are exactly its unpacked
  ones (the first token of a segment is never a target).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from booster_jax.errors import BoosterInputError

Tokenized = Tuple[np.ndarray, np.ndarray]  # (ids int32[L], loss_mask float32[L])

DEFAULT_BUCKETS = (64, 128, 192, 256)
GROUP_MEGABATCH = 50  # HF LengthGroupedSampler: mega-batches of 50 batches


def buckets_up_to(max_length: int, n: int = 4) -> Tuple[int, ...]:
    """n evenly spaced buckets ending at max_length, e.g. 256 -> (64, 128, 192, 256)."""
    if max_length < 1 or n < 1:
        raise BoosterInputError(f"buckets: need max_length >= 1 and n >= 1, got {max_length}, {n}")
    return tuple(sorted({max(1, math.ceil(max_length * (i + 1) / n)) for i in range(n)}))


def _check_buckets(buckets: Sequence[int]) -> Tuple[int, ...]:
    b = tuple(int(x) for x in buckets)
    if not b or any(x < 1 for x in b):
        raise BoosterInputError(f"buckets must be a non-empty list of positive lengths, got {list(buckets)}")
    return tuple(sorted(set(b)))


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; error when n exceeds the largest bucket."""
    b = _check_buckets(buckets)
    for x in b:
        if x >= n:
            return x
    raise BoosterInputError(
        f"sequence of length {n} is longer than the largest bucket {b[-1]} (buckets {list(b)}); "
        "raise the largest bucket or lower max_length"
    )


def target_index(loss_mask: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """[B, K] int32: per row, the positions t whose next token is a target (``loss_mask[t + 1] == 1``),
    in order, padded with T - 1 (whose next token does not exist, so it never carries a loss).

    K is the smallest bucket that holds the longest row's targets (at most T - 1), so a jitted loss sees
    at most ``len(buckets)`` values of K per length and the LM head runs on K positions instead of T
    (``methods.base.target_lm_loss``)."""
    rows, length = loss_mask.shape
    hits = loss_mask[:, 1:] > 0
    most = int(hits.sum(axis=1).max()) if rows else 0
    k = min(next((b for b in _check_buckets(buckets) if b >= max(most, 1)), length), length)
    index = np.full((rows, k), length - 1, dtype=np.int32)
    row, pos = np.nonzero(hits)  # row-major: each row's target positions in order
    index[row, (np.cumsum(hits, axis=1) - 1)[row, pos]] = pos  # the j-th target of a row goes to column j
    return index


def collate(
    tokenized: Sequence[Tokenized],
    pad_id: int,
    buckets: Sequence[int],
    batch_size: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """Right-pad rows to one bucket (and the batch to ``batch_size``) -> input_ids/attention_mask/loss_mask."""
    if len(tokenized) == 0:
        raise BoosterInputError("collate: empty batch")
    rows = len(tokenized)
    bsz = rows if batch_size is None else int(batch_size)
    if rows > bsz:
        raise BoosterInputError(f"collate: {rows} rows do not fit batch_size {bsz}")
    lengths = []
    for i, (ids, mask) in enumerate(tokenized):
        if len(ids) != len(mask):
            raise BoosterInputError(f"collate: row {i}: {len(ids)} ids but {len(mask)} loss-mask entries")
        lengths.append(len(ids))
    length = bucket_length(max(lengths), buckets)
    input_ids = np.full((bsz, length), pad_id, dtype=np.int32)
    attention = np.zeros((bsz, length), dtype=np.int32)
    loss_mask = np.zeros((bsz, length), dtype=np.float32)
    for i, ((ids, mask), n) in enumerate(zip(tokenized, lengths)):
        input_ids[i, :n] = ids
        attention[i, :n] = 1
        loss_mask[i, :n] = mask
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            "target_index": target_index(loss_mask, buckets)}


def collate_packed(rows: Sequence[Sequence[Tokenized]], pad_id: int, length: int,
                   n_rows: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Rows of several examples each -> input_ids, attention_mask (segment ids 1..k, 0 = padding),
    loss_mask (a segment's first token is never a target) and positions (restarting per segment)."""
    n_rows = len(rows) if n_rows is None else int(n_rows)
    if not rows or len(rows) > n_rows:
        raise BoosterInputError(f"collate_packed: {len(rows)} rows for a batch of {n_rows}")
    input_ids = np.full((n_rows, length), pad_id, dtype=np.int32)
    segments = np.zeros((n_rows, length), dtype=np.int32)
    loss_mask = np.zeros((n_rows, length), dtype=np.float32)
    positions = np.zeros((n_rows, length), dtype=np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, (ids, mask) in enumerate(row, 1):
            n = len(ids)
            if at + n > length:
                raise BoosterInputError(f"collate_packed: row {r} holds {at + n} tokens, more than {length}")
            input_ids[r, at:at + n] = ids
            segments[r, at:at + n] = s
            loss_mask[r, at:at + n] = mask
            loss_mask[r, at] = 0.0
            positions[r, at:at + n] = np.arange(n)
            at += n
    return {"input_ids": input_ids, "attention_mask": segments, "loss_mask": loss_mask, "positions": positions,
            "target_index": target_index(loss_mask, (length,))}


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of ``epoch``: a pure function of (seed, epoch, n)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(n)


def group_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int,
                    megabatch: int = GROUP_MEGABATCH) -> np.ndarray:
    """HF ``group_by_length``: ``order`` cut into mega-batches of ``megabatch * batch_size``, each sorted
    by length, longest first (stable, so ties keep the random order)."""
    m = max(1, int(megabatch) * int(batch_size))
    chunks = [order[s:s + m] for s in range(0, len(order), m)]
    return np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks]) if chunks else order


def pack_first_fit(order: np.ndarray, lengths: np.ndarray, row_length: int) -> list:
    """First-fit decreasing: item indices (from ``order``) into rows of at most ``row_length`` tokens.

    The row count depends only on the multiset of lengths, so it is the same in every epoch."""
    room = np.zeros(len(order), dtype=np.int64)
    rows: list = []
    for i in order[np.argsort(-lengths[order], kind="stable")]:
        fits = np.flatnonzero(room[:len(rows)] >= lengths[i])
        r = int(fits[0]) if fits.size else len(rows)
        if r == len(rows):
            rows.append([])
            room[r] = row_length
        rows[r].append(int(i))
        room[r] -= lengths[i]
    return rows


class BatchStream:
    """Shuffled batches over tokenized examples, epoch by epoch, resumable from ``state()``.

    Finite mode (default): iterating yields the rest of the current epoch and then
    stops; iterating again continues with the next epoch. Infinite mode never stops.
    """

    _STATE_KEYS = ("seed", "batch_size", "n_items", "drop_last", "shuffle")
    _OPTION_KEYS = ("group_by_length", "pack", "pack_length")  # absent in states written before: False / 0

    def __init__(
        self,
        items: Sequence[Tokenized],
        batch_size: int,
        *,
        seed: int,
        pad_id: int,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        drop_last: bool = False,
        infinite: bool = False,
        shuffle: bool = True,
        group_by_length: bool = False,
        pack: bool = False,
        pack_length: int = 0,
    ):
        if batch_size < 1:
            raise BoosterInputError(f"batch_size must be >= 1, got {batch_size}")
        if int(seed) < 0:
            raise BoosterInputError(f"seed must be a non-negative integer, got {seed}")
        self.items = list(items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.buckets = _check_buckets(buckets)
        self.drop_last = bool(drop_last)
        self.infinite = bool(infinite)
        self.shuffle = bool(shuffle)
        self.group_by_length = bool(group_by_length)
        self.pack = bool(pack)
        self.pack_length = int(pack_length) or self.buckets[-1]  # 0 = the largest bucket
        if self.pack and self.pack_length < self.buckets[-1]:
            raise BoosterInputError(f"pack_length {self.pack_length} is shorter than the largest bucket "
                                    f"{self.buckets[-1]}; a packed row must hold any example")
        for i, (ids, _) in enumerate(self.items):
            if len(ids) > self.buckets[-1]:
                raise BoosterInputError(
                    f"example {i} has {len(ids)} tokens, more than the largest bucket {self.buckets[-1]}"
                )
        self.lengths = np.array([len(ids) for ids, _ in self.items], dtype=np.int64)
        self._n_units = len(self.items)
        if self.pack:  # units are packed rows; about batch_size examples' tokens per batch
            self._n_units = len(pack_first_fit(np.arange(len(self.items)), self.lengths, self.pack_length))
            mean = float(self.lengths.mean()) if len(self.items) else 0.0
            self.rows_per_batch = max(1, min(self._n_units, round(self.batch_size * mean / self.pack_length)))
        if self.steps_per_epoch == 0:
            raise BoosterInputError(
                f"no batch per epoch: {len(self.items)} examples, batch_size {self.batch_size}, "
                f"drop_last={self.drop_last}"
            )
        self._epoch = 0
        self._position = 0
        self._perm: Optional[np.ndarray] = None
        self._perm_epoch = -1
        self.real_tokens = 0
        self.total_tokens = 0
        self.n_batches = 0

    # -- sizes and statistics
    @property
    def _per_batch(self) -> int:
        return self.rows_per_batch if self.pack else self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        n, b = self._n_units, self._per_batch
        return n // b if self.drop_last else -(-n // b)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def padding_fraction(self) -> float:
        """Padded tokens / all tokens of the batches produced so far (batch-dimension filler included)."""
        return 0.0 if self.total_tokens == 0 else 1.0 - self.real_tokens / self.total_tokens

    def permutation(self, epoch: int) -> np.ndarray:
        n = len(self.items)
        return epoch_permutation(self.seed, epoch, n) if self.shuffle else np.arange(n)

    def epoch_units(self, epoch: int):
        """The epoch's batching units in order: item indices, or (packing) rows of item indices."""
        order = self.permutation(epoch)
        if self.pack:
            rows = pack_first_fit(order, self.lengths, self.pack_length)
            shuffle = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), 1]))
            return [rows[i] for i in (shuffle.permutation(len(rows)) if self.shuffle else range(len(rows)))]
        if self.group_by_length:
            return group_by_length(order, self.lengths, self.batch_size)
        return order

    # -- iteration
    def _epoch_end(self) -> int:
        n, b = self._n_units, self._per_batch
        return n - n % b if self.drop_last else n

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._position >= self._epoch_end():
            self._epoch += 1
            self._position = 0
            if not self.infinite:
                raise StopIteration
        if self._perm_epoch != self._epoch:
            self._perm = self.epoch_units(self._epoch)
            self._perm_epoch = self._epoch
        idx = self._perm[self._position : self._position + self._per_batch]
        self._position += len(idx)
        if self.pack:
            batch = collate_packed([[self.items[i] for i in row] for row in idx], self.pad_id, self.pack_length,
                                   self.rows_per_batch)
        else:
            batch = collate([self.items[i] for i in idx], self.pad_id, self.buckets, self.batch_size)
        self.real_tokens += int(np.count_nonzero(batch["attention_mask"]))
        self.total_tokens += int(batch["attention_mask"].size)
        self.n_batches += 1
        return batch

    def next_batch(self) -> Dict[str, np.ndarray]:
        """One batch; in finite mode an exhausted epoch rolls over instead of stopping."""
        try:
            return next(self)
        except StopIteration:
            return next(self)

    # -- resume
    def state(self) -> Dict[str, int | bool]:
        """JSON-able position: restore() on a stream over the same items continues exactly."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "n_items": len(self.items),
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "group_by_length": self.group_by_length,
            "pack": self.pack,
            "pack_length": self.pack_length if self.pack else 0,
            "real_tokens": self.real_tokens,
            "total_tokens": self.total_tokens,
            "n_batches": self.n_batches,
        }

    def restore(self, state: Dict) -> "BatchStream":
        mine = self.state()
        for key in ("epoch", "position") + self._STATE_KEYS:
            if key not in state:
                raise BoosterInputError(f"batch-stream state: key '{key}' is missing")
        for key in self._STATE_KEYS + self._OPTION_KEYS:
            if state.get(key, False) != mine[key]:
                raise BoosterInputError(
                    f"batch-stream state: '{key}' is {state[key]!r} but this stream has {mine[key]!r}; "
                    "cannot resume exactly"
                )
        epoch, pos = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= pos <= self._n_units:
            raise BoosterInputError(f"batch-stream state: bad epoch/position {epoch}/{pos}")
        self._epoch, self._position = epoch, pos
        self.real_tokens = int(state.get("real_tokens", 0))
        self.total_tokens = int(state.get("total_tokens", 0))
        self.n_batches = int(state.get("n_batches", 0))
        return self

    @classmethod
    def from_state(
        cls,
        items: Sequence[Tokenized],
        state: Dict,
        *,
        pad_id: int,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        infinite: bool = False,
    ) -> "BatchStream":
        for key in ("seed", "batch_size"):
            if key not in state:
                raise BoosterInputError(f"batch-stream state: key '{key}' is missing")
        stream = cls(
            items,
            int(state["batch_size"]),
            seed=int(state["seed"]),
            pad_id=pad_id,
            buckets=buckets,
            drop_last=bool(state.get("drop_last", False)),
            infinite=infinite,
            shuffle=bool(state.get("shuffle", True)),
            group_by_length=bool(state.get("group_by_length", False)),
            pack=bool(state.get("pack", False)),
            pack_length=int(state.get("pack_length", 0)),
        )
        return stream.restore(state)


def lengths_summary(items: Sequence[Tokenized]) -> Dict[str, float]:
    """Token-length statistics, to choose buckets and report truncation pressure."""
    lens = np.array([len(ids) for ids, _ in items]) if items else np.zeros(0)
    if lens.size == 0:
        return {"n": 0}
    return {
        "n": int(lens.size),
        "min": int(lens.min()),
        "mean": float(lens.mean()),
        "p95": float(np.percentile(lens, 95)),
        "max": int(lens.max()),
    }


__all__ = [
    "DEFAULT_BUCKETS",
    "BatchStream",
    "bucket_length",
    "buckets_up_to",
    "collate",
    "collate_packed",
    "target_index",
    "epoch_permutation",
    "group_by_length",
    "pack_first_fit",
    "lengths_summary",
]
