"""The CPU benchmarks' ``--threads 1``: one CPU for the whole process, and the CPU/wall guard that checks it.

XLA's thread flags alone left its CPU pool running several threads (process CPU time ~2x wall in
jax 0.10.2), so ours-vs-torch wall ratios were not one thread vs one thread. Checked here:

* ``bench_steps.parse([... "--threads", "1"])`` in a fresh process (jax not yet imported) leaves
  every thread of the process, including the ones jax starts afterwards, on exactly one CPU, and a jitted
  computation with independent branches then runs at CPU time <= 1.3 x wall time;
* ``check_one_thread`` raises SystemExit naming ``--threads 1`` at CPU/wall 2, and not at 1 or without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from benchmarks.bench_steps import check_one_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks.bench_steps import parse
args = parse(["--threads", "1", "--steps", "1"], "test")
assert "jax" not in sys.modules
import jax, jax.numpy as jnp
f = jax.jit(lambda x: sum(jnp.tanh((x + i) @ x).sum() for i in range(8)))  # independent branches
x = jnp.ones((256, 256))
f(x).block_until_ready()
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(20):
    f(x).block_until_ready()
ratio = (time.process_time() - c0) / (time.perf_counter() - t0)
tasks = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
print(json.dumps({"cpu": args.cpu, "process": sorted(os.sched_getaffinity(0)), "tasks": tasks, "ratio": ratio}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_threads_1_pins_the_process_to_one_cpu():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", WORKER, ROOT], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["cpu"] == min(os.sched_getaffinity(0))
    assert got["process"] == [got["cpu"]]
    assert len(got["tasks"]) > 1  # jax's own threads exist, and they are pinned too
    assert all(cpus == [got["cpu"]] for cpus in got["tasks"].values()), got["tasks"]
    assert got["ratio"] <= 1.3, got["ratio"]


def test_cpu_per_wall_guard():
    one = argparse.Namespace(threads=1)
    with pytest.raises(SystemExit, match="--threads 1"):
        check_one_thread(one, {"ours sft": 1.0, "ours booster": 2.0})
    check_one_thread(one, {"ours sft": 1.0, "torch sft": 0.6})  # a loaded host: below 1 is fine
    check_one_thread(argparse.Namespace(threads=0), {"ours sft": 2.0})  # not asked for one thread


def test_profile_run_charges_exclusive_wall_cpu_and_compiles():
    """profile_run's Profile: a nested phase's seconds leave its parent, a compile's wall seconds move
    from the open phase to "compile (XLA)", and a phase's CPU/wall counts the compiles it triggered
    (a sleeping phase reads ~0 CPU/wall, a spinning one near 1, less on a loaded machine)."""
    import time

    from benchmarks.profile_run import Profile, table

    def spin(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    prof = Profile()
    t0 = time.perf_counter()
    with prof.phase("outer"):
        time.sleep(0.2)
        t1, c1 = time.perf_counter(), time.process_time()
        with prof.phase("inner"):
            spin(0.2)
            prof.compiled(0.05)  # as if 0.05 s of the spin were an XLA compile
        t2, c2 = time.perf_counter(), time.process_time()
    total = time.perf_counter() - t0
    rows = {name: (sec, calls, ratio) for name, sec, calls, ratio in table(prof, total)}
    assert rows["inner"][0] == pytest.approx(t2 - t1 - 0.05, abs=2e-3)
    assert rows["compile (XLA)"][:2] == (pytest.approx(0.05), 1)
    assert rows["outer"][0] == pytest.approx(total - (t2 - t1), abs=2e-3)
    # the inner phase's CPU/wall with its compile: the spin's CPU over the block's whole wall time
    assert rows["inner"][2] == pytest.approx((c2 - c1) / (t2 - t1), rel=0.05)
    assert rows["outer"][2] < 0.1  # asleep
    assert sum(sec for sec, _, _ in rows.values()) == pytest.approx(total, abs=1e-6)


def test_profile_run_times_the_hook_a_factory_returns():
    """The attack's tracking hook is built once and called every few steps inside a training stage: its
    calls, not only its construction, are charged to its own phase."""
    import time

    from benchmarks.profile_run import Profile

    prof = Profile()
    make = prof.wrap_factory(lambda: (5, lambda state: time.sleep(0.05) or {"loss": state}), "tracking")
    every, hook = make()
    with prof.phase("training steps"):
        assert hook(1.0) == {"loss": 1.0} and every == 5
        hook(2.0)
    assert prof.calls["tracking"] == 3  # the construction and two calls
    assert prof.seconds["tracking"] >= 0.1
    assert prof.seconds["training steps"] < prof.seconds["tracking"]
