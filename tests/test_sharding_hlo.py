"""Activation sharding is declared in the model and checked through XLA's HLO, not through values.

A worker subprocess with 8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
as tests/test_parallel.py) compiles the Booster and SFT steps of the tiny mesh-test model on the four
test meshes and reports:

* the sharding annotations of the lowered step (``with_sharding_constraint`` ->
  ``sdy.sharding_constraint``): the MLP's gate/up outputs [B, T, F] carry batch over ("data", "fsdp") and F over
  "tensor"; renaming the projection class (the old interceptor matched class names) changes nothing;
* the per-device shape of that activation in the compiled (partitioned) HLO: rows / batch shards and
  F / tensor;
* XLA's log: no ``[SPMD] Involuntary full rematerialization`` while compiling any step on any mesh.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.test_parallel import MESHES, _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, LENGTH = 8, 16


def _steps():
    import jax

    from booster_jax.config import BoosterConfig, OptimConfig
    from booster_jax.methods.base import Forward, StepContext, get_method, init_state, make_optimizer
    from booster_jax.models.llama import init_params, make_model
    from booster_jax.models.lora import init_lora
    from tests.test_parallel import _tiny

    cfg, spec, _ = _tiny()
    model = make_model(cfg, spec)
    optimizer = make_optimizer(OptimConfig())
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    lora = jax.eval_shape(lambda: init_lora(jax.random.key(0), cfg, spec))
    state = jax.eval_shape(lambda: init_state(lora, optimizer))
    fwd = Forward(model)
    return cfg, params, state, {
        "booster": (get_method("booster", "align").make_step(StepContext(fwd, optimizer, BoosterConfig())),
                    ("align", "harmful")),
        "sft": (get_method("sft", "finetune").make_step(StepContext(fwd, optimizer)), ("task",))}


def _lower(mesh, params, state, step, streams):
    import jax
    import jax.numpy as jnp

    from booster_jax import parallel

    kw = parallel.step_jit_kwargs(mesh, params, state)
    bs = parallel.batch_sharding(mesh)

    def abstract(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    b = {k: jax.ShapeDtypeStruct((ROWS, LENGTH), dt, sharding=bs)
         for k, dt in (("input_ids", jnp.int32), ("attention_mask", jnp.int32), ("loss_mask", jnp.float32))}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    return jax.jit(parallel.shard_activations(step, mesh), **kw).lower(
        abstract(params, kw["in_shardings"][0]), abstract(state, kw["in_shardings"][1]),
        {s: b for s in streams}, key)


def worker(out_path: str) -> None:
    """Lower and compile every step on every mesh; write the facts the tests check as JSON."""
    from types import SimpleNamespace

    from booster_jax import parallel
    from booster_jax.models import llama

    cfg, params, state, steps = _steps()
    facts = {}
    for shape in MESHES:
        mesh = parallel.make_mesh(SimpleNamespace(data=shape[0], fsdp=shape[1], tensor=shape[2]))
        for name, (step, streams) in steps.items():
            lowered = _lower(mesh, params, state, step, streams)
            text = lowered.as_text()
            compiled = lowered.compile().as_text()
            facts[f"{'x'.join(map(str, shape))}/{name}"] = {
                "shardings": sorted(set(re.findall(r"sdy.sharding_constraint %\S+ (<[^>]*> : tensor<[^>]*>)", text))),
                "n_constraints": text.count("sdy.sharding_constraint"), "compiled": compiled}
    mesh = parallel.make_mesh(SimpleNamespace(data=2, fsdp=2, tensor=2))
    step, streams = steps["booster"]
    llama.LoraDense.__name__ = llama.LoraDense.__qualname__ = "RenamedDense"  # the old interceptor's key
    facts["renamed"] = _lower(mesh, params, state, step, streams).as_text().count("sdy.sharding_constraint")
    with open(out_path, "w") as f:
        json.dump(facts, f)


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hlo") / "facts.json")
    p = subprocess.run([sys.executable, "-m", "tests.test_sharding_hlo", out], cwd=ROOT, env=_env(8),
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out) as f:
        return json.load(f), p.stderr


def test_no_involuntary_full_rematerialization_on_the_test_meshes(facts):
    _, log = facts
    assert "Involuntary full rematerialization" not in log, log[-3000:]


@pytest.mark.parametrize("shape", ["x".join(map(str, s)) for s in MESHES])
def test_mlp_activation_is_sharded_as_declared(facts, shape):
    f, _ = facts
    data, fsdp, tensor = map(int, shape.split("x"))
    cfg_f = 64  # the tiny model's intermediate size
    for name in ("booster", "sft"):
        entry = f[f"{shape}/{name}"]
        assert entry["n_constraints"] > 0
        # per-device [rows / batch shards, T, F / tensor] of the gate/up projections in the partitioned HLO
        local = f"f32[{ROWS // (data * fsdp)},{LENGTH},{cfg_f // tensor}]"
        assert local in entry["compiled"], (shape, name, local)
        want = f'<@mesh, [{{"data", "fsdp"}}, {{}}, {{"tensor"}}]> : tensor<{ROWS}x{LENGTH}x{cfg_f}xf32>'
        assert want in entry["shardings"], entry["shardings"]


def test_renaming_a_module_keeps_every_constraint(facts):
    f, _ = facts
    assert f["renamed"] == f["2x2x2/booster"]["n_constraints"] > 0


if __name__ == "__main__":
    worker(sys.argv[1])
