"""The LM head at target positions only (``Forward.loss`` with ``target_index``) against the full-head loss.

The two compute the same function: each target's logits come from the same hidden state and head, and the
mean divides by the same exact token count. So values and LoRA gradients must agree to float32 rounding
(here they are compared at 1e-6 absolute, on tied and untied heads, padded, packed and Booster-padded
batches); ``tests/test_real_model.py`` repeats the check at SmolLM2's size.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from booster_jax.data.batches import collate, collate_packed, target_index
from booster_jax.methods.base import Forward, lm_loss
from booster_jax.methods.booster import common_shape
from booster_jax.models.llama import LlamaConfig, LoraSpec, init_params, make_model
from booster_jax.models.lora import init_lora

TOL = 1e-6


def tiny(tied: bool):
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
    spec = LoraSpec(r=4, alpha=8.0)
    model = make_model(cfg, spec)
    params = init_params(model, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.02, init_lora(jax.random.key(1), cfg, spec))  # B != 0
    return Forward(model), params, lora


def examples(seed: int, n: int, longest: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, longest + 1))
        prompt = int(rng.integers(1, length - 1))
        ids = rng.integers(0, 97, length).astype(np.int32)
        mask = np.zeros(length, np.float32)
        mask[prompt:] = 1.0
        out.append((ids, mask))
    return out


def both(fwd, params, lora, batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    full = {k: v for k, v in batch.items() if k != "target_index"}
    ref = jax.value_and_grad(lambda w: lm_loss(fwd(w, params, full), full))(lora)
    got = jax.value_and_grad(lambda w: fwd.loss(w, params, batch))(lora)
    return ref, got


def assert_same(ref, got):
    assert abs(float(ref[0]) - float(got[0])) <= TOL
    for a, b in zip(jax.tree.leaves(ref[1]), jax.tree.leaves(got[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=TOL, rtol=0)


def test_target_index_lists_every_target_and_pads_with_the_last_position():
    mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], np.float32)
    index = target_index(mask, buckets=(2, 4, 6))
    assert index.shape == (3, 4)  # the longest row has 4 targets: bucket 4
    np.testing.assert_array_equal(index, [[1, 2, 5, 5], [0, 1, 2, 3], [5, 5, 5, 5]])
    assert target_index(mask, buckets=(3, 6)).shape == (3, 6)  # K = the smallest bucket that holds them



def test_target_index_matches_a_per_row_listing_on_random_masks():
    """Scattered (packed-style) targets, empty rows and full rows: each row lists exactly its own positions."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        mask = (rng.random((7, 33)) < rng.choice([0.0, 0.2, 0.7, 1.0])).astype(np.float32)
        index = target_index(mask, buckets=(8, 16, 32))
        for row, m in zip(index, mask):
            at = np.flatnonzero(m[1:] > 0)
            np.testing.assert_array_equal(row[:len(at)], at)
            assert (row[len(at):] == 32).all()

def test_collate_adds_a_target_index_shorter_than_the_row():
    batch = collate([(np.arange(10), np.r_[np.zeros(7), np.ones(3)].astype(np.float32))], 0, (4, 8, 12), 2)
    assert batch["input_ids"].shape == (2, 12) and batch["target_index"].shape == (2, 4)
    np.testing.assert_array_equal(batch["target_index"], [[6, 7, 8, 11], [11, 11, 11, 11]])


@pytest.mark.parametrize("tied", [False, True])
def test_padded_batch_loss_and_gradients_match_the_full_head(tied):
    fwd, params, lora = tiny(tied)
    batch = collate(examples(0, 6, 20), 0, (8, 16, 24), batch_size=8)  # two all-padding filler rows
    assert batch["target_index"].shape[1] < batch["input_ids"].shape[1]
    assert_same(*both(fwd, params, lora, batch))


def test_packed_batch_loss_and_gradients_match_the_full_head():
    fwd, params, lora = tiny(False)
    items = examples(1, 6, 10)
    batch = collate_packed([items[:3], items[3:5], items[5:]], 0, 32)
    assert_same(*both(fwd, params, lora, batch))


def test_booster_common_shape_keeps_the_targets():
    """Two batches of different lengths and target counts padded to one shape: each loss is unchanged."""
    fwd, params, lora = tiny(False)
    short = collate(examples(2, 4, 9), 0, (4, 8, 12))
    long = collate(examples(3, 6, 30), 0, (8, 16, 32))
    for before, after in zip((short, long), common_shape({k: jnp.asarray(v) for k, v in short.items()},
                                                          {k: jnp.asarray(v) for k, v in long.items()})):
        assert after["target_index"].shape == (6, long["target_index"].shape[1])
        ref = jax.value_and_grad(lambda w: fwd.loss(w, params, {k: jnp.asarray(v) for k, v in before.items()}))(lora)
        got = jax.value_and_grad(lambda w: fwd.loss(w, params, after))(lora)
        assert_same(ref, got)


def test_a_wrong_index_changes_the_loss():
    """Control: the check above can fail -- pointing one target slot elsewhere changes the value."""
    fwd, params, lora = tiny(False)
    batch = {k: jnp.asarray(v) for k, v in collate(examples(4, 4, 16), 0, (8, 16)).items()}
    bad = dict(batch, target_index=batch["target_index"].at[0, 0].set(0))
    assert abs(float(fwd.loss(lora, params, batch)) - float(fwd.loss(lora, params, bad))) > 1e-4
