"""A method's step that breaks the contract of docs/extending.md ends in one error naming the method, its file
and the broken rule, raised while jax.jit traces the step (methods.base.build_step), not in a traceback from
inside JAX; a step that keeps the contract runs exactly as it would unwrapped. Registration checks the streams."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import booster_jax as bj
from booster_jax.config import BoosterConfig, OptimConfig
from booster_jax.errors import BoosterInputError
from booster_jax.methods import base
from booster_jax.methods.base import build_extra, build_step
from tests.plugin_registry import isolated_registry  # noqa: F401  (fixture)
from tests.test_extending import tiny_setup


def sft_grads(ctx, frozen, state, batch):
    return jax.value_and_grad(lambda w: bj.lm_loss(ctx.forward(w, frozen, batch), batch))(state.trainable)


def returns_state_alone(ctx):
    def step(frozen, state, batches, rng):
        _, g = sft_grads(ctx, frozen, state, batches["align"])
        return bj.apply_gradients(state, g, ctx.optimizer)
    return step


def returns_three(ctx):
    def step(frozen, state, batches, rng):
        f, g = sft_grads(ctx, frozen, state, batches["align"])
        return bj.apply_gradients(state, g, ctx.optimizer), {"loss": f}, g
    return step


def logs_a_tree(ctx):
    def step(frozen, state, batches, rng):
        f, g = sft_grads(ctx, frozen, state, batches["align"])
        return bj.apply_gradients(state, g, ctx.optimizer), {"loss": f, "grads": g}
    return step


def logs_a_vector(ctx):
    def step(frozen, state, batches, rng):
        f, g = sft_grads(ctx, frozen, state, batches["align"])
        return bj.apply_gradients(state, g, ctx.optimizer), {"loss": f, "per_row": jnp.ones(4)}
    return step


def casts_the_weights(ctx):
    def step(frozen, state, batches, rng):
        f, g = sft_grads(ctx, frozen, state, batches["align"])
        new = bj.apply_gradients(state, g, ctx.optimizer)
        return new._replace(trainable=jax.tree.map(lambda x: x.astype(jnp.bfloat16), new.trainable)), {"loss": f}
    return step


def grows_extra(ctx):
    def step(frozen, state, batches, rng):
        f, g = sft_grads(ctx, frozen, state, batches["align"])
        return bj.apply_gradients(state, g, ctx.optimizer)._replace(extra=(f,)), {"loss": f}
    return step


def reads_harmful(ctx):
    def step(frozen, state, batches, rng):
        f, g = sft_grads(ctx, frozen, state, batches["harmful"])
        return bj.apply_gradients(state, g, ctx.optimizer), {"loss": f}
    return step


def run_one_step(make_step, streams=("align",), source="/defenses/mine.py"):
    spec = bj.MethodSpec(name="mine", stage="align", streams=streams, make_step=make_step, source=source)
    forward, params, lora, batches = tiny_setup()
    optimizer = bj.make_optimizer(OptimConfig(), 10)
    step = jax.jit(build_step(spec, bj.StepContext(forward, optimizer)))
    return step(params, bj.init_state(lora, optimizer), {k: batches[k] for k in streams}, jax.random.key(0))


@pytest.mark.parametrize("make_step, expected", [
    (returns_state_alone, "its step returned a TrainState alone; expected (new state, {metric name: scalar})"),
    (returns_three, "its step returned a tuple of 3; expected (new state"),
    (logs_a_tree, "metric 'grads' is a dict; every metric must be one scalar"),
    (logs_a_vector, "metric 'per_row' is shape [4]; every metric must be one scalar"),
    (casts_the_weights, "its step returned state.trainable"),
    (grows_extra, "another tree in state.extra than the state it received"),
    (reads_harmful, "its step reads batches['harmful'], but its MethodSpec declares streams ('align',); "
                    "add 'harmful' to streams"),
])
def test_a_step_that_breaks_the_contract_is_named_with_its_file(make_step, expected):
    with pytest.raises(BoosterInputError) as e:
        run_one_step(make_step)
    message = str(e.value)
    assert message.startswith("align method 'mine' (/defenses/mine.py): ") and expected in message
    if make_step is casts_the_weights:
        assert "as bfloat16[" in message and "but received it as float32[" in message


def test_a_step_that_keeps_the_contract_runs_as_it_would_unwrapped():
    spec = bj.get_method("booster", "align")
    forward, params, lora, batches = tiny_setup()
    optimizer = bj.make_optimizer(OptimConfig(), 10)
    ctx = bj.StepContext(forward, optimizer, BoosterConfig())
    outs = [jax.jit(f)(params, bj.init_state(lora, optimizer), batches, jax.random.key(0))
            for f in (spec.make_step(ctx), build_step(spec, ctx))]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_key_error_of_the_step_s_own_is_left_as_it_is():
    def make_step(ctx):
        def step(frozen, state, batches, rng):
            return {}["oops"]
        return step
    with pytest.raises(KeyError, match="oops"):
        run_one_step(make_step)


@pytest.mark.parametrize("streams, expected", [
    ("align", "streams 'align' (a string: write ('align',)); expected a tuple of distinct stream names from "
              "('align', 'harmful')"),
    (("task",), "streams ('task',); expected a tuple of distinct stream names from ('align', 'harmful') "
                "(an align stage's streams)"),
    ((), "streams (); expected a tuple"),
    (("align", "align"), "expected a tuple of distinct stream names"),
])
def test_registration_checks_the_streams(isolated_registry, streams, expected):
    with pytest.raises(BoosterInputError) as e:
        bj.register(bj.MethodSpec(name="mine", stage="align", streams=streams, make_step=bj.make_sft_step))
    assert str(e.value).startswith("MethodSpec 'mine': ") and expected in str(e.value)
    assert ("align", "mine") not in base.METHODS


def test_registration_checks_make_step(isolated_registry):
    with pytest.raises(BoosterInputError, match="make_step must be a function make_step"):
        bj.register(bj.MethodSpec(name="mine", stage="align", streams=("align",), make_step=None))


def test_an_extra_state_that_is_not_arrays_is_named_before_the_step_is_traced():
    forward, params, lora, batches = tiny_setup()
    spec = bj.MethodSpec(name="mine", stage="align", streams=("align",), make_step=bj.make_sft_step,
                         source="/defenses/mine.py",
                         init_extra=lambda trainable, frozen, section: {"anchor": trainable, "note": "hello"})
    with pytest.raises(BoosterInputError) as e:
        build_extra(spec, lora, params, None)
    assert str(e.value).startswith("align method 'mine' (/defenses/mine.py): init_extra returned "
                                   "state.extra['note'] = 'hello' (a str); the extra state holds arrays and numbers")
    ok = dataclasses.replace(spec, init_extra=lambda trainable, frozen, section: {"anchor": trainable, "count": 0})
    extra = build_extra(ok, lora, params, None)
    assert extra["count"] == 0 and jax.tree.structure(extra["anchor"]) == jax.tree.structure(lora)
    assert build_extra(dataclasses.replace(spec, init_extra=None), lora, params, None) == ()
