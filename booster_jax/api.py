"""The two helpers a notebook needs that the pipeline has no single function for.

Everything else the public API offers (``booster_jax/__init__.py``) is the pipeline's own function
under its own name; these two are the few lines ``train.stages.train`` runs before its loop, and
the tokenize-then-collate the streams run per batch, without a loop or a stage directory around them.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from booster_jax.config import Config
from booster_jax.data.batches import collate
from booster_jax.data.template import Example, tokenize_examples
from booster_jax.methods.base import (Forward, StepContext, TrainState, build_extra, build_step, get_method,
                                      init_state, make_optimizer, method_config)


def make_batch(cfg: Config, tokenizer, examples: Sequence[Example]) -> dict[str, Any]:
    """One training batch of ``examples`` as a stage would build it (the config's template, max length and
    length buckets): ``input_ids``, ``attention_mask``, ``loss_mask``, all [len(examples), bucket] arrays."""
    tok = tokenize_examples(tokenizer, examples, cfg.data.max_length, template=cfg.data.template)
    return {k: jnp.asarray(v) for k, v in collate(tok.items, tokenizer.pad_token_id, cfg.data.bucket_lengths).items()}


def stage_step(cfg: Config, stage: str, forward: Forward, frozen, trainable, total_steps: int = 1000,
               method: str | None = None) -> tuple[Any, TrainState]:
    """``(step, state)``: the pure ``step(frozen, state, batches, rng) -> (state, metrics)`` of the stage's
    method (``cfg.<stage>.method`` unless ``method`` names another) and its first ``TrainState``, built
    exactly as a stage builds them (the stage's optimizer and the method's own config section).
    ``batches`` maps each of ``get_method(...).streams`` to a batch; ``jax.jit(step)`` compiles it."""
    stage_cfg = getattr(cfg, stage)
    spec = get_method(method or stage_cfg.method, stage)
    optimizer = make_optimizer(stage_cfg.optim, total_steps)
    section = method_config(spec, stage_cfg)
    extra = build_extra(spec, trainable, frozen, section)
    step = build_step(spec, StepContext(forward, optimizer, section, total_steps=total_steps))
    return step, init_state(trainable, optimizer, extra)
