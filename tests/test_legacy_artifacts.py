"""A finished stage and a PEFT adapter written by the code before issue 12 (tests/fixtures/make_legacy.py,
run on that checkout) still load with today's code, to the same values."""

import os

import jax
import numpy as np

from booster_jax.config import OptimConfig
from booster_jax.methods.base import init_state, make_optimizer
from booster_jax.models.lora import init_lora, load_peft
from booster_jax.train.checkpoint import StageStore
from tests.fixtures.make_legacy import CFG, SPEC

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "legacy")


def expected():
    return dict(np.load(os.path.join(HERE, "expected_lora.npz")))


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_legacy_stage_output_restores_onto_todays_state():
    target = init_state(init_lora(jax.random.key(0), CFG, SPEC), make_optimizer(OptimConfig(lr=1e-3)))
    store = StageStore(os.path.join(HERE, "stage"), fingerprint="legacy")
    assert store.is_done("legacy")
    state, meta = store.load_final(target)
    store.close()
    assert meta["stage"] == "legacy" and int(state.step) == 7
    got, want = flat(state.trainable), expected()
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_legacy_peft_adapter_loads():
    lora, spec = load_peft(os.path.join(HERE, "peft"), CFG)
    assert spec == SPEC
    got, want = flat(lora), expected()
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_stage_fingerprints_are_those_that_earlier_run_dirs_hold():
    """A run directory is reused or resumed only under the same stage fingerprint, so a refactor must not move
    it. The values were computed by the code before the TrainSpec change (f1399a6) for the shipped default
    config and the built-in defaults (no data files: their digests are 'none')."""
    import types

    from booster_jax.config import load_config
    from booster_jax.train import stages

    base = types.SimpleNamespace(fingerprint="m")
    want = {"configs/synthetic/default.yaml": ("29a6247b7e8b39a9", "b4c58cabf5ba87db", "a6c3b70078d47c6b"),
            None: ("421b931f7d08e97e", "a82d2789fb4a9842", "b2e7d394e2f5e363")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path, (align, warmup, finetune) in want.items():
        cfg = load_config(os.path.join(root, path) if path else None, [])
        assert stages.align_fingerprint(cfg, base) == align, path
        assert stages.warmup_fingerprint(cfg, base, 3) == warmup, path
        assert stages.finetune_fingerprint(cfg, align) == finetune, path
