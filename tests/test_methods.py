"""Vaccine, Booster + Vaccine, RepNoise and Lisa against PyTorch transcriptions of the official trainers.

Parity (float32, tiny LLaMA with GQA, PEFT LoRA r=8 on q,k,v, AdamW lr 1e-3, clipping 0.5): LoRA
weights after every step of a short run within 1e-5 of the reference (3 steps; Lisa 6 steps so that
both switches and the proximal warm-up happen), logged metrics within 1e-5 relative. RepNoise gets
bucketed batches with filler rows and a shared template prefix while the reference gets the official
collator's batches, so the emulation of the official masks is under test too.
Unit checks: rho = 0 Vaccine == SFT and Booster + Vaccine == Booster (1e-6); RepNoise with
alpha = beta = 0 and an all-ones mask == SFT with that mask as targets (1e-6); Lisa with rho = 0 and
no alignment phase == the reference's plain SFT step on the task data (1e-5); the official masks,
bf16 target rounding and MMD against the PyTorch transcriptions.
Every jitted function is compiled once (XLA CPU compiles dominate the file's time).
"""

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from booster_jax.config import LisaConfig, OptimConfig, RepNoiseConfig, VaccineConfig, load_config
from booster_jax.methods.base import StepContext, get_method, init_state, make_optimizer, method_config
from booster_jax.methods.booster_vaccine import BoosterVaccineSections, booster_vaccine_gradient
from booster_jax.methods.lisa import ALIGNMENT, init_lisa_extra, make_lisa_step, next_phase
from booster_jax.methods.repnoise import gaussian_noise, masked_token_ce, mmd, official_pair_mask, repnoise_loss
from booster_jax.methods.sft import lm_value_and_grad
from tests.hf_fixtures import peft_reference
from tests.torch_reference import lora_tree_from_peft, synthetic_batch, to_torch
from tests.torch_reference_methods import (LisaReference, MethodsReference, MMDLoss, adapt_dimension_b2a,
                                           masked_token_ce_loss, official_batch)

OPTIM = OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=0.5)
PARITY_TOL = 1e-5
# XLA's LLVM backend at -O0: half the compile time of these tiny programs, same float32 arithmetic
FAST = {"xla_backend_optimization_level": 0}


def jit(fn):
    return jax.jit(fn, compiler_options=FAST)
PAD = 1  # RepNoise batches: a non-zero pad id, so padding facing a real token is a (counted) target


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny reference models are latency-bound: torch's OpenMP threads only spin against other processes
    (3 steps take seconds of CPU with 2 threads on a busy host, ~0.1 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return peft_reference(tmp_path_factory)


def plain_batches(vocab, n=3):
    """Per step an alignment, a harmful and a task batch (pad id 0, prompts masked)."""
    out = []
    for s in range(n):
        out.append({"align": synthetic_batch(vocab, (12, 7, 9, 4), (5, 3, 6, 2), 12, seed=100 + s),
                    "harmful": synthetic_batch(vocab, (10, 12, 6, 8), (4, 6, 2, 5), 12, seed=200 + s),
                    "task": synthetic_batch(vocab, (9, 10, 5, 7), (3, 4, 2, 3), 10, seed=300 + s)})
    return out


def template_batch(vocab, lengths, width, rows, prefix=(5, 6, 7), seed=0):
    """Rows sharing an Alpaca-like prefix, right-padded with PAD to ``width``; rows beyond ``len(lengths)``
    up to ``rows`` are filler (all PAD, masks zero), as ``BatchStream`` pads a short last batch."""
    rng = np.random.default_rng(seed)
    ids = np.full((rows, width), PAD, np.int32)
    att = np.zeros((rows, width), np.int32)
    lm = np.zeros((rows, width), np.float32)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.concatenate([prefix, rng.integers(3, vocab, n - len(prefix))])
        att[i, :n] = 1
        lm[i, len(prefix) + 1:n] = 1.0
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm}


def repnoise_batches(vocab):
    """Harmful [4, 16] and alignment [4, 12] buckets; step 1 has an alignment filler row, step 2 a harmful one."""
    h_len = [(11, 7, 9, 5), (11, 7, 9, 5), (11, 7, 9)]
    a_len = [(8, 12, 6, 3), (8, 12, 6), (8, 10, 6, 3)]
    return [{"harmful": template_batch(vocab, h, 16, 4, seed=400 + s),
             "align": template_batch(vocab, a, 12, 4, seed=500 + s)} for s, (h, a) in enumerate(zip(h_len, a_len))]


def run_ours(setup, method, stage, section, batches, make_step=None):
    optimizer = make_optimizer(OPTIM)
    spec = get_method(method, stage)
    ctx = StepContext(setup.forward, optimizer, section)
    step = jit(make_step(ctx) if make_step else spec.make_step(ctx))
    extra = spec.init_extra(setup.lora, setup.params, section) if spec.init_extra else ()
    state = init_state(setup.lora, optimizer, extra)
    weights, history = [], []
    for i, b in enumerate(batches):
        state, metrics = step(setup.params, state, jax.tree.map(jnp.asarray, b), jax.random.key(i))
        weights.append(state.trainable)
        history.append({k: float(v) for k, v in metrics.items()})
    assert step._cache_size() == 1
    return weights, history


def reference(setup, cls=MethodsReference, **kw):
    return cls(copy.deepcopy(setup.peft_model), lr=OPTIM.lr, weight_decay=OPTIM.weight_decay,
               betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps, max_grad_norm=OPTIM.max_grad_norm, **kw)


def max_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(la, lb))


def assert_close(setup, ours, theirs, ref_model_weights):
    (weights, hist), ref_hist = ours, theirs
    for i, (w, r) in enumerate(zip(weights, ref_model_weights)):
        assert max_diff(w, r) <= PARITY_TOL, i
    for o, t in zip(hist, ref_hist):
        for k, v in t.items():
            assert o[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    moved = max_diff(weights[-1], setup.lora)
    assert moved > 1e-3  # the run is not vacuous


def torch_run(setup, ref, steps):
    """Apply ``steps`` (callables ref -> metrics) and return (per-step LoRA trees, metrics)."""
    weights, hist = [], []
    for fn in steps:
        hist.append(fn(ref))
        weights.append(lora_tree_from_peft(ref.model, setup.cfg.num_layers))
    return weights, hist


# ----------------------------------------------------------------------------------------- parity

def test_vaccine_matches_official(setup):
    bs = plain_batches(setup.vocab)
    ours = run_ours(setup, "vaccine", "align", VaccineConfig(rho=2.0), bs)
    ref = reference(setup, rho=2.0)
    w, h = torch_run(setup, ref, [lambda r, b=b: r.vaccine_step(to_torch(b["align"])) for b in bs])
    assert_close(setup, ours, h, w)
    assert all(x["loss"] > x["loss_unperturbed"] for x in ours[1])  # the perturbation is adversarial


def test_booster_vaccine_matches_official(setup):
    bs = plain_batches(setup.vocab)
    section = method_config(get_method("booster_vaccine", "align"),  # what the stage passes
                            load_config(None, ["align.vaccine.rho=2.0"]).align)
    ours = run_ours(setup, "booster_vaccine", "align", section, bs)
    ref = reference(setup, rho=2.0, lam=5.0, alpha=0.1)
    w, h = torch_run(setup, ref, [lambda r, b=b: r.booster_vaccine_step(to_torch(b["align"]), to_torch(b["harmful"]))
                                  for b in bs])
    assert_close(setup, ours, h, w)
    assert max(x["grad_norm"] for x in ours[1]) > OPTIM.max_grad_norm


def test_repnoise_matches_official(setup):
    bs = repnoise_batches(setup.vocab)
    cfg = RepNoiseConfig(alpha=0.5, beta=0.5)  # large enough that every term moves the weights
    ours = run_ours(setup, "repnoise", "align", cfg, bs)
    ref = reference(setup)
    steps = []
    for i, b in enumerate(bs):
        harmful = official_batch(b["harmful"], PAD)
        rows, width = harmful["input_ids"].shape
        noise = gaussian_noise(jax.random.key(i), (setup.cfg.num_layers, 4, 16, setup.cfg.hidden_size))
        noise = [torch.as_tensor(np.asarray(n)[:rows, :width]) for n in noise]
        steps.append(lambda r, h=harmful, a=official_batch(b["align"], PAD), n=noise: r.repnoise_step(
            h, a, n, alpha=cfg.alpha, beta=cfg.beta))
    w, h = torch_run(setup, ref, steps)
    assert_close(setup, ours, h, w)
    assert all(x["noise_loss"] > 1e-3 for x in ours[1])


def test_lisa_matches_official(setup):
    """A=2, F=2, 6 steps: align, align, finetune (switch), finetune, align (switch), align; the proximal
    term (rho 0.5) is on once steps > 0.1 * 30, i.e. at steps 4 and 5 only (at the switch step 4 the
    anchor is the current weights, so it acts at step 5)."""
    bs = plain_batches(setup.vocab, 6)
    cfg = LisaConfig(rho=0.5, align_steps=2, finetune_steps=2, proximal_warmup=0.1)
    ours = run_ours(setup, "lisa", "finetune", cfg, bs,
                    make_step=lambda ctx: make_lisa_step(ctx, total_steps=30))
    ref = reference(setup, cls=LisaReference, rho=0.5, alignment_step=2, finetune_step=2, total_steps=30,
                    alignment_batch=lambda s: to_torch(bs[s]["align"]))
    w, h = torch_run(setup, ref, [lambda r, b=b: r.lisa_step(to_torch(b["task"])) for b in bs])
    assert_close(setup, ours, h, w)
    assert [x["phase"] for x in ours[1]] == [1, 1, 0, 0, 1, 1]
    assert [x["proximal"] > 0 for x in ours[1]] == [False] * 5 + [True]
    assert ours[1][3]["drift"] > 0  # the warm-up really switched a non-zero term off


# ------------------------------------------------------------------------------------- unit checks

@pytest.fixture(scope="module")
def grads(setup):
    """Jitted gradient functions with traced coefficients (one compile each, shared by the checks)."""
    fwd, params = setup.forward, setup.params
    sft = jit(lambda w, b: lm_value_and_grad(fwd)(w, params, b, None))

    def bv(w, bs, lam, alpha, rho):  # lam = 0: Vaccine's gradient alone
        sec = BoosterVaccineSections(types.SimpleNamespace(lam=lam, alpha=alpha, eps=1e-7, perturbed_term=True),
                                     types.SimpleNamespace(rho=rho))
        return booster_vaccine_gradient(fwd, sec, w, params, bs)

    def rn(w, bs, alpha, beta, rng):
        cfg = types.SimpleNamespace(alpha=alpha, beta=beta, bf16_label_rounding=True)
        return jax.value_and_grad(lambda v: repnoise_loss(fwd, cfg, v, params, bs, rng), has_aux=True)(w)

    leaves, tree = jax.tree.flatten(setup.lora)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    w0 = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return types.SimpleNamespace(sft=sft, bv=jit(bv), rn=jit(rn), w0=w0,
                                 batch=jax.tree.map(jnp.asarray, plain_batches(setup.vocab, 1)[0]))


def axpy(a, x, y):
    return jax.tree.map(lambda u, v: a * u + v, x, y)


def test_vaccine_rho_zero_is_sft(grads):
    g, m = grads.bv(grads.w0, grads.batch, 0.0, 0.1, 0.0)
    loss, g_sft = grads.sft(grads.w0, grads.batch["align"])
    assert max_diff(g, g_sft) <= 1e-6
    assert float(m["loss"]) == pytest.approx(float(loss), abs=1e-7)
    # a small rho raises f by ~ rho * ||g_attn|| (first order): eps points up the gradient
    _, m = grads.bv(grads.w0, grads.batch, 0.0, 0.1, 1e-3)
    rise = float(m["loss"] - m["loss_unperturbed"])
    assert rise == pytest.approx(1e-3 * float(m["attn_grad_norm"]), rel=0.05)


def test_booster_vaccine_rho_zero_is_booster(grads):
    """rho = 0: g3 + lam * g1 - lam * g2 with plain gradients (Booster), the pieces from the SFT gradient."""
    lam, alpha, b, w0 = 5.0, 0.1, grads.batch, grads.w0
    g, m = grads.bv(w0, b, lam, alpha, 0.0)
    h, g1 = grads.sft(w0, b["harmful"])
    n1 = float(np.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(g1))))
    _, g2 = grads.sft(axpy(-alpha / (n1 + 1e-7), g1, w0), b["harmful"])
    f, g3 = grads.sft(w0, b["align"])
    assert max_diff(g, axpy(-lam, g2, axpy(lam, g1, g3))) <= 1e-6
    assert float(m["harmful_loss"]) == pytest.approx(float(h), rel=1e-6)
    assert float(m["harmful_grad_norm"]) == pytest.approx(n1, rel=1e-5)
    g_rho, _ = grads.bv(w0, b, lam, alpha, 2.0)
    assert max_diff(g_rho, g) > 1e-3  # rho does change the direction


def test_repnoise_without_its_terms_is_sft_on_its_mask(setup, grads):
    """alpha = beta = 0 leaves the masked CE on the alignment batch; with a harmful batch that differs at every
    position (so the official mask is all ones) that is SFT with every next token as a target."""
    align = synthetic_batch(setup.vocab, (12, 12, 12, 12), (0, 0, 0, 0), 12, seed=1)
    harmful = {k: v.copy() for k, v in align.items()}
    harmful["input_ids"] = 3 + (align["input_ids"] - 3 + 1) % (setup.vocab - 3)  # differs everywhere, no 0
    bs = {"align": jax.tree.map(jnp.asarray, align), "harmful": jax.tree.map(jnp.asarray, harmful)}
    assert bool(official_pair_mask(bs["align"], bs["harmful"]).all())
    (loss, m), g = grads.rn(grads.w0, bs, 0.0, 0.0, jax.random.key(0))
    sft_batch = dict(bs["align"], loss_mask=jnp.ones_like(bs["align"]["loss_mask"]))
    loss_sft, g_sft = grads.sft(grads.w0, sft_batch)
    assert float(loss) == pytest.approx(float(loss_sft), rel=1e-6)
    assert max_diff(g, g_sft) <= 1e-6
    (_, m), g_full = grads.rn(grads.w0, bs, 0.1, 0.001, jax.random.key(0))
    assert max_diff(g_full, g_sft) > 1e-4 and float(m["harmful_losses"]) > 1.0


def test_official_pair_mask_and_targets():
    """Shared prefix, PAD facing PAD (0) and facing a real token or a zero pad (1), truncation to the official
    widths, filler rows; then the bf16-rounded targets of the official CE."""
    a = template_batch(50, (6, 4), 8, 3)  # official: 2 rows, width 6 (row 2 is filler)
    b = template_batch(50, (7, 3), 8, 2, seed=1)  # official: 2 rows, width 7
    m_ab, m_ba = np.asarray(official_pair_mask(a, b)), np.asarray(official_pair_mask(b, a))
    assert m_ab.astype(int).tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0], [0] * 8]
    assert m_ba.astype(int).tolist() == [[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0, 1, 0]]
    for x, y, m in ((a, b, m_ab), (b, a, m_ba)):
        xo, yo = official_batch(x, PAD)["input_ids"], official_batch(y, PAD)["input_ids"]
        official = ~torch.eq(xo, adapt_dimension_b2a(xo, yo))
        rows, width = official.shape
        assert (m[:rows, :width] == official.numpy()).all() and not m[rows:].any() and not m[:, width:].any()
    # bf16 target rounding: ids above 256 are rounded exactly as ids * bfloat16(mask) in torch
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 1021, (2, 7)).astype(np.int32)
    ids[0, 2] = 0  # an id 0 target is ignored
    logits = rng.normal(size=(2, 7, 1024)).astype(np.float32)
    mask = rng.random((2, 7)) > 0.2
    ref = masked_token_ce_loss(torch.as_tensor(logits), torch.as_tensor(ids).long(),
                               torch.as_tensor(mask).to(torch.bfloat16))
    ours = masked_token_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), bf16_labels=True)
    exact = masked_token_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), bf16_labels=False)
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)
    assert abs(float(exact) - float(ref)) > 1e-3  # the rounding matters at this vocabulary size
    ref_exact = masked_token_ce_loss(torch.as_tensor(logits), torch.as_tensor(ids).long(), torch.as_tensor(mask))
    assert float(exact) == pytest.approx(float(ref_exact), rel=1e-6)


def test_mmd_matches_official():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 40)).astype(np.float32) * 0.5 + 0.3
    y = rng.normal(size=(5, 40)).astype(np.float32)
    ref = float(MMDLoss()(torch.as_tensor(x), torch.as_tensor(y)))
    assert float(mmd(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(ref, rel=1e-5)
    assert abs(float(mmd(jnp.asarray(x), jnp.asarray(x)))) < 1e-6
    # filler rows are left out: the MMD of the real rows alone
    rows = jnp.asarray([True, True, True, False, False])
    sub = float(MMDLoss()(torch.as_tensor(x[:3]), torch.as_tensor(y[:3])))
    assert float(mmd(jnp.asarray(x), jnp.asarray(y), rows)) == pytest.approx(sub, rel=1e-5)


def test_lisa_task_phase_only_is_sft(setup):
    """rho = 0 and no alignment phase: the official ADMMTrainer is a plain Trainer on the user data."""
    bs = plain_batches(setup.vocab)
    lisa = run_ours(setup, "lisa", "finetune", LisaConfig(rho=0.0, align_steps=0, finetune_steps=900), bs)
    ref = reference(setup)
    w, h = torch_run(setup, ref, [lambda r, b=b: r.sft_step(to_torch(b["task"])) for b in bs])
    assert_close(setup, lisa, h, w)
    assert [x["phase"] for x in lisa[1]] == [0, 0, 0]


def test_lisa_schedule_matches_check_mode():
    """The jit-side switch rule against the official check_mode (status / clock / steps), A=3, F=2."""
    phase, clock, seen = jnp.int32(ALIGNMENT), jnp.int32(0), []
    status, ref_clock, ref = "alignment", 0, []
    for steps in range(13):
        phase, clock, _ = next_phase(phase, clock, jnp.int32(steps), 3, 2)
        seen.append(int(phase))
        clock = clock + 1
        n = 3 if status == "alignment" else 2
        if ref_clock % n == 0 and steps != 0:
            status, ref_clock = ("finetune" if status == "alignment" else "alignment"), 0
        ref.append(int(status == "alignment"))
        ref_clock += 1
    assert seen == ref == [1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    extra = init_lisa_extra({"w": jnp.ones(2)}, None, LisaConfig(align_steps=0))
    assert int(extra["phase"]) == 0


def test_registry():
    assert get_method("vaccine", "align").streams == ("align",)
    assert get_method("booster_vaccine", "align").config_section == ("booster", "vaccine")
    assert get_method("repnoise", "align").streams == ("align", "harmful")
    lisa = get_method("lisa", "finetune")
    assert lisa.streams == ("task", "align") and lisa.config_section == "lisa" and lisa.init_extra is not None
    cfg = load_config(None, ["align.method=booster_vaccine", "align.booster.lam=3", "align.vaccine.rho=4"])
    sec = method_config(get_method("booster_vaccine", "align"), cfg.align)
    assert sec.booster.lam == 3.0 and sec.vaccine.rho == 4.0
