"""Booster (Huang et al., ICLR 2025): align while attenuating the simulated harmful perturbation.

Objective ``f(w) + lam * (h(w) - h(w - alpha * g_h / ||g_h||))`` with f the alignment loss, h the
harmful loss and the normalised direction held fixed (first order). One step is the official
``BoosterAlignmentTrainer.training_step`` (git-disl/Booster, trainer.py), pass for pass:

1. g1 = grad h(w) on the harmful batch;
2. w' = w - alpha * g1 / (||g1|| + eps), one global L2 norm over every trainable tensor;
3. g2 = grad h(w') on the SAME harmful batch (w itself is never overwritten here, so there is
   nothing to restore);
4. g3 = grad f(w) on the alignment batch;
5. g = g3 + lam * g1 - lam * g2, and the optimizer (global-norm clipping inside) steps on g.

``perturbed_term=False`` is the paper's ablation: g = g3 + lam * g1 (pass 2 still runs, for its metric).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from booster_jax.config import BoosterConfig
from booster_jax.methods.base import MethodSpec, StepContext, apply_gradients, global_norm, register
from booster_jax.methods.sft import lm_value_and_grad


def booster_update(g3, g1, g2, lam, perturbed_term: bool = True):
    """g = g3 + lam * g1 - lam * g2 (without the last term: the paper's ablation)."""
    if perturbed_term:
        return jax.tree.map(lambda a, b, c: a + lam * b - lam * c, g3, g1, g2)
    return jax.tree.map(lambda a, b: a + lam * b, g3, g1)


def static_config(cfg: BoosterConfig | None) -> BoosterConfig:
    """The section with Python scalars, closed over by the jitted step so it compiles once."""
    cfg = cfg if cfg is not None else BoosterConfig()
    return dataclasses.replace(cfg, lam=float(cfg.lam), alpha=float(cfg.alpha), eps=float(cfg.eps),
                               perturbed_term=bool(cfg.perturbed_term))


def common_shape(a: dict, b: dict) -> tuple[dict, dict]:
    """Pad two batches to one [rows, length] with zero-mask rows/columns, which change no loss."""
    rows = max(a["input_ids"].shape[0], b["input_ids"].shape[0])
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(batch):
        return {k: jnp.pad(v, ((0, rows - v.shape[0]), (0, length - v.shape[1]))) for k, v in batch.items()}

    return pad(a), pad(b)


def booster_gradient(forward, cfg: BoosterConfig, trainable, frozen, batches, rng=None):
    """The Booster update direction before the optimizer, and its metrics.

    The three passes (h at w, h at w', f at w) are the iterations of one ``lax.scan``: a loop
    body's buffers are reused, so only one pass's activations are alive at a time and the step
    needs SFT's memory plus LoRA-sized gradient copies (written as three plain calls, XLA
    allocated all three passes' activations at once: 1.7-2.4x SFT's peak; benchmarks/bench_memory.py).
    Each pass draws its own dropout key (the official passes are separate train-mode forwards).
    ``cfg.lam``/``cfg.alpha`` may be traced scalars; the step passes Python floats.
    """
    lam, alpha, eps = cfg.lam, cfg.alpha, cfg.eps
    value_and_grad = lm_value_and_grad(forward)
    harmful, align = common_shape(batches["harmful"], batches["align"])
    stacked = jax.tree.map(lambda h, a: jnp.stack([h, h, a]), harmful, align)
    keys = None if rng is None else jnp.stack([jax.random.fold_in(rng, i) for i in range(3)])

    def one_pass(g1, xs):
        i, batch, key = xs
        # pass 0: w; pass 1: w' = w - alpha * g1 / (||g1|| + eps); pass 2: w (alignment batch)
        scale = jnp.where(i == 1, alpha / (global_norm(g1) + eps), 0.0)
        weights = jax.tree.map(lambda w, g: w - (scale * g).astype(w.dtype), trainable, g1)
        loss, g = value_and_grad(weights, frozen, batch, key)
        g1 = jax.tree.map(lambda old, new: jnp.where(i == 0, new, old), g1, g)
        return g1, (loss, g)

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    g1, (losses, grads3) = jax.lax.scan(one_pass, zeros, (jnp.arange(3), stacked, keys))
    g2, g3 = (jax.tree.map(lambda x, k=k: x[k], grads3) for k in (1, 2))
    grads = booster_update(g3, g1, g2, lam, cfg.perturbed_term)
    metrics = {"loss": losses[2], "harmful_loss": losses[0], "harmful_loss_perturbed": losses[1],
               "harmful_grad_norm": global_norm(g1), "grad_norm": global_norm(grads)}
    return grads, metrics


def make_booster_step(ctx: StepContext):
    """``step(frozen, state, batches, rng) -> (state, metrics)`` reading ``align`` and ``harmful``.

    ``ctx.cfg`` is the ``booster`` config section; its values are Python floats closed over, so the
    jitted step compiles once. Metrics: loss (= f, the logged loss), harmful_loss (h(w)),
    harmful_loss_perturbed (h(w')), harmful_grad_norm (||g1||), grad_norm (||g|| before clipping).
    """
    cfg = static_config(ctx.cfg)

    def step(frozen, state, batches, rng):
        grads, metrics = booster_gradient(ctx.forward, cfg, state.trainable, frozen, batches, rng)
        return apply_gradients(state, grads, ctx.optimizer), metrics

    return step


BOOSTER = register(MethodSpec(name="booster", stage="align", streams=("align", "harmful"),
                              make_step=make_booster_step, config_section="booster"))
