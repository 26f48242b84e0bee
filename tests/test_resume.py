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
