"""The README's Python API session, run as written, and the exported names it relies on."""

import os
import re

import jax
import numpy as np
import pytest

import booster_jax

ROOT = os.path.join(os.path.dirname(__file__), "..")


def readme_session() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's Python API section holds one python block"
    return blocks[0]


def test_every_exported_name_resolves_and_says_why():
    for name in booster_jax.__all__:
        value = getattr(booster_jax, name)
        assert value is not None and name in dir(booster_jax)
        if callable(value):  # a dataclass's generated doc ("Name(field=...)") does not count
            doc = (value.__doc__ or "").strip()
            assert doc and not doc.startswith(f"{name}("), f"booster_jax.{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        booster_jax.nope  # noqa: B018


def test_the_readme_session_runs_and_computes_boosters_update(tmp_path, monkeypatch):
    """Run where the README's relative paths resolve (configs/), with the world written under tmp_path."""
    os.symlink(os.path.abspath(os.path.join(ROOT, "configs")), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(readme_session(), "README.md (Python API)", "exec"), ns)
    bj, jnp = ns["bj"], jax.numpy
    assert (tmp_path / "runs" / "world").is_dir()  # the embedded world was built here, nothing downloaded
    metrics, update, lora, state = ns["metrics"], ns["update"], ns["lora"], ns["state"]
    align = ns["align"]  # make_batch: 8 rows in the smoke config's one bucket, prompts and padding not targets
    assert align["input_ids"].shape == (8, 64) and align["loss_mask"].dtype == jnp.float32
    assert 0 < float(align["loss_mask"].sum()) < float(align["attention_mask"].sum())
    loss = lambda w, b: float(bj.lm_loss(ns["forward"](w, ns["base"].params, b), b))  # noqa: E731
    # the built-in step logs f(w) and h(w): the same losses the session differentiated
    assert np.isclose(float(metrics["loss"]), loss(lora, ns["align"]), rtol=1e-5)
    assert np.isclose(float(metrics["harmful_loss"]), loss(lora, ns["harmful"]), rtol=1e-5)
    # the hand-written update is Booster's gradient (g3 + lam g1 - lam g2), as the pass engine computes it
    ref, _ = bj.booster_gradient(ns["forward"], ns["cfg"].align.booster, lora, ns["base"].params,
                                 {"align": ns["align"], "harmful": ns["harmful"]})
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref))
    for got, want in zip(jax.tree.leaves(update), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale)
    assert np.isclose(float(metrics["grad_norm"]), float(bj.global_norm(update)), rtol=1e-4)
    assert int(state.step) == 1
    assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(jax.tree.leaves(state.trainable),
                                                                   jax.tree.leaves(lora)))
