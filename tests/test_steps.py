"""The SFT and Booster steps against a PyTorch transcription of the official trainer, and the maths.

Tolerances (float32, tiny LLaMA, LoRA r=8 on q,k,v, lr 1e-3): LoRA weights after 3 optimizer steps
within 1e-5 of the PyTorch reference (they move by ~1e-3 per step), logged metrics within 1e-5
relative; lam = 0 equals SFT within 1e-7; the Booster gradient equals the gradient of its
first-order objective within 1e-5 of its norm, and fourth-order central finite differences of that
objective (float32, t = 3e-2) within 4e-4 + 1e-3 * |derivative| along unit directions (observed
errors 2e-5..2e-4 for derivatives 5e-4..2.3).
Compilations are shared (module fixtures, traced lam/alpha) to keep the file fast on 2 cores.
"""

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from booster_jax.config import BoosterConfig, OptimConfig
from booster_jax.errors import BoosterInputError
from booster_jax.methods.base import (StepContext, apply_gradients, get_method, global_norm, init_state,
                                      lm_loss, make_optimizer)
from booster_jax.methods.booster import booster_gradient
from booster_jax.methods.sft import make_sft_step
from tests.hf_fixtures import peft_reference
from tests.torch_reference import TorchReference, lora_tree_from_peft, synthetic_batch, to_torch

# Clipping at 0.5 (the Trainer's default is 1.0) so the tiny model's gradients do get clipped.
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=0.5)
STEPS = 3
PARITY_TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Base model (transformers + our params), a PEFT LoRA with PEFT's own init (B = 0) and ours from it."""
    s = peft_reference(tmp_path_factory)
    return dict(cfg=s.cfg, params=s.params, peft_model=s.peft_model, lora=s.lora, forward=s.forward, runs={})


def batches(vocab, n=STEPS):
    """Per step an alignment and a harmful batch, [4, 12] each: right-padded, mixed lengths, prompts masked.

    One shape for both streams so a single compiled loss-gradient serves every reference computation.
    """
    out = []
    for s in range(n):
        align = synthetic_batch(vocab, (12, 7, 9, 4), (5, 3, 6, 2), 12, seed=100 + s)
        harmful = synthetic_batch(vocab, (10, 12, 6, 8), (4, 6, 2, 5), 12, seed=200 + s)
        out.append({"align": align, "harmful": harmful, "task": align})
    return out


def run_ours(setup, method, stage, booster_cfg=None):
    """3 jitted steps of a registered method (memoised per configuration: each compile costs seconds)."""
    key = (method, stage, booster_cfg)
    if key not in setup["runs"]:
        optimizer = make_optimizer(OPTIM)
        step = jax.jit(get_method(method, stage).make_step(StepContext(setup["forward"], optimizer, booster_cfg)))
        state = init_state(setup["lora"], optimizer)
        history = []
        for i, b in enumerate(batches(setup["cfg"].vocab_size)):
            state, metrics = step(setup["params"], state, jax.tree.map(jnp.asarray, b), jax.random.key(i))
            history.append({k: float(v) for k, v in metrics.items()})
        assert step._cache_size() == 1  # compiled once: cfg values are Python constants, shapes fixed
        assert int(state.step) == STEPS
        setup["runs"][key] = (state.trainable, history)
    return setup["runs"][key]


def run_torch(setup, method, booster_cfg=None):
    model = copy.deepcopy(setup["peft_model"])
    bc = booster_cfg or BoosterConfig()
    ref = TorchReference(model, lr=OPTIM.lr, weight_decay=OPTIM.weight_decay, betas=(OPTIM.b1, OPTIM.b2),
                         eps=OPTIM.eps, max_grad_norm=OPTIM.max_grad_norm, lam=bc.lam, alpha=bc.alpha,
                         perturbed_term=bc.perturbed_term)
    history = []
    for b in batches(setup["cfg"].vocab_size):
        if method == "booster":
            history.append(ref.booster_step(to_torch(b["align"]), to_torch(b["harmful"])))
        else:
            history.append(ref.sft_step(to_torch(b["task"])))
    return lora_tree_from_peft(model, setup["cfg"].num_layers), history


def max_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(la, lb))


def assert_moved(setup, trained):
    """PEFT init has B = 0; after 3 steps every adapter's A and B have moved (the check is not vacuous)."""
    for block, projs in trained["layers"].items():
        for proj, ab in projs.items():
            init = setup["lora"]["layers"][block][proj]
            assert not np.asarray(init["b"]).any()
            assert float(jnp.abs(ab["b"]).max()) > 1e-3, proj
            assert float(jnp.abs(ab["a"] - init["a"]).max()) > 5e-4, proj


def assert_metrics_close(ours, theirs):
    for o, t in zip(ours, theirs):
        assert set(t) <= set(o)
        for k, v in t.items():
            assert o[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_booster_matches_official_torch_step(setup):
    bc = BoosterConfig(lam=5.0, alpha=0.1)
    ours, our_hist = run_ours(setup, "booster", "align", bc)
    ref, ref_hist = run_torch(setup, "booster", bc)
    assert max_diff(ours, ref) <= PARITY_TOL
    assert_moved(setup, ours)
    assert_metrics_close(our_hist, ref_hist)
    assert max(h["grad_norm"] for h in our_hist) > OPTIM.max_grad_norm  # the clipping branch is exercised


def test_sft_matches_torch_step(setup):
    """The fine-tuning registration (stream ``task``); the alignment one is the same function on ``align``."""
    ours, our_hist = run_ours(setup, "sft", "finetune")
    ref, ref_hist = run_torch(setup, "sft")
    assert max_diff(ours, ref) <= PARITY_TOL
    assert_moved(setup, ours)
    assert_metrics_close(our_hist, ref_hist)


def test_lam_zero_is_sft(setup):
    ours, hist = run_ours(setup, "booster", "align", BoosterConfig(lam=0.0, alpha=0.1))
    sft, sft_hist = run_ours(setup, "sft", "finetune")  # its "task" batches are the "align" batches
    assert max_diff(ours, sft) <= 1e-7
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in sft_hist], abs=1e-7)


@pytest.fixture(scope="module")
def fns(setup):
    """Jitted pieces shared by the gradient tests: lam and alpha are traced, so each compiles once."""
    fwd, params = setup["forward"], setup["params"]

    def full(w, batch, lam, alpha):
        cfg = types.SimpleNamespace(lam=lam, alpha=alpha, eps=1e-7, perturbed_term=True)
        return booster_gradient(fwd, cfg, w, params, batch)

    loss_grad = jax.jit(jax.value_and_grad(lambda w, b: lm_loss(fwd(w, params, b), b)))
    batch = jax.tree.map(jnp.asarray, batches(setup["cfg"].vocab_size, 1)[0])
    leaves, tree = jax.tree.flatten(setup["lora"])
    keys = jax.random.split(jax.random.key(0), len(leaves))
    # A general point: the PEFT init plus noise, so B != 0 and every term of the gradient is non-trivial.
    w0 = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return types.SimpleNamespace(full=jax.jit(full), loss_grad=loss_grad, batch=batch, w0=w0)


def axpy(a, x, y):
    return jax.tree.map(lambda u, v: a * u + v, x, y)


def dot(a, b):
    return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_booster_gradient_is_the_first_order_objective(fns):
    """g = grad of F(w) = f(w) + lam * (h(w) - h(w - alpha * s)) at w0, s = g1(w0)/(||g1(w0)|| + eps) held fixed."""
    lam, alpha, eps = 5.0, 0.5, 1e-7
    b, w0 = fns.batch, fns.w0
    g, _ = fns.full(w0, b, lam, alpha)
    _, g1 = fns.loss_grad(w0, b["harmful"])
    g_ablated = axpy(lam, g1, fns.loss_grad(w0, b["align"])[1])  # what the update would be without g2
    shift = jax.tree.map(lambda x: alpha * x / (global_norm(g1) + eps), g1)  # alpha * s, fixed

    def F(w):
        return (fns.loss_grad(w, b["align"])[0] + lam * fns.loss_grad(w, b["harmful"])[0]
                - lam * fns.loss_grad(axpy(-1.0, shift, w), b["harmful"])[0])

    # grad F by linearity from independent loss gradients (the chain rule through a fixed shift is the identity)
    g_F = axpy(lam, fns.loss_grad(w0, b["harmful"])[1], fns.loss_grad(w0, b["align"])[1])
    g_F = axpy(-lam, fns.loss_grad(axpy(-1.0, shift, w0), b["harmful"])[1], g_F)
    assert max_diff(g, g_F) <= 1e-5 * float(global_norm(g))

    # Fourth-order central differences (float32 F has ~1e-6 rounding noise; this stencil at t = 3e-2
    # keeps the error near 1e-4) along the gradient, along the g2 term, and along random directions.
    leaves, tree = jax.tree.flatten(w0)
    directions = [g, axpy(-1.0, g_ablated, g)]
    for seed in range(3):
        keys = jax.random.split(jax.random.key(10 + seed), len(leaves))
        directions.append(jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    t = 3e-2
    for i, d in enumerate(directions):
        d = jax.tree.map(lambda x: x / global_norm(d), d)
        diff = {k: float(F(axpy(k * t, d, w0)) - F(axpy(-k * t, d, w0))) for k in (0.5, 1.0)}
        fd = (8 * diff[0.5] - diff[1.0]) / (6 * t)
        analytic, ablated = dot(g, d), dot(g_ablated, d)
        tol = 4e-4 + 1e-3 * abs(analytic)
        assert abs(fd - analytic) <= tol, (i, fd, analytic)
        # the g2 term is not negligible here: the ablated direction misses the objective by far more
        assert abs(fd - ablated) > 5 * tol, (i, fd, analytic, ablated)


def test_perturbed_term_false_drops_g2(setup, fns):
    """The ablation's step is the optimizer on g3 + lam * g1, and matches the reference without its g2 term."""
    lam, alpha = 5.0, 0.1
    bc = BoosterConfig(lam=lam, alpha=alpha, perturbed_term=False)
    optimizer = make_optimizer(OPTIM)
    state = init_state(setup["lora"], optimizer)
    step = jax.jit(get_method("booster", "align").make_step(StepContext(setup["forward"], optimizer, bc)))
    b = fns.batch
    new, metrics = step(setup["params"], state, b, jax.random.key(0))

    _, g1 = fns.loss_grad(setup["lora"], b["harmful"])
    _, g3 = fns.loss_grad(setup["lora"], b["align"])
    expected = apply_gradients(state, axpy(lam, g1, g3), optimizer)
    assert max_diff(new.trainable, expected.trainable) <= 1e-6
    assert float(metrics["grad_norm"]) == pytest.approx(float(global_norm(axpy(lam, g1, g3))), rel=1e-5)
    _, full_metrics = fns.full(setup["lora"], b, lam, alpha)
    for k in ("loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm"):  # passes 1-3 unchanged
        assert float(metrics[k]) == pytest.approx(float(full_metrics[k]), rel=1e-6), k

    ref = TorchReference(copy.deepcopy(setup["peft_model"]), lr=OPTIM.lr, weight_decay=OPTIM.weight_decay,
                         max_grad_norm=OPTIM.max_grad_norm, lam=lam, alpha=alpha, perturbed_term=False)
    ref.booster_step(to_torch(b["align"]), to_torch(b["harmful"]))
    assert max_diff(new.trainable, lora_tree_from_peft(ref.model, setup["cfg"].num_layers)) <= PARITY_TOL


def test_perturbation_is_descent_on_h(fns):
    """w' = w - alpha * g1/||g1|| lowers h: h(w') < h(w), by ~alpha * ||g1|| for a small alpha."""
    _, m = fns.full(fns.w0, fns.batch, 5.0, 0.1)
    assert float(m["harmful_loss_perturbed"]) < float(m["harmful_loss"])
    _, m = fns.full(fns.w0, fns.batch, 5.0, 1e-2)
    drop = float(m["harmful_loss"]) - float(m["harmful_loss_perturbed"])
    assert drop == pytest.approx(1e-2 * float(m["harmful_grad_norm"]), rel=0.05)


def test_registry_is_keyed_by_stage():
    booster = get_method("booster", "align")
    assert booster.streams == ("align", "harmful") and booster.config_section == "booster"
    align = get_method("sft", "align")
    assert align.streams == ("align",) and align.make_step is make_sft_step  # default stream "align"
    finetune = get_method("sft", "finetune")
    assert finetune.streams == ("task",) and finetune.make_step.func is make_sft_step
    with pytest.raises(BoosterInputError, match="finetune method 'booster'"):
        get_method("booster", "finetune")
    with pytest.raises(BoosterInputError, match="unknown stage"):
        get_method("sft", "pretrain")
