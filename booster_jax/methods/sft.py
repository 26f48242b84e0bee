"""Plain supervised fine-tuning: one LM-loss gradient step on a single stream.

The same step is the SFT alignment baseline (stream ``align``) and the harmful fine-tuning
attack (stream ``task``); only the stream it reads differs, so both are registered from here.
"""

from __future__ import annotations

import functools

import jax

from booster_jax.methods.base import (model_loss, Forward, MethodSpec, StepContext, apply_gradients, global_norm,
                                      register)


def lm_value_and_grad(forward: Forward):
    """``(trainable, frozen, batch, rng) -> (loss, grads)``, gradients w.r.t. the trainable tree only."""

    def loss_fn(trainable, frozen, batch, rng):
        return model_loss(forward, trainable, frozen, batch, rng=rng)

    return jax.value_and_grad(loss_fn)


def make_sft_step(ctx: StepContext, stream: str = "align"):
    """``step(frozen, state, batches, rng) -> (state, metrics)`` on ``batches[stream]``.

    Metrics: ``loss`` and ``grad_norm`` (global L2 norm before the optimizer's clipping, as HF logs it).
    """
    value_and_grad = lm_value_and_grad(ctx.forward)

    def step(frozen, state, batches, rng):
        loss, grads = value_and_grad(state.trainable, frozen, batches[stream], rng)
        new_state = apply_gradients(state, grads, ctx.optimizer)
        return new_state, {"loss": loss, "grad_norm": global_norm(grads)}

    return step


SFT_ALIGN = register(MethodSpec(name="sft", stage="align", streams=("align",), make_step=make_sft_step,
                                sft_warm_start=False))
SFT_FINETUNE = register(MethodSpec(name="sft", stage="finetune", streams=("task",),
                                   make_step=functools.partial(make_sft_step, stream="task")))
