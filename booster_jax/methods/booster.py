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
from booster_jax.methods.base import model_loss, MethodSpec, StepContext, apply_gradients, global_norm, register
from booster_jax.methods.vaccine import EPS as PROBE_EPS, zero_probe


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
    """Pad two batches to one [rows, length] with zero-mask rows/columns, which change no loss.

    ``target_index`` ([rows, K], padded with length - 1: ``data.batches.target_index``) is padded to the
    larger K with the new last position, and its old pad value moved there, so no pad points at a target."""
    rows = max(a["input_ids"].shape[0], b["input_ids"].shape[0])
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    slots = max((x["target_index"].shape[1] for x in (a, b) if "target_index" in x), default=0)

    def pad(batch):
        out = {}
        for k, v in batch.items():
            if k == "target_index":
                v = jnp.where(v == batch["input_ids"].shape[1] - 1, length - 1, v)
                out[k] = jnp.pad(v, ((0, rows - v.shape[0]), (0, slots - v.shape[1])), constant_values=length - 1)
            else:
                out[k] = jnp.pad(v, ((0, rows - v.shape[0]), (0, length - v.shape[1])))
        return out

    if ("target_index" in a) != ("target_index" in b):  # one batch without it: both take the full head
        a, b = ({k: v for k, v in x.items() if k != "target_index"} for x in (a, b))
    return pad(a), pad(b)


def _stack_keys(rng, paths):
    """One dropout key per pass; ``paths[i]`` is the fold_in chain of pass i (None without an rng)."""
    if rng is None:
        return None
    keys = []
    for chain in paths:
        k = rng
        for j in chain:
            k = jax.random.fold_in(k, j)
        keys.append(k)
    return jnp.stack(keys)


def booster_passes(forward, cfg: BoosterConfig, trainable, frozen, batches, rng=None, attention_rho=None):
    """The Booster pass engine: every forward-backward pass of a Booster step as one ``lax.scan``.

    Passes: h at w (-> g1), h at w' = w - alpha * g1 / (||g1|| + eps) (-> g2), then the alignment
    gradient g3: f at w (plain Booster) or, with ``attention_rho`` (Booster + Vaccine), f at w with a
    zero attention probe (its probe gradient g_l) and f with eps_l = rho * g_l / (||g|| + 1e-7) added to
    every attention output (-> g3). A loop body's buffers are reused, so only one pass's activations
    are alive at a time: every Booster variant needs SFT's memory plus LoRA-sized gradient copies
    (written as plain calls, XLA allocated every pass's activations at once: 1.7-2.4x SFT's peak;
    benchmarks/bench_memory.py). Each pass draws its own dropout key, the same keys as the step's
    earlier plain-call form. ``cfg.lam``/``cfg.alpha``/``attention_rho`` may be traced scalars.

    Returns (g1, g2, g3, losses per pass, ||g_l|| or None).
    """
    alpha, eps = cfg.alpha, cfg.eps
    harmful, align = common_shape(batches["harmful"], batches["align"])
    probe = attention_rho is not None
    order = (harmful, harmful, align) + ((align,) if probe else ())
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *order)
    keys = _stack_keys(rng, [(0,), (1,)] + ([(2, 0), (2, 1)] if probe else [(2,)]))
    last = len(order) - 1

    def loss_fn(weights, eps_probe, batch, key):
        return model_loss(forward, weights, frozen, batch, rng=key, probe=eps_probe)

    def one_pass(carry, xs):
        g1, probe_g = carry
        i, batch, key = xs
        scale = jnp.where(i == 1, alpha / (global_norm(g1) + eps), 0.0)
        weights = jax.tree.map(lambda w, g: w - (scale * g).astype(w.dtype), trainable, g1)
        if probe:  # pass `last` adds eps_l; the others add a zero probe (x + 0 changes nothing)
            pscale = jnp.where(i == last, attention_rho / (global_norm(probe_g) + PROBE_EPS), 0.0)
            eps_probe = jax.tree.map(lambda g: pscale * g, probe_g)
            loss, (g, pg) = jax.value_and_grad(loss_fn, argnums=(0, 1))(weights, eps_probe, batch, key)
            probe_g = jax.tree.map(lambda old, new: jnp.where(i == last - 1, new, old), probe_g, pg)
        else:
            loss, g = jax.value_and_grad(loss_fn)(weights, None, batch, key)
        g1 = jax.tree.map(lambda old, new: jnp.where(i == 0, new, old), g1, g)
        return (g1, probe_g), (loss, g)

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    probe0 = zero_probe(forward, align) if probe else None
    with jax.named_scope("booster_passes"):
        (g1, probe_g), (losses, grads) = jax.lax.scan(one_pass, (zeros, probe0),
                                                      (jnp.arange(len(order)), stacked, keys))
    g2, g3 = (jax.tree.map(lambda x, k=k: x[k], grads) for k in (1, last))
    return g1, g2, g3, losses, (global_norm(probe_g) if probe else None)


def booster_gradient(forward, cfg: BoosterConfig, trainable, frozen, batches, rng=None):
    """The Booster update direction before the optimizer, and its metrics (passes: ``booster_passes``)."""
    g1, g2, g3, losses, _ = booster_passes(forward, cfg, trainable, frozen, batches, rng)
    grads = booster_update(g3, g1, g2, cfg.lam, cfg.perturbed_term)
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
                              make_step=make_booster_step, config_section="booster", passes=3,
                              scanned_passes=True, gradient_trees=6, continues_lora=True))
