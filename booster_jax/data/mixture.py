"""The official data selections: alignment/harmful sets and the fine-tuning (attack) mixture.

Row numbers are positions in the refusal file (``read_refusal_rows`` keeps file
order; in its default strict mode no row is skipped, so positions are file rows).

Official code (git-disl/Booster utils.py ``SupervisedDataset``, train.py,
script/alignment/smooth_align.sh, script/finetune/*_poison_ratio.sh):

* alignment (``BeaverTails_safe``, start 5000, sample_num 5000) keeps rows with
  ``5000 < i < 10000``, i.e. 5001..9999 (4999 rows) and uses the refusal pairs;
  Booster's harmful set (``BeaverTails_dangerous``, poison_ratio 1, bad_sample_num
  5000, start 5000) is the prompt/response pairs of the same rows.
* fine-tuning (``BeaverTails_dangerous``, start 0, sample_num n, poison_ratio p)
  keeps harmful rows ``0 < i < int(p*n)`` -- int(p*n) - 1 of them, row 0 is never
  used -- plus the *first* ``int((1-p)*n)`` rows of the benign task file. The
  official Trainer shuffles through its sampler; here the mixture itself is
  shuffled with ``seed`` (the training stream shuffles again per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from booster_jax.data.formats import RefusalRow
from booster_jax.data.template import Example
from booster_jax.errors import BoosterInputError

ALIGN_START = 5001  # first alignment row (official: 5000 < i)
ALIGN_END = 10000  # one past the last alignment row (official: i < 5000 + 5000)


def alignment_rows(start: int = ALIGN_START, end: int = ALIGN_END) -> range:
    """Refusal-file rows used for alignment (and Booster's harmful set): start..end-1."""
    return range(start, end)


def finetune_harmful_rows(n: int, p: float) -> range:
    """Refusal-file rows of the attack's harmful part: 0 < i < int(p*n) (official float maths)."""
    return range(1, max(1, int(p * n)))


def n_benign(n: int, p: float) -> int:
    """Benign task examples in the attack mixture: int((1-p)*n), as the official code computes it."""
    return int((1 - p) * n)


def check_disjoint(a: range, b: range, what_a: str, what_b: str) -> None:
    """Raise when two row ranges overlap (fine-tuning harmful rows must not be alignment rows)."""
    lo, hi = max(a.start, b.start), min(a.stop, b.stop)
    if lo < hi:
        raise BoosterInputError(
            f"{what_a} rows {a.start}..{a.stop - 1} overlap {what_b} rows {b.start}..{b.stop - 1} "
            f"(shared rows {lo}..{hi - 1}); they must be disjoint"
        )


def check_disjoint_rows(a: Sequence[int], b: Sequence[int], what_a: str, what_b: str) -> None:
    """Raise when two row selections (ranges or lists) share a row."""
    if isinstance(a, range) and isinstance(b, range):
        return check_disjoint(a, b, what_a, what_b)
    shared = sorted(set(a) & set(b))
    if shared:
        raise BoosterInputError(
            f"{what_a} rows and {what_b} rows share {len(shared)} rows (first {shared[:5]}); they must be disjoint"
        )


def alignment_sets(
    refusal_rows: Sequence[RefusalRow], start: int = ALIGN_START, end: int = ALIGN_END,
    harmful_range: range | None = None,
) -> Tuple[List[Example], List[Example]]:
    """(alignment, harmful) examples: refusal pairs of rows start..end-1, and prompt/response pairs of
    ``harmful_range`` (None = the same rows, as the official code)."""
    if start < 0 or end <= start:
        raise BoosterInputError(f"alignment rows: need 0 <= start < end, got start={start}, end={end}")
    harm = range(start, end) if harmful_range is None else harmful_range
    for what, r in (("alignment", range(start, end)), ("Booster harmful-set", harm)):
        if len(refusal_rows) < r.stop:
            raise BoosterInputError(
                f"{what} rows {r.start}..{r.stop - 1} need at least {r.stop} refusal rows, "
                f"the refusal file has {len(refusal_rows)}"
            )
    return ([refusal_rows[i].alignment_example() for i in range(start, end)],
            [refusal_rows[i].harmful_example() for i in harm])


def attack_harmful_rows(
    n: int, p: float, n_rows: int, *, start: int = 1, order: str = "in_order", pool_end: int = 0,
    exclude: Sequence[int] = (), seed: int = 0,
) -> List[int]:
    """The attack's harmful rows: int(p*n) - 1 of them (the official count).

    ``in_order`` (official, start 1): rows start, start+1, ...; ``sampled``: drawn with ``seed`` from rows
    start..pool_end-1 (0 = the file's end) less ``exclude`` (the rows alignment and Booster use), nested
    across ratios (a larger p adds rows to a smaller p's)."""
    k = max(0, int(p * n) - 1)
    if order == "in_order":
        return list(range(start, start + k))
    pool = [i for i in range(start, pool_end or n_rows) if i not in set(exclude)]
    if len(pool) < k:
        raise BoosterInputError(
            f"the attack needs {k} harmful rows (int(p*n) - 1, n={n}, p={p}); the pool rows {start}.."
            f"{(pool_end or n_rows) - 1} less the alignment / Booster rows hold only {len(pool)}"
        )
    return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:k]]


def task_indices(n_task: int, nb: int, order: str = "first", seed: int = 0) -> List[int]:
    """Which task examples are the attack's benign part: the first ``nb`` (official) or ``nb`` drawn with
    ``seed`` (nested across ratios)."""
    if order == "first":
        return list(range(nb))
    return [int(i) for i in np.random.default_rng(seed + 1).permutation(n_task)[:nb]]


@dataclass(frozen=True)
class FinetuneMixture:
    """The attack's training set, shuffled; ``is_harmful[i]`` marks harmful examples."""

    examples: List[Example]
    is_harmful: List[bool]
    harmful_rows: Sequence[int]  # refusal-file rows the harmful part came from

    @property
    def n_harmful(self) -> int:
        return sum(self.is_harmful)

    @property
    def n_benign(self) -> int:
        return len(self.examples) - self.n_harmful

    def __len__(self) -> int:
        return len(self.examples)


def finetune_mixture(
    refusal_rows: Sequence[RefusalRow],
    task_examples: Sequence[Example],
    n: int,
    p: float,
    seed: int,
    *,
    alignment_range: range | None = alignment_rows(),
    harmful_rows: Sequence[int] | None = None,
    benign_indices: Sequence[int] | None = None,
) -> FinetuneMixture:
    """Harmful pairs of rows 0 < i < int(p*n) plus the first int((1-p)*n) task examples, shuffled.

    Note the official off-by-one: p*n - 1 harmful examples (e.g. 99 for n=1000, p=0.1),
    so the set has n - 1 examples. ``alignment_range`` (None to skip) is checked to be
    disjoint from the harmful rows. ``harmful_rows`` / ``benign_indices`` replace the official
    selections (see :func:`attack_harmful_rows`, :func:`task_indices`).
    """
    if not 0.0 <= p <= 1.0:
        raise BoosterInputError(f"harmful ratio p must be in [0, 1], got {p}")
    if n <= 0:
        raise BoosterInputError(f"fine-tuning sample number n must be > 0, got {n}")
    harm = finetune_harmful_rows(n, p) if harmful_rows is None else harmful_rows
    if alignment_range is not None:
        check_disjoint_rows(harm, alignment_range, "fine-tuning harmful", "alignment")
    if len(harm) and len(refusal_rows) <= max(harm):
        raise BoosterInputError(
            f"fine-tuning harmful rows {min(harm)}..{max(harm)} need at least {max(harm) + 1} refusal rows, "
            f"the refusal file has {len(refusal_rows)}"
        )
    nb = n_benign(n, p)
    if len(task_examples) < nb:
        raise BoosterInputError(
            f"fine-tuning needs {nb} benign task examples (int((1-p)*n), n={n}, p={p}), "
            f"the task data has {len(task_examples)}"
        )
    benign = list(task_examples[:nb]) if benign_indices is None else [task_examples[i] for i in benign_indices]
    examples = [refusal_rows[i].harmful_example() for i in harm] + benign
    flags = [True] * len(harm) + [False] * nb
    order = np.random.default_rng(seed).permutation(len(examples))
    return FinetuneMixture(
        examples=[examples[i] for i in order],
        is_harmful=[flags[i] for i in order],
        harmful_rows=harm,
    )


def benign_mix(
    alignment_examples: Sequence[Example],
    benign_examples: Sequence[Example],
    fraction: float,
    seed: int,
) -> List[Example]:
    """DEVIATION (off by default, not in the official code): add benign instruction data to alignment.

    ``fraction``: the share of the mixed pool (so of each batch, on average) that is benign. Adds
    ``round(fraction / (1 - fraction) * len(alignment_examples))`` benign examples drawn without
    replacement with ``seed``, and shuffles the union. fraction 0 returns the alignment examples
    unchanged (same order).
    """
    if not 0 <= fraction < 1:
        raise BoosterInputError(f"benign fraction must be in [0, 1), got {fraction}")
    k = int(round(fraction / (1 - fraction) * len(alignment_examples)))
    if k == 0:
        return list(alignment_examples)
    if len(benign_examples) < k:
        raise BoosterInputError(
            f"benign mix needs {k} benign examples (fraction {fraction} of {len(alignment_examples)} "
            f"alignment examples), only {len(benign_examples)} given"
        )
    rng = np.random.default_rng(seed)
    picked = [benign_examples[i] for i in rng.choice(len(benign_examples), size=k, replace=False)]
    pool = list(alignment_examples) + picked
    return [pool[i] for i in rng.permutation(len(pool))]
