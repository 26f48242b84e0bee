"""Lisa (Huang et al. 2024, "Lazy Safety Alignment"): bi-state fine-tuning with a proximal term.

The official ``ADMMTrainer`` (git-disl/Booster, trainer.py; ``check_mode``, ``switch_model``,
``training_step``) keeps ONE set of LoRA weights and one optimizer and alternates two states:

- alignment: ``align_steps`` steps on alignment data (the user batch the Trainer drew is dropped);
- fine-tuning: ``finetune_steps`` steps on the user's data;

starting in the alignment state. At step ``steps`` (0-based count of finished steps) with ``clock``
steps done in the current state, the state switches when ``clock % n_state == 0 and steps != 0``
(and both step counts are non-zero); the switch resets ``clock`` to 0 and stores the current weights
as the just-finished state's weights, which the new state's proximal term then pulls towards:

    loss = LM loss on the state's batch + rho/2 * sum_tensors ||w - w_anchor||^2

with w_anchor the other state's weights (both start as the initial weights, so at any time the
anchor is the weights at the last switch). The proximal term is only added once
``steps > 0.1 * len(train_dataloader) * epochs``, i.e. after the first 10% of the stage
(``LisaConfig.proximal_warmup``), and only when rho > 0. The logged loss includes the term.

Here the state, its clock and the anchor live in ``TrainState.extra``; the switch is a ``jnp.where``
on the step count and the phase is chosen by ``lax.cond``, so both phases are one compiled step
and the inactive stream's batch is read but unused (as the official Trainer drops its user batch).
The stage draws an ``align`` batch every step (official: only in the alignment state); that changes
which alignment batches are seen, not the update.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from booster_jax.config import LisaConfig
from booster_jax.methods.base import model_loss, MethodSpec, StepContext, apply_gradients, global_norm, register

log = logging.getLogger(__name__)

ALIGNMENT, FINETUNE = 1, 0  # values of extra["phase"]


def init_lisa_extra(trainable, frozen=None, cfg: LisaConfig | None = None) -> dict:
    """Lisa's state: the proximal anchor (a copy of the initial weights), the phase and its clock."""
    cfg = cfg if cfg is not None else LisaConfig()
    phase = ALIGNMENT if cfg.align_steps != 0 else FINETUNE  # official ADMMTrainer.init
    return {"anchor": jax.tree.map(jnp.copy, trainable), "phase": jnp.asarray(phase, jnp.int32),
            "clock": jnp.zeros((), jnp.int32)}


def sq_distance(a, b) -> jax.Array:
    """sum over tensors of ||a - b||^2, in float32."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def next_phase(phase, clock, steps, align_steps: int, finetune_steps: int):
    """``check_mode``: (phase, clock, switched) for this step, before it runs. Step counts are Python ints."""
    if align_steps == 0 or finetune_steps == 0:  # the official conditions never switch then
        return phase, clock, jnp.zeros((), bool)
    to_finetune = (phase == ALIGNMENT) & (clock % align_steps == 0) & (steps != 0)
    to_alignment = (phase == FINETUNE) & (clock % finetune_steps == 0) & (steps != 0)
    switched = to_finetune | to_alignment
    return jnp.where(switched, 1 - phase, phase), jnp.where(switched, 0, clock), switched


def make_lisa_step(ctx: StepContext, total_steps: int | None = None):
    """``step(frozen, state, batches, rng) -> (state, metrics)`` reading ``task`` and ``align``.

    ``total_steps``: the stage's step count, for the proximal warm-up (default: ``ctx.total_steps``
    when the context carries it). Without it (None or 0) the warm-up is 0: the term is on from the
    start, with a warning.
    Metrics: loss (LM + applied proximal term, the official logged loss), lm_loss, proximal (the
    applied term), drift (||w - anchor||^2), phase (1 = alignment), grad_norm.
    """
    cfg = ctx.cfg if ctx.cfg is not None else LisaConfig()
    rho, n_align, n_finetune = float(cfg.rho), int(cfg.align_steps), int(cfg.finetune_steps)
    if not total_steps:
        total_steps = getattr(ctx, "total_steps", None)
    if not total_steps:
        log.warning("lisa: the stage's total steps are unknown; the proximal term starts at step 0 "
                    "(official: after %.0f%% of the steps)", 100 * cfg.proximal_warmup)
        threshold = -1.0
    else:
        threshold = float(cfg.proximal_warmup) * int(total_steps)
    forward = ctx.forward

    def step(frozen, state, batches, rng):
        extra = state.extra
        phase, clock, switched = next_phase(extra["phase"], extra["clock"], state.step, n_align, n_finetune)
        anchor = jax.tree.map(lambda a, w: jnp.where(switched, w, a), extra["anchor"], state.trainable)
        proximal_on = (state.step.astype(jnp.float32) > threshold) & (rho > 0)

        def value_and_grad(batch):
            def loss_fn(w):
                lm = model_loss(forward, w, frozen, batch, rng=rng)
                prox = jnp.where(proximal_on, 0.5 * rho * sq_distance(w, anchor), 0.0)
                return lm + prox, (lm, prox)
            return jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)

        if n_align == 0:  # the official trainer never leaves the fine-tuning state
            (loss, (lm, prox)), grads = value_and_grad(batches["task"])
        elif n_finetune == 0:  # ... or never leaves the alignment state
            (loss, (lm, prox)), grads = value_and_grad(batches["align"])
        else:
            (loss, (lm, prox)), grads = jax.lax.cond(phase == ALIGNMENT, lambda: value_and_grad(batches["align"]),
                                                     lambda: value_and_grad(batches["task"]))
        new = apply_gradients(state, grads, ctx.optimizer)
        new = new._replace(extra={"anchor": anchor, "phase": phase, "clock": clock + 1})
        metrics = {"loss": loss, "lm_loss": lm, "proximal": prox, "drift": sq_distance(state.trainable, anchor),
                   "phase": phase.astype(jnp.float32), "grad_norm": global_norm(grads)}
        return new, metrics

    return step


LISA = register(MethodSpec(name="lisa", stage="finetune", streams=("task", "align"), make_step=make_lisa_step,
                           config_section="lisa", init_extra=init_lisa_extra,
                           passes=2))  # both phases are compiled into the step (one lax.cond)
