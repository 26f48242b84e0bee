"""Gradient accumulation (optim.accumulate_steps): SFT over k micro-batches equals one step on their
union (within 1e-5, float32, micro-batches with equal target-token counts, as HF averages micro-batch
means); Booster perturbs per micro-batch, as the official trainer does, and steps on the mean of the
micro-batches' Booster directions (within 1e-6)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from booster_jax.config import BoosterConfig, OptimConfig
from booster_jax.methods.base import StepContext, apply_gradients, get_method, init_state, make_optimizer
from booster_jax.methods.booster import booster_gradient
from tests.hf_fixtures import peft_reference
from tests.torch_reference import synthetic_batch

OPTIM = OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=0.5)
ACC = dataclasses.replace(OPTIM, accumulate_steps=2)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return peft_reference(tmp_path_factory)


def micro(vocab, seed):
    """Two rows of equal target count, so the mean of micro-batch means is the union's mean."""
    return synthetic_batch(vocab, (12, 9), (5, 2), 12, seed=seed)


def union(a, b):
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def _maxdiff(x, y):
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def _steps(ref, method, optim, batch_list, cfg=None):
    optimizer = make_optimizer(optim, total_steps=len(batch_list))
    step = jax.jit(get_method(method, "align").make_step(StepContext(ref.forward, optimizer, cfg)))
    state = init_state(ref.lora, optimizer)
    for i, b in enumerate(batch_list):
        state, _ = step(ref.params, state, jax.tree.map(jnp.asarray, b), jax.random.key(i))
    return state


def test_sft_accumulated_equals_the_large_batch(ref):
    v = ref.vocab
    a, b, c, d = (micro(v, s) for s in (1, 2, 3, 4))
    acc = _steps(ref, "sft", ACC, [{"align": x} for x in (a, b, c, d)])  # 2 optimizer steps
    big = _steps(ref, "sft", OPTIM, [{"align": union(a, b)}, {"align": union(c, d)}])
    assert _maxdiff(acc.trainable, big.trainable) < 1e-5
    assert _maxdiff(acc.trainable, ref.lora) > 1e-4  # and the weights did move
    half = _steps(ref, "sft", ACC, [{"align": a}])
    assert _maxdiff(half.trainable, ref.lora) == 0.0  # one micro-batch of two: no update yet


def test_booster_accumulated_perturbs_per_micro_batch(ref):
    v = ref.vocab
    cfg = BoosterConfig(lam=5.0, alpha=0.1)
    m1 = {"align": micro(v, 11), "harmful": micro(v, 21)}
    m2 = {"align": micro(v, 12), "harmful": micro(v, 22)}
    acc = _steps(ref, "booster", ACC, [m1, m2], cfg)
    # by hand: each micro-batch's own Booster direction (its own perturbation), averaged, one AdamW step
    g = [booster_gradient(ref.forward, cfg, ref.lora, ref.params, jax.tree.map(jnp.asarray, m))[0] for m in (m1, m2)]
    mean = jax.tree.map(lambda x, y: (x + y) / 2, *g)
    optimizer = make_optimizer(OPTIM, total_steps=1)
    manual = apply_gradients(init_state(ref.lora, optimizer), mean, optimizer)
    assert _maxdiff(acc.trainable, manual.trainable) < 1e-6
    # not the same as perturbing once on the union of the harmful micro-batches
    union_cfg = {"align": union(m1["align"], m2["align"]), "harmful": union(m1["harmful"], m2["harmful"])}
    once = _steps(ref, "booster", OPTIM, [union_cfg], cfg)
    assert _maxdiff(once.trainable, manual.trainable) > 1e-7


def test_accumulate_steps_is_validated():
    from booster_jax.config import load_config
    from booster_jax.errors import BoosterInputError
    import os

    smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic", "smoke.yaml")
    with pytest.raises(BoosterInputError, match="accumulate_steps"):
        load_config(smoke, ["align.optim.accumulate_steps=0"])
