"""model.remat: the three policies give the same gradients (float32, 1e-6) and "full" keeps less for the
backward pass than "none" (XLA's compiled temporaries)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from booster_jax.config import load_config
from booster_jax.errors import BoosterInputError
from booster_jax.methods.base import Forward, lm_loss
from booster_jax.models.llama import LlamaConfig, LoraSpec, init_params, make_model
from booster_jax.models.lora import init_lora

CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=16)
SPEC = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"))


def batch(rows=4, length=24):
    rs = np.random.RandomState(0)
    mask = np.ones((rows, length), np.int32)
    mask[1, 15:] = 0
    return {"input_ids": jnp.asarray(rs.randint(1, 64, (rows, length)), jnp.int32),
            "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(mask, jnp.float32)}


def loss_grad(remat):
    model = make_model(CFG, SPEC, remat=remat)
    params = init_params(model, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(jax.random.key(1), CFG, SPEC))
    fwd = Forward(model)
    fn = jax.jit(jax.value_and_grad(lambda w, b: lm_loss(fwd(w, params, b), b)))
    return fn, lora


def test_remat_policies_give_the_same_gradients():
    b = batch()
    (l0, g0) = loss_grad("none")[0](loss_grad("none")[1], b)
    for policy in ("full", "dots"):
        fn, lora = loss_grad(policy)
        l, g = fn(lora, b)
        assert abs(float(l) - float(l0)) <= 1e-6
        for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6, rtol=1e-6)


def test_full_remat_keeps_less_for_the_backward_pass():
    temp = {}
    for policy in ("none", "full"):
        fn, lora = loss_grad(policy)
        temp[policy] = fn.lower(lora, batch(8, 128)).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.8 * temp["none"], temp


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(BoosterInputError, match="model.remat"):
        load_config(None, ["model.remat=some"])
