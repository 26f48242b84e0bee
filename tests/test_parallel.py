"""Scale-out: sharding rules, meshes of 8 simulated CPU devices, checkpoints across meshes, two processes.

Every multi-device case runs in a subprocess that sets ``XLA_FLAGS=--xla_force_host_platform_device_count``
before importing jax (this file is also the worker: ``python -m tests.test_parallel WORKER ...``), so
the other test files in the same pytest process keep their single device.

What is checked (tiny Llama, float32, hidden 32 / 4 heads / mlp 64 / vocab 64 so every rule really
shards; LoRA r 4 on q,k,v,o,down; Booster steps through ``run_stage`` with the stages' wiring:
``step_jit_kwargs`` + ``batch_placer``):

* meshes (8,1,1), (2,4,1), (1,2,4), (2,2,2) give the LoRA weights of one device within 1e-5 after
  3 Booster steps (batch 6, padded to the batch shards with zero-mask rows);
* a checkpoint saved on the 8-device mesh restores on a 2-device mesh and on one device with
  identical values, and training continues from it to the uninterrupted result;
* two processes on 127.0.0.1 (gloo, 4 CPU devices each, mesh (2,4,1)) agree with one process;
* ``benchmarks/gpu_steps.py --tiny`` runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
STEPS = 3
MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2)]


# ============================================================================ in-process (1 device)

def test_rules_give_every_parameter_a_spec():
    import jax
    from jax.sharding import PartitionSpec as P

    from booster_jax import parallel
    from booster_jax.models.llama import LlamaConfig, LoraSpec, init_params, make_model
    from booster_jax.models.lora import init_lora

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=8, qkv_bias=True)
    sizes = {"data": 2, "fsdp": 2, "tensor": 4}
    params = jax.eval_shape(lambda: init_params(make_model(cfg), jax.random.key(0)))
    specs = parallel.tree_specs(params, sizes)
    L = specs["layers"]
    assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    assert specs["norm"]["scale"] == P()
    assert L["input_layernorm"]["scale"] == P()
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert L["self_attn"][proj]["kernel"] == P(None, "fsdp", "tensor")
        assert L["self_attn"][proj]["bias"] == P(None, "tensor")
    assert L["self_attn"]["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert L["mlp"]["gate_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert L["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    spec = LoraSpec(r=4, targets=("q_proj", "o_proj", "down_proj"))
    lora = jax.eval_shape(lambda: init_lora(jax.random.key(0), cfg, spec))
    ls = parallel.tree_specs(lora, sizes)["layers"]
    assert ls["self_attn"]["q_proj"] == {"a": P(None, "fsdp"), "b": P(None, None, "tensor")}
    assert ls["self_attn"]["o_proj"] == {"a": P(None, "tensor"), "b": P(None, None, "fsdp")}
    assert ls["mlp"]["down_proj"] == {"a": P(None, "tensor"), "b": P(None, None, "fsdp")}
    # not divisible -> replicated on that dimension only (vocab 65 on tensor=4)
    odd = jax.eval_shape(lambda: init_params(make_model(cfg.replace(vocab_size=65)), jax.random.key(0)))
    assert parallel.tree_specs(odd, sizes)["embed_tokens"]["embedding"] == P(None, "fsdp")
    # optimizer state mirrors the LoRA tree (found by key path), the count is replicated
    import optax

    opt = jax.eval_shape(optax.adamw(1e-3).init, lora)
    mu = parallel.tree_specs(opt, sizes)[0].mu
    assert mu["layers"]["self_attn"]["o_proj"]["a"] == P(None, "tensor")
    assert parallel.tree_specs(opt, sizes)[0].count == P()


def test_mesh_shapes_and_errors():
    from booster_jax import parallel
    from booster_jax.config import MeshConfig
    from booster_jax.errors import BoosterInputError

    assert parallel.mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert parallel.mesh_shape(MeshConfig(fsdp=4), 8) == (2, 4, 1)
    assert parallel.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(BoosterInputError, match="do not divide"):
        parallel.mesh_shape(MeshConfig(fsdp=3), 8)
    with pytest.raises(BoosterInputError, match="must equal"):
        parallel.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    mesh = parallel.make_mesh(MeshConfig())  # the one local device
    assert mesh.axis_names == ("data", "fsdp", "tensor")


def test_plan_tiny_runs(capsys):
    """The planner: eval_shape sizes for a known id (no weights anywhere) and a hypothetical mesh."""
    from booster_jax import plan
    from booster_jax.config import load_config

    cfg = load_config(None, ["model.path=meta-llama/Llama-2-7b-hf", "mesh.fsdp=8", "plan.devices=8",
                             "plan.device_memory_gb=16", "plan.compile=false"])
    report = plan.make_plan(cfg)
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert 6.5e9 < report["n_params"] < 6.8e9
    # bf16 base split 8 ways: ~1.7 GB a device
    assert 1.5e9 < report["per_device"]["base_params"] < 1.8e9
    plan.print_plan(cfg)
    assert "fits" in capsys.readouterr().out


# ============================================================================ subprocess workers

def _tiny():
    import jax

    from booster_jax.models.llama import LlamaConfig, LoraSpec

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=8)
    spec = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    return cfg, spec, jax


def _items(n, seed, vocab):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        length = rs.randint(5, 16)
        ids = rs.randint(1, vocab, size=length).astype(np.int32)
        mask = np.zeros(length, np.float32)
        mask[length // 2:] = 1.0
        out.append((ids, mask))
    return out


_BUILT: dict = {}


def _build():
    """(frozen, state, step_fn, streams factory) of a tiny Booster stage, identical on every call.

    The step function is built once per process so that runs on the same mesh share its compilation.
    """
    import jax

    if "built" not in _BUILT:
        _BUILT["built"] = _build_once()
    frozen, state, step_fn, streams = _BUILT["built"]
    fresh = jax.tree.map(lambda x: jax.numpy.array(np.asarray(x)), state)  # the loop donates its state
    return frozen, fresh, step_fn, streams


def _build_once():
    import jax

    from booster_jax.config import BoosterConfig, OptimConfig
    from booster_jax.data.batches import BatchStream
    from booster_jax.methods.base import Forward, StepContext, get_method, init_state, make_optimizer
    from booster_jax.models.llama import init_params, make_model
    from booster_jax.models.lora import init_lora

    cfg, spec, _ = _tiny()
    model = make_model(cfg, spec)
    # numpy draws on the eval_shape shapes: no init compilation (seconds on a loaded CPU)
    rs = np.random.RandomState(0)

    def draw(path, x):
        if str(path[-1]) == "['scale']":
            return np.ones(x.shape, np.float32)
        return (0.1 * rs.standard_normal(x.shape)).astype(np.float32)  # B != 0: the steps are not trivial

    frozen = jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
    lora = jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: init_lora(jax.random.key(1), cfg, spec)))
    optimizer = make_optimizer(OptimConfig(lr=5e-3, weight_decay=0.1, max_grad_norm=0.5))
    state = init_state(lora, optimizer)
    step_fn = get_method("booster", "align").make_step(
        StepContext(Forward(model), optimizer, BoosterConfig(lam=5.0, alpha=0.1)))

    def streams():
        return {"align": BatchStream(_items(30, 1, cfg.vocab_size), 6, seed=3, pad_id=0, buckets=(16,)),
                "harmful": BatchStream(_items(20, 2, cfg.vocab_size), 6, seed=4, pad_id=0, buckets=(16,),
                                       infinite=True)}

    return frozen, jax.tree.map(np.asarray, state), step_fn, streams


def _run(mesh, store_dir, steps, checkpoint_every=0, state=None):
    """``steps`` Booster steps through run_stage on ``mesh`` (wired as the stages do) -> final state."""
    import jax

    from booster_jax import parallel
    from booster_jax.config import RunConfig
    from booster_jax.train.checkpoint import StageStore
    from booster_jax.train.loop import Reporting, StepProgram, run_stage

    frozen, state0, step_fn, streams = _build()
    state = state0 if state is None else state
    frozen, state = parallel.place(frozen, mesh), parallel.place(state, mesh)
    run_cfg = dataclasses.replace(RunConfig(), checkpoint_every=checkpoint_every, keep_last=3, log_every=1)
    store = StageStore.from_run_config(store_dir, run_cfg, fingerprint="par")
    program = StepProgram(parallel.shard_activations(step_fn, mesh), parallel.step_jit_kwargs(mesh, frozen, state),
                          parallel.batch_placer(mesh))
    state, _ = run_stage(name="par", store=store, program=program, frozen=frozen, state=state, streams=streams(),
                         total_steps=steps, rng=jax.random.key(5), report=Reporting.for_run(run_cfg, progress=False))
    store.close()
    return state


_JITTED: dict = {}


def _direct(mesh, steps):
    """The same steps as ``_run`` without run_stage (no checkpoint I/O): the loop's RNG handling, the
    stages' shardings (``step_jit_kwargs``) and batch placement (``shard_batch``)."""
    import jax

    from booster_jax import parallel

    frozen, state, step_fn, streams = _build()
    frozen, state = parallel.place(frozen, mesh), parallel.place(state, mesh)
    key = tuple(mesh.devices.shape) + tuple(d.id for d in mesh.devices.flat)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(parallel.shard_activations(step_fn, mesh), donate_argnums=(1,),
                               **parallel.step_jit_kwargs(mesh, frozen, state))
    jitted, ss, rng = _JITTED[key], streams(), jax.random.key(5)
    for _ in range(steps):
        rng, step_rng = jax.random.split(rng)
        batches = parallel.shard_batch({k: s.next_batch() for k, s in ss.items()}, mesh)
        state, _ = jitted(frozen, state, batches, step_rng)
    return state


def _host(tree):
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _maxdiff(a, b):
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def worker_meshes(out_dir):
    """Single process, 8 devices: the mesh comparisons and the checkpoint round trip."""
    import jax

    from booster_jax import parallel
    from booster_jax.config import MeshConfig
    from booster_jax.train.checkpoint import StageStore

    t0 = time.time()
    devs = jax.devices()
    assert len(devs) == 8, devs
    one = parallel.make_mesh(MeshConfig(), devices=devs[:1])
    ref_state = _direct(one, STEPS)
    ref = _host(ref_state.trainable)
    np.savez(os.path.join(out_dir, "ref.npz"), *ref)
    res = {"meshes": {}, "times": {"ref": time.time() - t0}}
    ck = os.path.join(out_dir, "ckpt")  # the (1,2,4) run saves the checkpoint the restores read
    for shape in MESHES:
        t1 = time.time()
        mesh = parallel.make_mesh(MeshConfig(*shape))
        saves = shape == (1, 2, 4)
        # through run_stage (and its Orbax save) once; the other meshes step directly (no checkpoint I/O)
        st = _run(mesh, ck, STEPS, checkpoint_every=STEPS) if saves else _direct(mesh, STEPS)
        if saves:
            saved_np = _host(st)
        res["times"]["x".join(map(str, shape))] = time.time() - t1
        sharded = any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                      for x in jax.tree.leaves(st.trainable))
        res["meshes"]["x".join(map(str, shape))] = {"maxdiff": _maxdiff(_host(st.trainable), ref),
                                                    "sharded": sharded}

    # the checkpoint of the 8-device (1,2,4) run at step 3 -> restore on 2 devices and on 1 device
    t1 = time.time()
    _, state0, _, _ = _build()
    restored = {}
    for name, mesh in (("2dev", parallel.make_mesh(MeshConfig(data=1, fsdp=2), devices=devs[:2])), ("1dev", one)):
        with StageStore(ck, keep_last=3, checkpoint_every=STEPS, fingerprint="par") as store:
            st, record = store.restore_latest(parallel.place(state0, mesh))
        devices = {d.id for x in jax.tree.leaves(st) for d in x.sharding.device_set}
        restored[name] = {"maxdiff": _maxdiff(_host(st), saved_np), "step": int(record["step"]),
                          "devices": sorted(devices)}
    # continue on one device to step 5 (run_stage resumes from the 8-device checkpoint) vs 5 steps straight
    cont = _run(one, ck, STEPS + 2, checkpoint_every=STEPS)
    straight = _direct(one, STEPS + 2)
    restored["continued_maxdiff"] = _maxdiff(_host(cont.trainable), _host(straight.trainable))
    restored["continued_step"] = int(cont.step)
    res["times"]["restore+continue"] = time.time() - t1
    res["restore"] = restored
    res["seconds"] = time.time() - t0
    with open(os.path.join(out_dir, "meshes.json"), "w") as f:
        json.dump(res, f)


def worker_multiprocess(out_dir):
    """One of two processes (4 CPU devices each, gloo): the Booster steps on the global (2,4,1) mesh."""
    from booster_jax import parallel

    parallel.initialize_distributed()
    import jax

    from booster_jax.config import MeshConfig

    assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=4))
    st = _run(mesh, os.path.join(out_dir, "mp"), STEPS)  # ends with a collective Orbax save
    got = _host(st.trainable)
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "mp.npz"), *got)


def _worker_main(argv):
    mode, out_dir, ndev = argv[0], argv[1], argv[2]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    {"meshes": worker_meshes, "multiprocess": worker_multiprocess}[mode](out_dir)


# ============================================================================ subprocess tests

def _env(ndev, **extra):
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={ndev}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All subprocesses at once (the 8-device worker, the two-process pair, gpu_steps --tiny): they are
    independent until the results are compared, and on a shared CPU running them together saves wall time."""
    out = str(tmp_path_factory.mktemp("parallel"))
    port = _free_port()
    procs = {"meshes": subprocess.Popen([sys.executable, "-m", "tests.test_parallel", "meshes", out, "8"],
                                        cwd=ROOT, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)}
    for pid in range(2):
        env = _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), JAX_DISTRIBUTED_TIMEOUT_S="300")
        procs[f"mp{pid}"] = subprocess.Popen([sys.executable, "-m", "tests.test_parallel", "multiprocess", out, "4"],
                                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)
    procs["tiny"] = subprocess.Popen([sys.executable, "benchmarks/gpu_steps.py", "--tiny"], cwd=ROOT, env=_env(1),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {}
    try:
        # Generous: they take 2-4 min on an idle 2-core CI box, but a machine shared with a training run
        # starved them past a 300 s deadline (2026-12-03); the deadline only guards against a hang.
        deadline = time.time() + 1200
        for name, p in procs.items():
            try:
                so, se = p.communicate(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                p.kill()
                so, se = p.communicate(timeout=10)
                se += "\n[killed: timed out]"
            done[name] = (p.returncode, so, se)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    return out, done


def _ok(runs, name):
    rc, so, se = runs[1][name]
    assert rc == 0, f"{name} failed (rc {rc}):\n{se[-4000:]}"
    return so


@pytest.fixture(scope="module")
def meshes(runs):
    _ok(runs, "meshes")
    with open(os.path.join(runs[0], "meshes.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("shape", ["x".join(map(str, s)) for s in MESHES])
def test_mesh_matches_one_device(meshes, shape):
    r = meshes["meshes"][shape]
    assert r["maxdiff"] < TOL, r
    if shape != "8x1x1":  # pure data parallel replicates the weights; the others shard them
        assert r["sharded"], f"mesh {shape}: nothing was actually sharded"


def test_checkpoint_restores_on_other_meshes_and_continues(meshes):
    r = meshes["restore"]
    assert r["2dev"]["maxdiff"] == 0.0 and r["2dev"]["step"] == STEPS and r["2dev"]["devices"] == [0, 1]
    assert r["1dev"]["maxdiff"] == 0.0 and r["1dev"]["devices"] == [0]
    assert r["continued_step"] == STEPS + 2
    assert r["continued_maxdiff"] < TOL, r


def test_two_processes_agree_with_one(runs, meshes):
    _ok(runs, "mp0")
    _ok(runs, "mp1")
    got = list(np.load(os.path.join(runs[0], "mp.npz")).values())
    ref = list(np.load(os.path.join(runs[0], "ref.npz")).values())
    assert len(got) == len(ref) and _maxdiff(got, ref) < TOL


def test_gpu_steps_tiny_runs(runs):
    out = _ok(runs, "tiny")
    assert "booster_step" in out and "sft_step" in out
    assert "evaluate: generate 4 prompts x 4 new tokens" in out and "pairs/s" in out  # the evaluation phase


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
