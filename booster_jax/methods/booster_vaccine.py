"""Booster + Vaccine: the official ``BoosterAlignmentTrainer.training_step`` with ``perturb_aware == "True"``.

git-disl/Booster, trainer.py: passes 1-2 on the harmful batch exactly as plain Booster (g1 = grad h(w),
g2 = grad h(w - alpha * g1 / (||g1|| + 1e-7)), weights put back), then the alignment gradient is
Vaccine's instead of the plain one: a backward pass of f recording the gradient of every attention
output (``pre_first_step``), eps_l = rho * g_l / (||g|| + 1e-7) (``after_first_step``), and the LoRA
gradient of f with eps_l added to the attention outputs (``pre_second_step``) -> g3. The update is
g = g3 + lam * g1 - lam * g2, and the logged loss is the perturbed f (``return loss3``).

Four forward-backward passes per step (plain Booster: three), run by Booster's pass engine
(``booster.booster_passes``) as one ``lax.scan``. Config: ``align.booster`` (lam, alpha, eps,
perturbed_term) and ``align.vaccine`` (rho); the spec declares both sections, so the stage hands
``ctx.cfg`` with ``.booster`` and ``.vaccine`` (``base.method_config``).
"""

from __future__ import annotations

from typing import NamedTuple

from booster_jax.config import BoosterConfig, VaccineConfig
from booster_jax.methods.base import MethodSpec, StepContext, apply_gradients, global_norm, register
from booster_jax.methods.booster import booster_passes, booster_update, static_config


class BoosterVaccineSections(NamedTuple):
    booster: BoosterConfig = BoosterConfig()
    vaccine: VaccineConfig = VaccineConfig()


def booster_vaccine_gradient(forward, sections: BoosterVaccineSections, trainable, frozen, batches, rng=None):
    """g = g3_vaccine + lam * g1 - lam * g2 and the metrics (loss = the perturbed alignment loss).

    The four passes run in Booster's pass engine (``booster.booster_passes``, one ``lax.scan``)."""
    bc, rho = sections.booster, sections.vaccine.rho
    g1, g2, g3, losses, attn_norm = booster_passes(forward, bc, trainable, frozen, batches, rng, attention_rho=rho)
    grads = booster_update(g3, g1, g2, bc.lam, bc.perturbed_term)
    metrics = {"loss": losses[3], "loss_unperturbed": losses[2], "attn_grad_norm": attn_norm,
               "harmful_loss": losses[0], "harmful_loss_perturbed": losses[1], "harmful_grad_norm": global_norm(g1),
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
                                      make_step=make_booster_vaccine_step, config_section=("booster", "vaccine"),
                                      passes=4, scanned_passes=True, gradient_trees=6, continues_lora=True))
