"""RepNoise (Rosati et al. 2024) as the Booster authors run it: ``RepNoiseTrainer`` + ``loss_func/repnoise_loss.py``.

One step (git-disl/Booster, trainer.py ``RepNoiseTrainer.training_step``) is one backward of
``rep_noise_loss(model, harmful_batch, alignment_batch, beta=lamb, alpha=rho)``:

    loss = harmless + beta * noise - alpha * log(harmful_losses)

computed exactly as the official function does, including its quirks:

- Token masks are NOT the targets of the data: ``mask = ~eq(ids, adapt_dimension_b2a(ids, other_ids))``,
  the positions where this batch's ids differ from the other batch's ids (truncated or zero-padded
  to this batch's shape). The two batches are unpaired here, so this drops the shared Alpaca
  template prefix, positions where both rows are padding and chance matches; prompt tokens after
  the prefix and padding facing a real token do count. Our batches are bucketed (wider than the
  official longest-row padding) and may carry filler rows; both are excluded so the mask is the
  official one (``official_pair_mask``).
- ``masked_token_ce_loss``: logits at t are multiplied by mask[t] (zeroed rows -> uniform
  distribution), targets ids[t+1] by mask[t+1], targets equal to 0 ignored, token mean.
  For the harmful terms the mask was cast to bfloat16 first, so the targets ``ids * mask`` are
  bfloat16: ids above 256 are ROUNDED (29871 -> 29824) before ``.long()``. Reproduced by default
  (``RepNoiseConfig.bf16_label_rounding``); the harmless (alignment) term has exact targets.
- harmful_losses = (CE(logits) + sum_k CE(lm_head(norm(hidden_states[k])))) / (L + 1) + 1 with
  ``hidden_states`` as transformers' ``output_hidden_states`` (embeddings, outputs of layers
  0..L-2, and the final-normed output of layer L-1, which is therefore normed twice).
- noise = mean over layers of MMD(mlp_out_l * mask, N(0, 1) * mask), each flattened to [B, T*D];
  ``mlp_out_l`` is the output of layer l's MLP module (a forward hook on ``layers.{l}.mlp``), not
  the layer's output. MMD: Gaussian kernels with bandwidths bw * 2^i / 4, i = 0..4,
  bw = sum of pairwise squared distances (no gradient) / (n^2 - n), loss mean(XX + YY - XY - YX).
- The harmless (alignment) term is the same masked CE on the alignment batch with the mask
  against the harmful batch.

Official coefficients (script/alignment/repNoise.sh): alpha = 0.1, beta = 0.001, batch 5 for both
streams (the harmful batch is a fresh RandomSampler draw of ``train_batch_size`` each step).
The MLP outputs and the embedding output are read with a Flax method interceptor that ``sow``s
them into the ``probe`` collection (scanned over layers like the other collections).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from booster_jax.config import RepNoiseConfig
from booster_jax.methods.base import (Forward, MethodSpec, StepContext, apply_gradients, global_norm, register,
                                      token_nll)
from booster_jax.models.llama import MLP, RMSNorm, lm_head, variables

CAPTURE = "probe"
KERNEL_MUL, KERNEL_NUM = 2.0, 5  # official MMD_loss defaults


def _key(rng, i):
    return jax.random.fold_in(jax.random.key(0) if rng is None else rng, i)


# ------------------------------------------------------------------------------------------- masks

def official_pair_mask(batch: dict, other: dict) -> jax.Array:
    """``~eq(batch.ids, adapt_dimension_b2a(batch.ids, other.ids))`` as the official code sees it -> bool [B, T].

    The official batches are padded to their longest row and have no filler rows; here a position
    counts only inside ``batch``'s official width and real rows, and ``other`` is zero beyond its
    own official width and real rows (``adapt_dimension_b2a`` zero-pads and truncates).
    """
    ids, att = batch["input_ids"], batch["attention_mask"]
    oids, oatt = other["input_ids"], other["attention_mask"]
    (b, t), ot = ids.shape, oids.shape[1]
    width = jnp.max(jnp.sum(att, axis=1))
    owidth = jnp.max(jnp.sum(oatt, axis=1))
    o = jnp.where(jnp.any(oatt > 0, axis=1)[:, None] & (jnp.arange(ot)[None] < owidth), oids, 0)
    o = o[:b, :t]
    o = jnp.pad(o, ((0, b - o.shape[0]), (0, t - o.shape[1])))
    real = jnp.any(att > 0, axis=1)[:, None] & (jnp.arange(t)[None] < width)
    return real & (ids != o)


def masked_token_ce(logits: jax.Array, ids: jax.Array, mask: jax.Array, bf16_labels: bool = False) -> jax.Array:
    """The official ``masked_token_ce_loss``: logits[t] * mask[t] scored against ids[t+1] * mask[t+1], 0 ignored."""
    m = mask.astype(jnp.float32)
    lg = logits[:, :-1].astype(jnp.float32) * m[:, :-1, None]
    tgt = ids[:, 1:]
    if bf16_labels:  # ids * (bfloat16 mask) in the official harmful terms
        tgt = tgt.astype(jnp.bfloat16).astype(jnp.int32)
    tgt = tgt * mask[:, 1:].astype(jnp.int32)
    vocab = lg.shape[-1]
    valid = (tgt != 0) & (tgt < vocab)  # (a rounded id past the vocabulary would crash the official code)
    nll = token_nll(lg, jnp.clip(tgt, 0, vocab - 1))
    w = valid.astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


# --------------------------------------------------------------------------------------------- MMD

def mmd(x: jax.Array, y: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """The official ``MMD_loss()(x, y)`` for x, y [B, N]; ``rows`` [B] marks real rows (filler rows are left out).

    Squared distances from the Gram matrix in float32 at HIGHEST matmul precision (the official
    code materialises [2B, 2B, N] differences; the values agree to float32 rounding).
    """
    b = x.shape[0]
    z = jnp.concatenate([x, y]).astype(jnp.float32)
    w = jnp.ones((b,), jnp.float32) if rows is None else rows.astype(jnp.float32)
    wz = jnp.concatenate([w, w])
    sq = jnp.sum(z * z, axis=1)
    d = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * jnp.dot(z, z.T, precision=jax.lax.Precision.HIGHEST), 0.0)
    ww = wz[:, None] * wz[None, :]
    n = jnp.sum(wz)
    bandwidth = jax.lax.stop_gradient(jnp.sum(d * ww)) / (n * n - n)
    bandwidth = bandwidth / KERNEL_MUL ** (KERNEL_NUM // 2)
    k = sum(jnp.exp(-d / (bandwidth * KERNEL_MUL ** i)) for i in range(KERNEL_NUM))
    blocks = k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]
    nb = jnp.sum(w)
    return jnp.sum(blocks * ww[:b, :b]) / (nb * nb)


def gaussian_noise(rng, shape) -> jax.Array:
    """The N(0, 1) sample the step draws for the noise term (``torch.randn_like`` officially), [L, B, T, D] float32."""
    return jax.random.normal(_key(rng, 2), shape, jnp.float32)


# ------------------------------------------------------------------------------ forward with taps

def _tap(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
        m = context.module
        if isinstance(m, MLP):
            m.sow(CAPTURE, "mlp_out", out, init_fn=lambda: 0, reduce_fn=lambda _, v: v)
        elif isinstance(m, nn.Embed) and m.name == "embed_tokens":
            m.sow(CAPTURE, "embed_out", out, init_fn=lambda: 0, reduce_fn=lambda _, v: v)
    return out


def head_fns(forward: Forward, frozen):
    """(final norm, lm_head(norm(.)) -> float32 logits), the model's own modules on its frozen params."""
    model = forward.model
    cfg, dtype, pdt = model.cfg, model.dtype, model.param_dtype
    norm_mod = RMSNorm(cfg.rms_norm_eps, dtype, pdt)

    def norm(h):
        return norm_mod.apply({"params": frozen["norm"]}, h)

    def logits(h):
        return lm_head(model, frozen, norm(h))

    return norm, logits


def forward_with_activations(forward: Forward, trainable, frozen, batch, rng=None):
    """(logits, hidden_states [L+1, B, T, D] as transformers returns them, MLP outputs [L, B, T, D])."""
    if not forward.trainable_is_lora:
        raise ValueError("repnoise: expects LoRA training (trainable = adapters, frozen = base params)")
    with nn.intercept_methods(_tap):
        (logits, per_layer), taps = forward.model.apply(
            variables(frozen, trainable), batch["input_ids"], batch["attention_mask"], output="all",
            mutable=[CAPTURE], rngs=None if rng is None else {"dropout": rng})
    taps = taps[CAPTURE]
    norm, _ = head_fns(forward, frozen)
    emb = taps["embed_tokens"]["embed_out"].astype(per_layer.dtype)
    hidden = jnp.concatenate([emb[None], per_layer[:-1], norm(per_layer[-1])[None]])
    return logits, hidden, taps["layers"]["mlp"]["mlp_out"]


# ---------------------------------------------------------------------------------------- the loss

def repnoise_loss(forward: Forward, cfg: RepNoiseConfig, trainable, frozen, batches, rng=None, noise=None):
    """The official ``rep_noise_loss`` -> (loss, metrics). ``noise``: the N(0,1) draw (default ``gaussian_noise``)."""
    harmful, align = batches["harmful"], batches["align"]
    logits, hidden, mlp_out = forward_with_activations(forward, trainable, frozen, harmful, _key(rng, 0))
    _, head = head_fns(forward, frozen)
    hmask = official_pair_mask(harmful, align)
    rows = jnp.any(harmful["attention_mask"] > 0, axis=1)
    ids = harmful["input_ids"]
    rounding = bool(cfg.bf16_label_rounding)

    if noise is None:
        noise = gaussian_noise(rng, mlp_out.shape)
    m4 = hmask[None, :, :, None].astype(jnp.float32)
    n_layers, b = mlp_out.shape[0], mlp_out.shape[1]
    hid = (mlp_out.astype(jnp.float32) * m4).reshape(n_layers, b, -1)
    gauss = (noise.astype(jnp.float32) * m4).reshape(n_layers, b, -1)
    noise_loss = jnp.mean(jax.vmap(lambda x, y: mmd(x, y, rows))(hid, gauss))

    harmful_ce = masked_token_ce(logits, ids, hmask, rounding)
    # one vocabulary projection live at a time (34 of them for a 32-layer model)
    layer_ce = jax.lax.map(jax.checkpoint(lambda h: masked_token_ce(head(h), ids, hmask, rounding)), hidden)
    harmful_losses = (harmful_ce + jnp.sum(layer_ce)) / hidden.shape[0] + 1.0

    align_logits = forward(trainable, frozen, align, rng=_key(rng, 1))
    harmless = masked_token_ce(align_logits, align["input_ids"], official_pair_mask(align, harmful))
    loss = harmless + cfg.beta * noise_loss - cfg.alpha * jnp.log(harmful_losses)
    return loss, {"loss": loss, "align_loss": harmless, "harmful_loss": harmful_ce,
                  "harmful_losses": harmful_losses, "noise_loss": noise_loss}


def make_repnoise_step(ctx: StepContext):
    """``step(frozen, state, batches, rng)`` reading ``align`` and ``harmful``; ctx.cfg: the ``repnoise`` section.

    Metrics: loss (the official logged total), align_loss, harmful_loss (CE of the final logits),
    harmful_losses (the averaged term inside the log), noise_loss (MMD), grad_norm.
    """
    cfg = ctx.cfg if ctx.cfg is not None else RepNoiseConfig()

    def step(frozen, state, batches, rng):
        def loss_fn(w):
            return repnoise_loss(ctx.forward, cfg, w, frozen, batches, rng)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        return apply_gradients(state, grads, ctx.optimizer), {**metrics, "grad_norm": global_norm(grads)}

    return step


REPNOISE = register(MethodSpec(name="repnoise", stage="align", streams=("align", "harmful"),
                               make_step=make_repnoise_step, config_section="repnoise", passes=2))
