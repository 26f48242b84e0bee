"""Batched autoregressive decoding with the KV cache, compiled once per static shape.

Why this shape of code: XLA compiles per shape, so every batch is padded to a
fixed batch size and a *bucketed* prompt length (a multiple of ``bucket``), and
the whole decode -- one prefill call that fills the cache, then a
``lax.while_loop`` of single-token steps -- is one ``jax.jit`` function whose
compilation is cached per (model, batch, prompt bucket, max_new_tokens, greedy,
eos ids, pad id). The loop ends as soon as every sequence has produced an EOS.

Padding. Left padding (the default) puts every prompt's last token in the
final slot; right padding leaves gaps. Both go through one code path: the
cache has ``bucket + max_new_tokens`` slots, the prompt fills the first
``bucket`` and new token ``i`` is written at slot ``bucket + i`` for every
row; ``attention_mask`` (the key validity over all slots) hides the prompt's
pad slots; RoPE positions are ``cumsum(mask) - 1`` for the prompt and
``prompt_len + i`` for new token ``i``, so each row sees exactly the positions
and keys it would see unpadded. The first new token comes from the hidden state
at each row's rightmost real prompt token.

Sampling follows transformers' warpers: logits / temperature, then nucleus
(top-p) filtering that keeps the smallest set of most likely tokens whose mass
reaches ``top_p`` (always at least the top token, so ``top_p -> 0`` is greedy).
The key for step ``i`` of batch ``k`` is ``fold_in(fold_in(rng, k), i)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from booster_jax.errors import BoosterInputError
from booster_jax.models.llama import Llama, init_cache, lm_head, variables

DEFAULT_BUCKET = 32
PADDING_SIDES = ("left", "right")

_TRACES = {"count": 0}  # incremented only while tracing: lets tests prove the compile cache is hit


def trace_count() -> int:
    """How many times the decode function has been traced (compiled) in this process."""
    return _TRACES["count"]


def bucket_length(n: int, bucket: int = DEFAULT_BUCKET) -> int:
    """``n`` rounded up to a multiple of ``bucket`` (at least one bucket): the static prompt length."""
    return max(bucket, -(-n // bucket) * bucket)


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int,
                padding: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """``[B, length]`` int32 ids and mask (1 = real token), padded on ``padding``'s side."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        n = len(p)
        sl = slice(length - n, length) if padding == "left" else slice(0, n)
        ids[row, sl] = p
        mask[row, sl] = 1
    return ids, mask


def prefill(model: Llama, params: dict, lora, ids: jnp.ndarray, mask: jnp.ndarray, cache_len: int):
    """Run the padded prompts through the model in one call, filling cache slots ``[0, T)``.

    Returns ``(cache, last_logits [B, V], key_valid [B, cache_len], next_position [B])``;
    ``key_valid`` marks the prompt's real slots and every later slot (future slots are
    excluded by the causal mask until written).
    """
    b, t = ids.shape
    cache = init_cache(model.cfg, b, cache_len, model.dtype)
    mask = mask.astype(jnp.int32)
    key_valid = jnp.concatenate([mask, jnp.ones((b, cache_len - t), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hidden, updated = model.apply(variables(params, lora, cache=cache), ids, attention_mask=key_valid,
                                  positions=positions, cache_index=0, output="hidden", mutable=["cache"])
    last = jnp.argmax(jnp.arange(t)[None, :] * mask, axis=1)  # rightmost real token of each row
    h_last = hidden[jnp.arange(b), last]
    return updated["cache"], lm_head(model, params, h_last), key_valid, mask.sum(axis=1)


def decode_step(model: Llama, params: dict, lora, cache, tokens: jnp.ndarray, slot, positions: jnp.ndarray,
                key_valid: jnp.ndarray):
    """Feed one token per row at cache slot ``slot`` (RoPE ``positions`` [B]); returns (cache, logits [B, V])."""
    hidden, updated = model.apply(variables(params, lora, cache=cache), tokens[:, None], attention_mask=key_valid,
                                  positions=positions[:, None], cache_index=slot, output="hidden",
                                  mutable=["cache"])
    return updated["cache"], lm_head(model, params, hidden[:, 0])


def select_tokens(logits: jnp.ndarray, key, greedy: bool, temperature, top_p) -> jnp.ndarray:
    """Greedy argmax, or a temperature + nucleus sample (transformers' TopPLogitsWarper rule)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)  # the top token is always kept
    cutoff = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)
    filtered = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "eos_ids", "pad_id"))
def decode_batch(model: Llama, params: dict, lora, ids, mask, active, rng, temperature, top_p, *,
                 max_new_tokens: int, greedy: bool, eos_ids: tuple[int, ...], pad_id: int):
    """One padded batch: ``(tokens [B, max_new_tokens], steps)``; rows stop at EOS, then hold ``pad_id``.

    ``active`` [B] is False for filler rows (they start finished so they never extend the loop).
    ``steps`` is how many tokens were produced before every row was done.
    """
    _TRACES["count"] += 1
    b, t = ids.shape
    n = max_new_tokens
    cache, logits, key_valid, next_pos = prefill(model, params, lora, ids, mask, t + n)
    eos = jnp.asarray(eos_ids, jnp.int32) if eos_ids else None

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos[None, :], axis=1) if eos is not None else jnp.zeros(tok.shape, bool)

    def pick(logits, i, done):
        tok = select_tokens(logits, jax.random.fold_in(rng, i), greedy, temperature, top_p)
        return jnp.where(done, pad_id, tok)

    done = ~active.astype(bool)
    tok = pick(logits, 0, done)
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
    done = done | is_eos(tok)

    def cond(state):
        i, _, _, _, done = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, cache, tok, out, done = state
        cache, logits = decode_step(model, params, lora, cache, tok, t + i - 1, next_pos + i - 1, key_valid)
        new = pick(logits, i, done)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        return i + 1, cache, new, out, done | is_eos(new)

    steps, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok, out, done))
    return out, steps


def _eos_tuple(eos_id) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(int(e) for e in eos_id)


def _check(model, prompts_ids, max_new_tokens, pad_id, batch_size, greedy, temperature, top_p, rng, padding,
           bucket, eos_ids):
    vocab = model.cfg.vocab_size
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise BoosterInputError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise BoosterInputError(f"generate: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(bucket, (int, np.integer)) or bucket < 1:
        raise BoosterInputError(f"generate: bucket must be a positive int, got {bucket!r}")
    if padding not in PADDING_SIDES:
        raise BoosterInputError(f"generate: padding {padding!r}; expected one of {PADDING_SIDES}")
    if not 0 <= int(pad_id) < vocab:
        raise BoosterInputError(f"generate: pad_id {pad_id} outside the vocabulary [0, {vocab})")
    if not greedy:
        if rng is None:
            raise BoosterInputError("generate: sampling (greedy=False) needs an explicit rng key")
        if not temperature > 0:
            raise BoosterInputError(f"generate: temperature must be > 0, got {temperature}")
        if not 0 <= top_p <= 1:
            raise BoosterInputError(f"generate: top_p must be in [0, 1], got {top_p}")
    for e in eos_ids:
        if not 0 <= e < vocab:
            raise BoosterInputError(f"generate: eos_id {e} outside the vocabulary [0, {vocab})")
    for i, p in enumerate(prompts_ids):
        if len(p) == 0:
            raise BoosterInputError(f"generate: prompts_ids[{i}] is empty; every prompt needs at least one token")
        arr = np.asarray(p)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise BoosterInputError(f"generate: prompts_ids[{i}] must be a flat list of ints")
        if arr.min() < 0 or arr.max() >= vocab:
            raise BoosterInputError(f"generate: prompts_ids[{i}] has ids outside the vocabulary [0, {vocab})")


def generate(model: Llama, params: dict, lora, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_id, pad_id: int, batch_size: int, greedy: bool = True, temperature: float = 1.0,
             top_p: float = 1.0, rng=None, padding: str = "left", bucket: int = DEFAULT_BUCKET,
             include_eos: bool = False) -> list[list[int]]:
    """New tokens for each prompt (same order), cut at its first EOS (kept only with ``include_eos``).

    ``eos_id`` is an id, a list of ids (any of them stops a row) or None (never stop early).
    Prompts are sorted by length into batches of ``batch_size`` (fewer when there are fewer
    prompts: the next power of two) so that padding stays small; the last batch is
    filled with inactive copies to keep the shape static.
    """
    eos_ids = _eos_tuple(eos_id)
    prompts_ids = [list(p) for p in prompts_ids]
    _check(model, prompts_ids, max_new_tokens, pad_id, batch_size, greedy, temperature, top_p, rng, padding,
           bucket, eos_ids)
    if not prompts_ids:
        return []
    bs = min(int(batch_size), 1 << (len(prompts_ids) - 1).bit_length())
    rng = jax.random.key(0) if rng is None else rng  # unused when greedy
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    results: list[list[int] | None] = [None] * len(prompts_ids)
    for k, start in enumerate(range(0, len(order), bs)):
        idx = order[start:start + bs]
        rows = [prompts_ids[i] for i in idx]
        active = np.array([True] * len(rows) + [False] * (bs - len(rows)))
        rows += [rows[0]] * (bs - len(rows))
        ids, mask = pad_prompts(rows, bucket_length(max(map(len, rows)), bucket), int(pad_id), padding)
        out, _ = decode_batch(model, params, lora, ids, mask, active, jax.random.fold_in(rng, k),
                              jnp.float32(temperature), jnp.float32(top_p), max_new_tokens=int(max_new_tokens),
                              greedy=bool(greedy), eos_ids=eos_ids, pad_id=int(pad_id))
        out = np.asarray(out)
        for j, i in enumerate(idx):
            results[i] = cut_at_eos(out[j], eos_ids, include_eos)
    return results  # type: ignore[return-value]


def cut_at_eos(tokens, eos_ids: Sequence[int], include_eos: bool = False) -> list[int]:
    """The tokens before the first EOS (and the EOS itself with ``include_eos``)."""
    tokens = [int(x) for x in tokens]
    for pos, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[:pos + 1] if include_eos else tokens[:pos]
    return tokens


def generate_text(tokenizer, model: Llama, params: dict, lora, prompts: Sequence[str], *, max_new_tokens: int,
                  batch_size: int = 16, eos_id=None, pad_id: int | None = None, full_text: bool = False,
                  add_special_tokens: bool = True, **kwargs) -> list[str]:
    """Encode ``prompts`` with ``tokenizer`` (its special tokens, e.g. BOS), generate, decode.

    Returns the decoded continuation (``skip_special_tokens=True``), or with ``full_text`` the
    decode of prompt + continuation together, which is what the official ``pred.py`` splits on
    ``"### Response:"``. ``add_special_tokens=False`` for prompts that already hold them (a chat
    template's text). ``eos_id``/``pad_id`` default to the tokenizer's (pad falls back to EOS).
    Other keyword arguments go to :func:`generate`.
    """
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BoosterInputError(f"generate_text: prompts[{i}] is {type(p).__name__}, expected str")
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise BoosterInputError("generate_text: the tokenizer has neither a pad nor an EOS token; pass pad_id")
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    new = generate(model, params, lora, encoded, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                   batch_size=batch_size, **kwargs)
    if full_text:
        return [tokenizer.decode(e + n, skip_special_tokens=True) for e, n in zip(encoded, new)]
    return [tokenizer.decode(n, skip_special_tokens=True) for n in new]
