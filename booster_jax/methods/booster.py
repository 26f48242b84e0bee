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

``perturbed_term=False`` is the paper's ablation: g = g3 + lam * g1. Under ``jax.jit`` the unused
backward of pass 2 is then dead code and XLA removes it; its forward stays for the metric.
"""

from __future__ import annotations

import dataclasses

import jax

from booster_jax.config import BoosterConfig
from booster_jax.methods.base import MethodSpec, StepContext, apply_gradients, global_norm, register
from booster_jax.methods.sft import lm_value_and_grad


def _key(rng, i):
    return None if rng is None else jax.random.fold_in(rng, i)


def booster_gradient(forward, cfg: BoosterConfig, trainable, frozen, batches, rng=None):
    """The Booster update direction before the optimizer, and its metrics.

    Each pass draws its own dropout key (the official passes are separate train-mode forwards).
    ``cfg.lam``/``cfg.alpha`` may be traced scalars (tests sweep them without recompiling); the step
    passes Python floats.
    """
    lam, alpha, eps = cfg.lam, cfg.alpha, cfg.eps
    value_and_grad = lm_value_and_grad(forward)
    harmful, align = batches["harmful"], batches["align"]

    h, g1 = value_and_grad(trainable, frozen, harmful, _key(rng, 0))
    g1_norm = global_norm(g1)
    scale = alpha / (g1_norm + eps)
    perturbed = jax.tree.map(lambda w, g: w - (scale * g).astype(w.dtype), trainable, g1)
    h_perturbed, g2 = value_and_grad(perturbed, frozen, harmful, _key(rng, 1))
    f, g3 = value_and_grad(trainable, frozen, align, _key(rng, 2))

    if cfg.perturbed_term:
        grads = jax.tree.map(lambda a, b, c: a + lam * b - lam * c, g3, g1, g2)
    else:
        grads = jax.tree.map(lambda a, b: a + lam * b, g3, g1)
    metrics = {"loss": f, "harmful_loss": h, "harmful_loss_perturbed": h_perturbed,
               "harmful_grad_norm": g1_norm, "grad_norm": global_norm(grads)}
    return grads, metrics


def make_booster_step(ctx: StepContext):
    """``step(frozen, state, batches, rng) -> (state, metrics)`` reading ``align`` and ``harmful``.

    ``ctx.cfg`` is the ``booster`` config section; its values are Python floats closed over, so the
    jitted step compiles once. Metrics: loss (= f, the logged loss), harmful_loss (h(w)),
    harmful_loss_perturbed (h(w')), harmful_grad_norm (||g1||), grad_norm (||g|| before clipping).
    """
    cfg = ctx.cfg if ctx.cfg is not None else BoosterConfig()
    cfg = dataclasses.replace(cfg, lam=float(cfg.lam), alpha=float(cfg.alpha), eps=float(cfg.eps),
                              perturbed_term=bool(cfg.perturbed_term))

    def step(frozen, state, batches, rng):
        grads, metrics = booster_gradient(ctx.forward, cfg, state.trainable, frozen, batches, rng)
        return apply_gradients(state, grads, ctx.optimizer), metrics

    return step


BOOSTER = register(MethodSpec(name="booster", stage="align", streams=("align", "harmful"),
                              make_step=make_booster_step, config_section="booster"))
