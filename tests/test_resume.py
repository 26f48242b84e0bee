"""A stage killed with SIGKILL mid-run and started again ends bitwise equal to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, LOG_EVERY = 40, 5, 4


def worker_cmd(out, sleep):
    return [sys.executable, "-m", "tests.resume_worker", "--out", str(out), "--steps", str(STEPS),
            "--every", str(EVERY), "--log-every", str(LOG_EVERY), "--sleep", str(sleep)]


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    # the later runs reuse the first one's compiled step (same executable, so also a fair comparison)
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run(cmd, env, timeout=120):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def result(out):
    with np.load(os.path.join(out, "result.npz")) as z:
        leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
    with open(os.path.join(out, "result.json")) as fh:
        return leaves, json.load(fh)


def read_progress(out):
    try:
        with open(os.path.join(out, "progress")) as fh:
            return int(fh.read() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_sigkill_mid_stage_then_rerun_matches_uninterrupted_run(tmp_path, env):
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    ref.mkdir()
    victim.mkdir()
    run(worker_cmd(ref, 0.0), env)  # uninterrupted (and fills the compilation cache)

    # the same command, slowed by a per-step sleep, killed between checkpoints in mid-stage
    cmd = worker_cmd(victim, 0.05)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while read_progress(victim) < 13:
            assert proc.poll() is None, "worker exited before it could be killed"
            assert time.time() < deadline, "worker made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    killed_at = read_progress(victim)
    assert proc.returncode == -signal.SIGKILL and killed_at < STEPS
    assert not os.path.exists(victim / "result.npz")

    p = run(cmd, env)  # started again with the same command: resumes, does not start over
    resumed = [line for line in p.stderr.splitlines() if "resuming from step" in line]
    assert len(resumed) == 1, p.stderr[-2000:]
    resumed_from = int(resumed[0].split("resuming from step ")[1].split("/")[0])
    assert resumed_from % EVERY == 0 and 10 <= resumed_from <= killed_at

    ref_leaves, ref_info = result(ref)
    got_leaves, got_info = result(victim)
    assert len(ref_leaves) == len(got_leaves)
    for a, b in zip(ref_leaves, got_leaves):  # trainable, optimizer state and step: bit for bit
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert got_info["step"] == ref_info["step"] == STEPS
    assert got_info["streams"] == ref_info["streams"]  # both stream positions (and token counters)
    assert got_info["rng"] == ref_info["rng"]
    assert got_info["summary"]["tokens"] == ref_info["summary"]["tokens"]
    assert got_info["summary"]["resumed_from_step"] == resumed_from

    # the metrics log has each log step exactly once (lines past the checkpoint were dropped)
    steps = [json.loads(line)["step"] for line in open(victim / "metrics.jsonl")]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    ref_lines = {json.loads(l)["step"]: json.loads(l) for l in open(ref / "metrics.jsonl")}
    for line in open(victim / "metrics.jsonl"):  # windows that did not straddle the resume are identical
        rec = json.loads(line)
        if rec["step"] - LOG_EVERY >= resumed_from:
            assert rec["loss"] == ref_lines[rec["step"]]["loss"]


# ----------------------------------------------------------------------------- a diverged stage (issue 15)

def _diverging_stage(tmp_path, lr, fingerprint, resume_diverged=False, steps=12):
    """The tiny model through ``stages.train`` (the pipeline's stage runner), whose loss turns NaN once any
    LoRA weight has moved more than 0.27 from its start: Adam moves about ``lr`` per step, so lr=0.05
    diverges at step 7 (after the step-5 checkpoint) and lr=1e-3 never does."""
    import jax
    import jax.numpy as jnp

    from booster_jax.config import load_config
    from booster_jax.methods.base import Forward
    from booster_jax.models.llama import make_model
    from booster_jax.models.lora import init_lora
    from booster_jax.train import stages
    from tests import resume_worker as tiny

    cfg = load_config(None, [f"align.optim.lr={lr}", "run.checkpoint_every=5", "run.log_every=1",
                             "run.keep_last=3", f"run.resume_diverged={str(resume_diverged).lower()}"])
    forward = Forward(make_model(tiny.CFG, tiny.SPEC))
    lora0 = init_lora(jax.random.key(1), tiny.CFG, tiny.SPEC)

    def poisoned(trainable, frozen, batch, **kw):
        moved = jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(trainable),
                                                                            jax.tree.leaves(lora0))]))
        return forward(trainable, frozen, batch, **kw) + jnp.where(moved > 0.27, jnp.nan, 0.0)

    frozen, *_ = tiny.build()
    return stages.train(cfg, "align", "sft", cfg.align.optim, poisoned, frozen["params"], lora0,
                        tiny.make_streams(), steps, str(tmp_path / "align" / "stage"), fingerprint,
                        {"stage": "align"}, False, rng_seed=0)


def test_nan_stop_says_what_a_rerun_does_and_resume_diverged_continues_with_new_optimizer(tmp_path, capfd):
    from booster_jax.train.loop import TrainingDivergedError
    from booster_jax.train.stages import DIVERGED

    stage = tmp_path / "align" / "stage"
    with pytest.raises(TrainingDivergedError) as e:
        _diverging_stage(tmp_path, 0.05, "fp-lr0.05")
    msg = str(e.value)
    assert "at step 7" in msg and "step 5" in msg
    assert "with the same settings it resumes from step 5" in msg
    assert "with changed optimizer settings" in msg and "starts this stage over from step 0" in msg
    assert "run.resume_diverged=true" in msg
    assert json.load(open(stage / DIVERGED))["step"] == 5

    # the option: same stage, lower learning rate (another fingerprint), continues from step 5
    capfd.readouterr()
    _diverging_stage(tmp_path, 1e-3, "fp-lr0.001", resume_diverged=True)
    err = capfd.readouterr().err
    assert "resuming from step 5/12" in err
    assert json.load(open(stage / "DONE"))["fingerprint"] == "fp-lr0.001"
    assert not (stage / DIVERGED).exists() and "diverged under fingerprint fp-lr0.05" in (stage / "NOTE.txt").read_text()
    meta = json.load(open(stage / "final" / "meta.json"))
    assert meta["summary"]["resumed_from_step"] == 5 and meta["summary"]["steps"] == 12
    steps = [json.loads(line)["step"] for line in open(stage / "metrics.jsonl")]
    assert steps == list(range(1, 13))  # 1-5 from the diverged run, 6-12 with the new settings


def test_a_diverged_stage_rerun_with_new_optimizer_starts_over_and_keeps_the_old_one(tmp_path, capfd):
    from booster_jax.train.loop import TrainingDivergedError
    from booster_jax.train.stages import DIVERGED

    with pytest.raises(TrainingDivergedError):
        _diverging_stage(tmp_path, 0.05, "fp-lr0.05")
    capfd.readouterr()
    _diverging_stage(tmp_path, 1e-3, "fp-lr0.001")  # what the message says: a fresh stage from step 0
    assert "resuming from step" not in capfd.readouterr().err
    (old,) = [p for p in os.listdir(tmp_path / "align") if p.startswith("stage.old-")]
    assert (tmp_path / "align" / old / DIVERGED).exists() and (tmp_path / "align" / old / "steps" / "5").exists()
    meta = json.load(open(tmp_path / "align" / "stage" / "final" / "meta.json"))
    assert meta["summary"]["resumed_from_step"] == 0
