#!/usr/bin/env python
"""Padding overhead per batch stream of a run, with the official random sampler, length grouping and packing.

    python benchmarks/bench_padding.py                        # the embedded default run (python run.py)
    python benchmarks/bench_padding.py CONFIG [key=value ...]

Builds the run's streams exactly as the stages do (same examples, batch sizes, seeds, buckets) and
draws as many batches as the stages would (alignment: its steps from the align stream and the
harmful stream; the attack at the first harmful ratio of the grid: its steps from the task stream).
Padding overhead = padded tokens / all tokens (filler rows of a short last batch included), the
number the stages log. No model is run.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic",
                       "default.yaml")
OPTIONS = {"random (official)": [], "group_by_length": ["data.group_by_length=true"],
           "group_by_length + pack": ["data.group_by_length=true", "data.pack=true"]}


def padding(cfg) -> dict:
    from booster_jax.models import hf
    from booster_jax.pipeline import with_ratio
    from booster_jax.train import pretrain, stages

    cfg = pretrain.resolve(cfg, progress=False)
    tok = hf.load_tokenizer(cfg.model.path, cfg.model.add_pad_token)
    a, h = stages.alignment_examples(cfg, tok)
    streams = {"align": stages.stream(a.items, cfg.align.batch_size, cfg.run.seed, cfg, tok),
               "harmful": stages.stream(h.items, cfg.align.harmful_batch_size, cfg.run.seed + 1, cfg, tok,
                                        infinite=True)}
    align_steps = stages.total_steps(cfg.align, streams["align"].steps_per_epoch)
    _, t = stages.finetune_examples(with_ratio(cfg, cfg.grid.harmful_ratios[0]), tok)
    streams["task"] = stages.stream(t.items, cfg.finetune.batch_size, cfg.run.seed + 2, cfg, tok, pack=cfg.data.pack)
    steps = {"align": align_steps, "harmful": align_steps,
             "task": stages.total_steps(cfg.finetune, streams["task"].steps_per_epoch)}
    for name, s in streams.items():
        for _ in range(steps[name]):
            s.next_batch()
    return {name: (s.padding_fraction, steps[name]) for name, s in streams.items()}


def main(argv=None) -> int:
    from booster_jax.config import load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv.pop(0) if argv and "=" not in argv[0] else DEFAULT
    print(f"padding overhead (padded / all tokens) per stream; config {os.path.relpath(path)} {' '.join(argv)}")
    print(f"{'batching':<24}{'align':>14}{'harmful':>14}{'task':>14}")
    for label, extra in OPTIONS.items():
        r = padding(load_config(path, argv + extra))
        print(f"{label:<24}" + "".join(f"{100 * r[k][0]:.1f}% ({r[k][1]})".rjust(14)
                                       for k in ("align", "harmful", "task")))
    print("(in brackets: the steps drawn; packing applies to the task stream only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
