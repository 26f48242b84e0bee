"""Vaccine (Huang, Hu, Liu 2024): alignment that is robust to a bounded perturbation of the attention outputs.

One step is the official ``BaseTrainer.training_step`` (git-disl/Booster, trainer.py) with its hooks
``pre_first_step`` / ``after_first_step`` / ``pre_second_step`` / ``after_second_step``:

1. pass 1: the alignment loss f on the batch; its gradient w.r.t. every attention block's output
   (the official backward hook on each ``LlamaAttention`` records ``grad_output[0]``) -> g_l;
   the LoRA gradients of this pass are thrown away (``model.zero_grad()``);
2. eps_l = rho * g_l / (||g|| + 1e-7), ||g|| ONE global L2 norm over all layers (``_grad_norm``);
3. pass 2: f on the SAME batch with eps_l added to each attention output (the official forward
   hook); its LoRA gradient is the update. The logged loss is this perturbed loss.

Here g_l is the gradient w.r.t. a zero-valued additive probe ``probe/layers/attn_out`` [L, B, T, D]
that ``models.llama.DecoderLayer`` adds to its attention output, so pass 1 differentiates w.r.t. the
probe only, and pass 2 feeds eps as that probe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from booster_jax.config import VaccineConfig
from booster_jax.methods.base import (model_loss, Forward, MethodSpec, StepContext, apply_gradients, global_norm,
                                      register)

EPS = 1e-7  # the official ``rho / (grad_norm + 1e-7)``


def _key(rng, i):
    return None if rng is None else jax.random.fold_in(rng, i)


def zero_probe(forward: Forward, batch: dict) -> dict:
    """The ``probe`` collection with a zero perturbation of every attention output: {"layers": {"attn_out": [L,B,T,D]}}."""
    cfg = forward.model.cfg
    b, t = batch["input_ids"].shape
    return {"layers": {"attn_out": jnp.zeros((cfg.num_layers, b, t, cfg.hidden_size), jnp.float32)}}


def attention_perturbation(forward: Forward, rho, trainable, frozen, batch, rng=None):
    """Passes 1-2 of Vaccine's perturbation: (eps probe tree, f at w, ||g||).

    ``rho`` may be a traced scalar. The gradient w.r.t. the probe is taken in float32 (the probe is
    float32; the model casts it to its compute dtype when adding it).
    """

    def loss_of_probe(probe):
        return model_loss(forward, trainable, frozen, batch, rng=rng, probe=probe)

    f, g = jax.value_and_grad(loss_of_probe)(zero_probe(forward, batch))
    g_norm = global_norm(g)
    scale = rho / (g_norm + EPS)
    eps = jax.tree.map(lambda x: scale * x, g)
    return eps, f, g_norm


def vaccine_gradient(forward: Forward, rho, trainable, frozen, batch, rng=None):
    """The Vaccine update direction for the alignment batch, and its metrics.

    Metrics: loss (f with the perturbation: the official logged loss), loss_unperturbed (f at w),
    attn_grad_norm (||g||), grad_norm (the LoRA gradient's norm, before clipping).
    """
    eps, f_clean, g_norm = attention_perturbation(forward, rho, trainable, frozen, batch, _key(rng, 0))

    def loss_fn(w):
        return model_loss(forward, w, frozen, batch, rng=_key(rng, 1), probe=eps)

    f_pert, grads = jax.value_and_grad(loss_fn)(trainable)
    return grads, {"loss": f_pert, "loss_unperturbed": f_clean, "attn_grad_norm": g_norm,
                   "grad_norm": global_norm(grads)}


def make_vaccine_step(ctx: StepContext):
    """``step(frozen, state, batches, rng) -> (state, metrics)`` on ``batches["align"]``; ctx.cfg: the ``vaccine`` section."""
    cfg = ctx.cfg if ctx.cfg is not None else VaccineConfig()
    rho = float(cfg.rho)

    def step(frozen, state, batches, rng):
        grads, metrics = vaccine_gradient(ctx.forward, rho, state.trainable, frozen, batches["align"], rng)
        return apply_gradients(state, grads, ctx.optimizer), metrics

    return step


VACCINE = register(MethodSpec(name="vaccine", stage="align", streams=("align",), make_step=make_vaccine_step,
                              config_section="vaccine", passes=2))
