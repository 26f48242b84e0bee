"""The worked example of docs/extending.md: a defense from its own file (examples/per_tensor_booster.py),
run through run.py end to end on the smoke setting, one step checked against a hand-computed update,
and an edit of the file rerunning its own stages and nothing else."""

import json
import math
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import booster_jax as bj
import run as cli
from booster_jax import plugins
from booster_jax.config import OptimConfig, load_config
from booster_jax.models.llama import LlamaConfig, init_params, make_model
from booster_jax.train.pretrain import PretrainRecipe, pretrain_base
from tests.plugin_registry import isolated_registry  # noqa: F401  (fixture)
from tests.torch_reference import synthetic_batch

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLE = os.path.join(ROOT, "examples", "per_tensor_booster.py")
SMOKE = os.path.join(ROOT, "configs", "synthetic", "smoke.yaml")
TINY = PretrainRecipe(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, steps=4,
                      batch_size=8, warmup_steps=1)


def test_the_example_is_short_and_uses_only_the_public_api():
    source = open(EXAMPLE).read()
    assert len(source.splitlines()) <= 80
    imports = [l for l in source.splitlines() if l.startswith(("import ", "from "))]
    assert imports == ["import dataclasses", "import math", "import jax", "import jax.numpy as jnp",
                       "import booster_jax as bj"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A world and a 4-step base model pre-trained on it (as tests/test_pipeline.py)."""
    root = tmp_path_factory.mktemp("world")
    pretrain_base(load_config(SMOKE, [f"world.dir={root}", f"run.output_dir={root}/pre"]), TINY, progress=False)
    return str(root)


def done_stamps(out) -> dict:
    return {str(p.relative_to(out)): os.path.getmtime(p) for p in out.glob("*/*/DONE")} | {
        str(p.relative_to(out)): os.path.getmtime(p) for p in out.glob("eval/*/summary.json")}


def test_the_example_runs_end_to_end_and_an_edit_reruns_only_its_stages(world, tmp_path, isolated_registry, capsys):
    examples = tmp_path / "examples"  # a copy, so the test can edit the defense
    shutil.copytree(os.path.join(ROOT, "examples"), examples)
    os.symlink(os.path.abspath(os.path.join(ROOT, "configs")), tmp_path / "configs")
    out = tmp_path / "run"
    args = [str(examples / "per_tensor_booster_smoke.yaml"), f"world.dir={world}", f"run.output_dir={out}",
            "--no-progress"]
    assert cli.main(args) == 0
    assert "| per_tensor_booster |" in capsys.readouterr().out
    runs = json.load(open(out / "summaries.json"))["runs"]
    assert {(r["method"], r["harmful_ratio"]) for r in runs} == {("sft", 0.1), ("booster", 0.1),
                                                                 ("per_tensor_booster", 0.1)}
    align_dirs = {m: only(d) for m, d in aligned_by_method(out).items()}
    rows = [json.loads(l) for l in open(align_dirs["per_tensor_booster"] / "metrics.jsonl")]
    assert any(r.get("harmful_loss_perturbed", 0) > 0 for r in rows)  # the plugin's own metrics reach the log

    before = done_stamps(out)
    assert len([k for k in before if k.endswith("DONE")]) == 6  # three alignments, three attacks
    with open(examples / "per_tensor_booster.py", "a") as f:
        f.write("# an edit of the defense\n")
    assert cli.main(args) == 0
    after = done_stamps(out)
    new_align = aligned_by_method(out)
    # the defense's alignment has a new fingerprint (a new stage directory beside the old one, which is kept);
    # the others are the same ones
    assert new_align["per_tensor_booster"] == {align_dirs["per_tensor_booster"], *new_align["per_tensor_booster"]}
    assert len(new_align["per_tensor_booster"]) == 2
    assert {m: only(d) for m, d in new_align.items() if m != "per_tensor_booster"} == \
        {m: d for m, d in align_dirs.items() if m != "per_tensor_booster"}
    rerun = sorted(k for k in before if after.get(k) != before[k])
    assert "finetune/per_tensor_booster-s0-p0.1/DONE" in rerun and "eval/per_tensor_booster-s0-p0.1/summary.json" in rerun
    assert all("per_tensor_booster" in k or k.startswith(f"align/{align_dirs['per_tensor_booster'].name}")
               for k in rerun), rerun  # SFT's and Booster's stages and evaluations were reused


def aligned_by_method(out) -> dict:
    """align.method -> the set of its alignment stage directories (named by fingerprint; an edited defense
    adds one beside the old one, and glob order says nothing about which is newer)."""
    found: dict = {}
    for meta in out.glob("align/*/final/meta.json"):
        found.setdefault(json.load(open(meta))["config"]["align"]["method"], set()).add(meta.parent.parent)
    return found


def only(dirs: set):
    assert len(dirs) == 1, dirs
    return next(iter(dirs))


def tiny_setup():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    spec = bj.LoraSpec(r=4, alpha=8.0, targets=("q_proj", "v_proj"))
    model = make_model(cfg, spec)
    params = init_params(model, jax.random.key(0))
    lora = bj.init_lora(jax.random.key(1), cfg, spec)  # B = 0 as PEFT; make it non-zero so every tensor moves
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), lora)
    batches = {"align": synthetic_batch(64, (12, 7, 9, 4), (5, 3, 6, 2), 12, seed=1),
               "harmful": synthetic_batch(64, (10, 12, 6, 8), (4, 6, 2, 5), 12, seed=2)}
    return bj.Forward(model), params, lora, {k: {n: jax.numpy.asarray(a) for n, a in b.items()}
                                             for k, b in batches.items()}


def test_one_step_equals_a_hand_computed_update(isolated_registry):
    assert plugins.load([EXAMPLE]) == []
    spec = bj.get_method("per_tensor_booster", "align")
    example = sys.modules[spec.make_step.__module__]
    forward, params, lora, batches = tiny_setup()
    section = example.PerTensorBoosterConfig(lam=5.0, alpha=0.1)
    optim = OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=0.0)  # no clipping: AdamW's first step by hand
    optimizer = bj.make_optimizer(optim, 10)
    step = jax.jit(spec.make_step(bj.StepContext(forward, optimizer, section)))
    state, metrics = step(params, bj.init_state(lora, optimizer), batches, jax.random.key(3))

    grad = jax.grad(lambda w, b: bj.lm_loss(forward(w, params, b), b))
    leaves, tree = jax.tree.flatten(lora)
    w = [np.asarray(x, np.float64) for x in leaves]
    g1 = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad(lora, batches["harmful"]))]
    n = len(w)
    shifted = [wi - 0.1 / math.sqrt(n) * gi / (np.linalg.norm(gi) + 1e-7) for wi, gi in zip(w, g1)]
    delta = [a - b for a, b in zip(w, shifted)]
    assert math.isclose(math.sqrt(sum(np.sum(d ** 2) for d in delta)), 0.1, rel_tol=1e-3)  # total norm alpha (eps aside)
    assert all(math.isclose(np.linalg.norm(d), 0.1 / math.sqrt(n), rel_tol=1e-3) for d in delta)  # alike per tensor
    w_shifted = jax.tree.unflatten(tree, [np.float32(x) for x in shifted])
    g2 = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad(w_shifted, batches["harmful"]))]
    g3 = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad(lora, batches["align"]))]
    g = [c + 5.0 * (a - b) for a, b, c in zip(g1, g2, g3)]
    # AdamW's first step: m_hat = g, v_hat = g^2, so the update is lr * (g / (|g| + eps) + wd * w)
    expected = [wi - 1e-3 * (gi / (np.abs(gi) + 1e-8) + 0.1 * wi) for wi, gi in zip(w, g)]
    for got, want in zip(jax.tree.leaves(state.trainable), expected):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    assert math.isclose(float(metrics["grad_norm"]), math.sqrt(sum(np.sum(x ** 2) for x in g)), rel_tol=1e-4)
    assert float(metrics["harmful_loss_perturbed"]) != float(metrics["harmful_loss"])
    assert int(state.step) == 1
