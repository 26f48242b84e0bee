"""Booster with a per-tensor simulated perturbation: a defense booster-jax does not ship (docs/extending.md).

Booster simulates the harmful attack as one step w' = w - alpha * g / ||g||, with ONE norm over every
LoRA tensor, so the few tensors with the largest harmful gradient take almost all of the step. The
real attack is AdamW, whose update is normalised per coordinate: it moves every adapted matrix at
about the learning rate, whatever its gradient's scale. Here each tensor i gets its own direction,
w'_i = w_i - alpha / sqrt(n) * g_i / ||g_i||, so the perturbation's total norm is still alpha (n
tensors) and only its spread over the tensors differs from Booster: an ablation of one choice.
Written only against the public API (``import booster_jax``); run it with
``python run.py examples/per_tensor_booster.yaml``.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

import booster_jax as bj


@dataclasses.dataclass(frozen=True)
class PerTensorBoosterConfig:
    """The section ``align.per_tensor_booster``; checked like every config section."""

    lam: float = bj.setting(5.0, bj.NONNEG)  # weight of the attenuation term, as Booster's lam
    alpha: float = bj.setting(0.1, bj.NONNEG)  # total norm of the simulated perturbation, as Booster's alpha
    eps: float = bj.setting(1e-7, bj.POS)


def per_tensor_perturbation(weights, grads, alpha: float, eps: float):
    """w - alpha / sqrt(n) * g_i / (||g_i|| + eps) for each of the n tensors (pure; tested by hand)."""
    scale = alpha / math.sqrt(len(jax.tree.leaves(grads)))
    return jax.tree.map(lambda w, g: w - (scale * g / (jnp.linalg.norm(g) + eps)).astype(w.dtype), weights, grads)


def make_step(ctx: bj.StepContext):
    """``step(frozen, state, batches, rng)``: three passes, then g = g3 + lam * (g1 - g2) as Booster."""
    lam, alpha, eps = float(ctx.cfg.lam), float(ctx.cfg.alpha), float(ctx.cfg.eps)
    value_and_grad = jax.value_and_grad(lambda w, frozen, batch, key: bj.lm_loss(
        ctx.forward(w, frozen, batch, rng=key), batch))

    def step(frozen, state, batches, rng):
        k1, k2, k3 = jax.random.split(rng, 3)
        w = state.trainable
        h, g1 = value_and_grad(w, frozen, batches["harmful"], k1)  # h(w), g1 = grad h(w)
        h_perturbed, g2 = value_and_grad(per_tensor_perturbation(w, g1, alpha, eps), frozen, batches["harmful"], k2)
        f, g3 = value_and_grad(w, frozen, batches["align"], k3)  # the alignment loss f(w) and its gradient
        grads = jax.tree.map(lambda a, b, c: a + lam * (b - c), g3, g1, g2)
        metrics = {"loss": f, "harmful_loss": h, "harmful_loss_perturbed": h_perturbed,
                   "harmful_grad_norm": bj.global_norm(g1), "grad_norm": bj.global_norm(grads)}
        return bj.apply_gradients(state, grads, ctx.optimizer), metrics

    return step


SPEC = bj.register(bj.MethodSpec(
    name="per_tensor_booster", stage="align", streams=("align", "harmful"), make_step=make_step,
    config_section="per_tensor_booster", config_class=PerTensorBoosterConfig,
    passes=3,  # three forward-backward passes per step, written as plain calls (not one lax.scan):
    scanned_passes=False,  # the planner counts all three passes' activations alive at once
    gradient_trees=6,  # g1, w', g2, g3, g and the optimizer's update at the step's peak
    continues_lora=True))  # as Booster: the attack continues this LoRA
