"""Where a finished run directory keeps each run's files (the layout ``pipeline`` writes), for the analyses
that read them after the fact (studies, rejudge, mechanism, judge_check).

    <run dir>/summaries.json
    <run dir>/eval/<variant>-s<seed>-p<p:g>/samples.jsonl      after the attack
    <run dir>/eval/aligned-<align fp>/samples.jsonl           before it
    <run dir>/align/<align fp>/{metrics.jsonl, variants.txt}  variants.txt: the grid runs (<variant>-s<seed>) using it
    <run dir>/finetune/<variant>-s<seed>-p<p:g>/track.jsonl   the attack's harmful training loss

A study's seeds may sit in several run directories; every lookup takes them all and uses the first that has
the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from booster_jax.errors import BoosterInputError


def root(run_dir: str) -> str:
    """The run directory of a run directory or of its summaries.json."""
    return (os.path.dirname(run_dir) or ".") if os.path.isfile(run_dir) else run_dir


def tag(variant: str, seed, ratio: float) -> str:
    return f"{variant}-s{seed}-p{float(ratio):g}"


def first_existing(run_dirs: Sequence[str], *parts: str) -> str | None:
    for d in run_dirs:
        path = os.path.join(root(d), *parts)
        if os.path.exists(path):
            return path
    return None


def attack_samples(run_dirs: Sequence[str], variant: str, seed, ratio: float) -> str | None:
    return first_existing(run_dirs, "eval", tag(variant, seed, ratio), "samples.jsonl")


def attack_track(run_dirs: Sequence[str], variant: str, seed, ratio: float) -> str | None:
    return first_existing(run_dirs, "finetune", tag(variant, seed, ratio), "track.jsonl")


def align_dir(run_dirs: Sequence[str], variant: str, seed, ratio: float | None = None) -> str | None:
    """The alignment stage directory of grid run ``<variant>-s<seed>``: the ``align/<fp>`` whose variants.txt
    names it (directories moved aside, ``<fp>.old-*``, are not candidates). When a changed configuration left
    two such directories, the attack's recorded inputs (``inputs.json``, "finetune <tag>" -> alignment) pick
    the one it started from; without them the choice is ambiguous and that is an error."""
    name = f"{variant}-s{seed}"
    for d in run_dirs:
        base = os.path.join(root(d), "align")
        if not os.path.isdir(base):
            continue
        found = []
        for fp in sorted(os.listdir(base)):
            listing = os.path.join(base, fp, "variants.txt")
            if "." not in fp and os.path.isfile(listing) and name in open(listing).read().split():
                found.append(fp)
        if len(found) == 1:
            return os.path.join(base, found[0])
        if len(found) > 1:
            used = _recorded_alignment(root(d), variant, seed, ratio)
            if used in found:
                return os.path.join(base, used)
            raise BoosterInputError(f"{base}: {', '.join(found)} all list {name} in variants.txt and "
                                    f"{os.path.join(root(d), 'inputs.json')} does not say which one the attack "
                                    "started from: remove or move aside the stale one")
    return None


def _recorded_alignment(run_dir: str, variant: str, seed, ratio: float | None) -> str | None:
    try:
        inputs = json.load(open(os.path.join(run_dir, "inputs.json")))
    except (OSError, ValueError):
        return None
    keys = [f"finetune {tag(variant, seed, ratio)}"] if ratio is not None else \
        [k for k in inputs if k.startswith(f"finetune {variant}-s{seed}-p")]
    fps = {inputs.get(k, {}).get("alignment") for k in keys} - {None}
    return fps.pop() if len(fps) == 1 else None


def aligned_samples(run_dirs: Sequence[str], variant: str, seed, ratio: float | None = None) -> str | None:
    """The pre-attack evaluation's samples.jsonl of ``<variant>-s<seed>`` (``eval/aligned-<align fp>``). Without
    an alignment directory (a run rebuilt from its evaluations trains no model, so writes no variants.txt),
    the attack's recorded inputs name the alignment it started from."""
    adir = align_dir(run_dirs, variant, seed, ratio)
    found = ([(os.path.dirname(os.path.dirname(adir)), os.path.basename(adir))] if adir is not None else
             [(root(d), _recorded_alignment(root(d), variant, seed, ratio)) for d in run_dirs])
    for run_root, fp in found:
        path = os.path.join(run_root, "eval", f"aligned-{fp}", "samples.jsonl")
        if fp and os.path.exists(path):
            return path
    return None
