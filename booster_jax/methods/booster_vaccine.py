"""Booster + Vaccine: the official ``BoosterAlignmentTrainer.training_step`` with ``perturb_aware == "True"``.

git-disl/Booster, trainer.py: passes 1-2 on the harmful batch exactly as plain Booster (g1 = grad h(w),
g2 = grad h(w - alpha * g1 / (||g1|| + 1e-7)), weights put back), then the alignment gradient is
Vaccine's instead of the plain one: a backward pass of f recording the gradient of every attention
output (``pre_first_step``), eps_l = rho * g_l / (||g|| + 1e-7) (``after_first_step``), and the LoRA
gradient of f with eps_l added to the attention outputs (``pre_second_step``) -> g3. The update is
g = g3 + lam * g1 - lam * g2, and the logged loss is the perturbed f (``return loss3``).

Four forward-backward passes per step (plain Booster: three). Config: ``align.booster`` (lam, alpha,
eps, perturbed_term) and ``align.vaccine`` (rho); the stage hands both as ``ctx.cfg`` =
``align.booster_vaccine`` (a view ``(booster, vaccine)``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from booster_jax.config import BoosterConfig, VaccineConfig
from booster_jax.methods.base import MethodSpec, StepContext, apply_gradients, global_norm, register
from booster_jax.methods.booster import booster_update, static_config
from booster_jax.methods.sft import lm_value_and_grad
from booster_jax.methods.vaccine import vaccine_gradient


class BoosterVaccineSections(NamedTuple):
    booster: BoosterConfig = BoosterConfig()
    vaccine: VaccineConfig = VaccineConfig()


def _key(rng, i):
    return None if rng is None else jax.random.fold_in(rng, i)


def harmful_passes(forward, cfg: BoosterConfig, trainable, frozen, harmful, rng=None):
    """Booster's passes 1-2 (see ``methods.booster``): (g1, g2, h(w), h(w'), ||g1||)."""
    value_and_grad = lm_value_and_grad(forward)
    h, g1 = value_and_grad(trainable, frozen, harmful, _key(rng, 0))
    g1_norm = global_norm(g1)
    scale = cfg.alpha / (g1_norm + cfg.eps)
    perturbed = jax.tree.map(lambda w, g: w - (scale * g).astype(w.dtype), trainable, g1)
    h_perturbed, g2 = value_and_grad(perturbed, frozen, harmful, _key(rng, 1))
    return g1, g2, h, h_perturbed, g1_norm


def booster_vaccine_gradient(forward, sections: BoosterVaccineSections, trainable, frozen, batches, rng=None):
    """g = g3_vaccine + lam * g1 - lam * g2 and the metrics (loss = the perturbed alignment loss)."""
    bc, rho = sections.booster, sections.vaccine.rho
    g1, g2, h, h_perturbed, g1_norm = harmful_passes(forward, bc, trainable, frozen, batches["harmful"], rng)
    g3, vm = vaccine_gradient(forward, rho, trainable, frozen, batches["align"], _key(rng, 2))
    grads = booster_update(g3, g1, g2, bc.lam, bc.perturbed_term)
    metrics = {"loss": vm["loss"], "loss_unperturbed": vm["loss_unperturbed"], "attn_grad_norm": vm["attn_grad_norm"],
               "harmful_loss": h, "harmful_loss_perturbed": h_perturbed, "harmful_grad_norm": g1_norm,
               "grad_norm": global_norm(grads)}
    return grads, metrics


def make_booster_vaccine_step(ctx: StepContext):
    """``step(frozen, state, batches, rng)`` reading ``align`` and ``harmful``; ctx.cfg has ``.booster`` and ``.vaccine``."""
    sections = ctx.cfg if ctx.cfg is not None else BoosterVaccineSections()
    sections = BoosterVaccineSections(static_config(sections.booster),
                                      VaccineConfig(rho=float(sections.vaccine.rho)))

    def step(frozen, state, batches, rng):
        grads, metrics = booster_vaccine_gradient(ctx.forward, sections, state.trainable, frozen, batches, rng)
        return apply_gradients(state, grads, ctx.optimizer), metrics

    return step


BOOSTER_VACCINE = register(MethodSpec(name="booster_vaccine", stage="align", streams=("align", "harmful"),
                                      make_step=make_booster_vaccine_step, config_section="booster_vaccine"))
