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
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from booster_jax.errors import BoosterInputError

Tokenized = Tuple[np.ndarray, np.ndarray]  # (ids int32[L], loss_mask float32[L])

DEFAULT_BUCKETS = (64, 128, 192, 256)


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
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of ``epoch``: a pure function of (seed, epoch, n)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(n)


class BatchStream:
    """Shuffled batches over tokenized examples, epoch by epoch, resumable from ``state()``.

    Finite mode (default): iterating yields the rest of the current epoch and then
    stops; iterating again continues with the next epoch. Infinite mode never stops.
    """

    _STATE_KEYS = ("seed", "batch_size", "n_items", "drop_last", "shuffle")

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
        for i, (ids, _) in enumerate(self.items):
            if len(ids) > self.buckets[-1]:
                raise BoosterInputError(
                    f"example {i} has {len(ids)} tokens, more than the largest bucket {self.buckets[-1]}"
                )
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
    def steps_per_epoch(self) -> int:
        n, b = len(self.items), self.batch_size
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

    # -- iteration
    def _epoch_end(self) -> int:
        n = len(self.items)
        return n - n % self.batch_size if self.drop_last else n

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._position >= self._epoch_end():
            self._epoch += 1
            self._position = 0
            if not self.infinite:
                raise StopIteration
        if self._perm_epoch != self._epoch:
            self._perm = self.permutation(self._epoch)
            self._perm_epoch = self._epoch
        idx = self._perm[self._position : self._position + self.batch_size]
        self._position += len(idx)
        batch = collate([self.items[i] for i in idx], self.pad_id, self.buckets, self.batch_size)
        self.real_tokens += int(batch["attention_mask"].sum())
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
            "real_tokens": self.real_tokens,
            "total_tokens": self.total_tokens,
            "n_batches": self.n_batches,
        }

    def restore(self, state: Dict) -> "BatchStream":
        mine = self.state()
        for key in ("epoch", "position") + self._STATE_KEYS:
            if key not in state:
                raise BoosterInputError(f"batch-stream state: key '{key}' is missing")
        for key in self._STATE_KEYS:
            if state[key] != mine[key]:
                raise BoosterInputError(
                    f"batch-stream state: '{key}' is {state[key]!r} but this stream has {mine[key]!r}; "
                    "cannot resume exactly"
                )
        epoch, pos = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= pos <= len(self.items):
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
    "epoch_permutation",
    "lengths_summary",
]
